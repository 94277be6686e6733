"""``glmkit <command>``: one dispatcher over plain functions.

Each command lives in its own module, which defines ``configure(parser)`` (its arguments) and ``run(args)``
(turns parsed arguments into a call of the module's typed Python function). Modules are imported only when
their command runs, so ``glmkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "explain": ("glmkit.explain", "show Part A / Part B, 2D positions and the attention mask of a text with blanks"),
    "pretrain": ("glmkit.train.pretrain", "pretrain a GLM with autoregressive blank infilling (torchrun-ready)"),
    "eval-cloze": ("glmkit.cloze", "zero-shot single-word cloze accuracy on held-out data vs a unigram baseline"),
    "prepare-data": ("glmkit.data.prepare", "tokenize .txt/.jsonl/.parquet corpora into memory-mapped token shards"),
    "train-tokenizer": ("glmkit.train_tokenizer", "train a byte-level BPE tokenizer with the GLM special tokens"),
    "serve": ("glmkit.serve.server", "serve over the Triton (KServe v2) and OpenAI HTTP APIs, continuous batching"),
    "export-triton": ("glmkit.serve.export", "write a Triton model repository (Python backend) that runs glmkit"),
    "quantize": ("glmkit.quantize.convert", "write a weight-only INT8 / INT4 copy of a checkpoint (smaller, faster)"),
    "generate": ("glmkit.generate.cli", "fill the [MASK]/[sMASK]/[gMASK] blanks of a text, or continue it"),
    "compare-decoding": ("glmkit.generate.compare", "greedy, beam, top-k, top-p, temperature: quality and speed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmkit", description="GLM-family language models: train, run, serve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # build only the chosen command's parser so one command's imports never slow another
    if argv and argv[0] in COMMANDS:
        parser = argparse.ArgumentParser(prog=f"glmkit {argv[0]}", description=COMMANDS[argv[0]][1])
        module = importlib.import_module(COMMANDS[argv[0]][0])
        module.configure(parser)
        args = parser.parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"glmkit {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
