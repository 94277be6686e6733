"""``glmkit quantize``: write a weight-only INT8 / INT4 copy of a checkpoint folder.

Offline conversion, then a runtime module swap (gpt-fast): the output is an ordinary glmkit checkpoint whose
``config.json`` and safetensors header record the scheme, so ``GLM.from_pretrained`` loads it into the same model
class and ``glmkit.generate`` runs it unchanged. The word embeddings, and with them the tied LM head, are quantized
too (per vocabulary row) unless ``--no-quantize-embeddings``: on GLM-Large they are 9 % of the weights but, kept in
bf16, 27 % of an INT4 model's bytes, and quantizing them costs < 0.15 % held-out loss on the bundled model
(benchmarks/RESULTS.md). Position embeddings, LayerNorms and biases keep the source precision. A ChatGLM hub folder
(any generation) is written back in its family's hub layout (``glmkit.chatglm.hub.save_pretrained``), its untied
output layer quantized like every other linear layer.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..model import GLM
from .modules import quantize_model
from .scheme import GROUP_SIZES, QuantScheme

# files of a checkpoint folder that the quantized copy replaces or drops; everything else (tokenizer, README) is copied
_NOT_COPIED = ("config.json", "model*.safetensors*", "pytorch_model*.bin*", "mp_rank_*", "training_*")


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    bits: int,
    group_size: int = 32,
    quantize_embeddings: bool = True,
    overwrite: bool = False,
) -> None:
    """Quantize the checkpoint folder ``src`` into ``dst``.

    Args:
        src: a full-precision glmkit / hub checkpoint folder.
        dst: the output folder; absent or empty unless ``overwrite``. Model, config and the tokenizer and other
            files of ``src`` are written to a temporary folder next to it, which replaces ``dst`` in one rename.
        bits: 8 (symmetric per output channel) or 4 (symmetric per group of ``group_size`` inputs).
        group_size: inputs per int4 scale, 32, 64 or 128; must divide every layer's input width. Ignored for int8.
        quantize_embeddings: quantize the word embeddings and with them the tied LM head (False: keep them).
        overwrite: replace a ``dst`` that holds files, whole (nothing of the old folder is kept).
    """
    from ..checkpoint import read_quantization, staged_folder
    from ..config import read_json_object

    src, dst = Path(src), Path(dst)
    scheme = QuantScheme(bits, group_size if bits == 4 else None, quantize_embeddings)
    if src.is_file():
        raise NotADirectoryError(f"IN: {src} is a file; give the checkpoint's folder")
    if not src.is_dir():
        raise FileNotFoundError(f"IN: checkpoint folder {src} does not exist")
    if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
        raise ValueError(f"OUT: {dst} is or holds the input folder; write the quantized copy to another folder")
    from ..bundled import is_chatglm_folder

    bits_held = read_json_object(src / "config.json").get("quantization_bit") if is_chatglm_folder(src) else None
    if bits_held:
        raise ValueError(
            f"{src} is already quantized (the hub's int{bits_held} format, quantization_bit); quantize the "
            "full-precision checkpoint instead"
        )
    existing = read_quantization(src)
    if existing is not None:
        raise ValueError(
            f"{src} is already quantized ({existing.describe()}); quantize the full-precision checkpoint instead"
        )
    with staged_folder(dst, overwrite) as tmp:
        model = GLM.from_pretrained(src)
        quantize_model(model, scheme)  # checks every layer width first, then quantizes
        model.save_pretrained(tmp)
        for f in src.iterdir():
            if f.is_file() and not any(f.match(p) for p in _NOT_COPIED):
                shutil.copy2(f, tmp / f.name)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="IN", help="full-precision checkpoint folder")
    p.add_argument("dst", metavar="OUT", help="folder for the quantized checkpoint")
    p.add_argument("--bits", type=int, required=True, help="8: int8 per output channel; 4: int4 per group")
    p.add_argument(
        "--group-size", type=int, default=None, help=f"int4 only: inputs per scale, one of {GROUP_SIZES} (default 32)"
    )
    p.add_argument(
        "--quantize-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize the word embeddings / tied LM head too (default; --no-quantize-embeddings keeps them)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT whole if it holds files")


def run(args: argparse.Namespace) -> int:
    if args.bits == 8 and args.group_size is not None:
        raise ValueError("--group-size: int8 uses one scale per output channel; the group size is for --bits 4")
    group_size = 32 if args.group_size is None else args.group_size
    quantize_checkpoint(args.src, args.dst, args.bits, group_size, args.quantize_embeddings, args.overwrite)
    scheme = QuantScheme(args.bits, group_size if args.bits == 4 else None, args.quantize_embeddings)
    size = sum(f.stat().st_size for f in Path(args.dst).glob("*.safetensors"))
    print(f"wrote {args.dst} ({scheme.describe()}, {size / 2**20:.1f} MiB of weights)")
    return 0
