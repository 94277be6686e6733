"""``glmkit generate``: fill the blanks of a text, or continue it, from the command line or from Python.

The engine deals in token ids only (nanochat's rule); this layer owns the text: tokenizing ``[CLS] text`` the way
the original GLM does, the context limit (a clear error, or left truncation on request), streaming decoded text as
tokens arrive, timing, and the human or JSON output. A text with [MASK]/[sMASK]/[gMASK] blanks has every blank
filled (``fill_blank_ids``); plain text is continued through a trailing [gMASK] (``complete``'s layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..masks import find_blanks
from ..prompts import DEFAULT_FAMILY, has_blank, layout, model_family, text_prompt
from ..tokenizer import TokenizerLike
from .blanks import fill_blank_ids
from .engine import generate
from .fast import optimize_for_decode

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TextGeneration:
    """One returned sequence. ``text`` is the input with every blank filled (for plain text: prompt + continuation);
    ``spans``/``tokens`` are the generated text/ids per blank (stop token left out); ``new_tokens`` counts decode
    steps (stop tokens included); ``first_token_s`` is the time to the first generated token (``None`` with beams)."""

    prompt: str
    text: str
    spans: list[str]
    tokens: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    truncated_tokens: int
    new_tokens: int
    seconds: float
    first_token_s: float | None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def prompt_ids(
    tokenizer: TokenizerLike, text: str, n_positions: int, truncate: bool = False, family: str = DEFAULT_FAMILY
) -> tuple[list[int], int]:
    """Input ids of ``text`` (``prompts.text_prompt`` of ``family``) and how many tokens were cut from its left.

    GLM with blanks: ``[CLS] text [eos]`` (no eos after a final blank), as ``fill_blanks``; without: ``[CLS] text
    [gMASK]``, as ``complete`` (ChatGLM-6B: ``text [gMASK]``; ChatGLM2/3, GLM-4: ``[gMASK] sop text``). Longer than
    ``n_positions`` raises ``ValueError``, unless ``truncate``: then the oldest text tokens are dropped (the ids the
    layout adds stay).
    """
    prompts = layout(tokenizer.special, family)
    body = tokenizer.encode(text)
    if not body:
        raise ValueError("prompt: the text is empty")
    ids = text_prompt(prompts, body)
    extra = len(ids) - n_positions
    if extra <= 0:
        return ids, 0
    if not truncate:
        raise ValueError(
            f"prompt: {len(ids)} tokens ([CLS] and the end token included) exceed the model's context of "
            f"{n_positions} positions; shorten it, or pass --truncate to drop {extra} tokens from its left"
        )
    if has_blank(prompts, body) and not has_blank(prompts, body[extra:]):
        raise ValueError(f"prompt: after dropping {extra} tokens from the left no blank is left to fill")
    return text_prompt(prompts, body[extra:]), extra


class TextStreamer:
    """A transformers-style streamer that turns each span's tokens into text pieces for ``on_text``.

    It re-decodes the span so far behind the token that precedes its blank (``contexts[i]`` for span i), so
    tokenizers that join words with spaces or mark them with a leading-space symbol print the right spacing, and
    hands over only the new, stable suffix (a byte-level BPE token can end in the middle of a UTF-8 character,
    which decodes to U+FFFD until the next token completes it). It also records when the first token arrived.
    """

    def __init__(
        self,
        tokenizer: TokenizerLike,
        contexts: list[int],
        on_text: Callable[[str], None] | None,
        on_end: Callable[[], None],
    ) -> None:
        self.tokenizer, self.contexts, self.on_text, self.on_end = tokenizer, contexts, on_text, on_end
        self.start = time.perf_counter()
        self.first_token_s: float | None = None
        self.index = 0  # which span
        self.span: list[int] = []
        self.shown = 0
        self.prompt_pending = True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_pending:  # the first put of a span is its prompt
            self.prompt_pending = False
            return
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.start
        self.span += value.reshape(-1).tolist()
        context = [self.contexts[self.index]]
        head = len(self.tokenizer.decode(context, skip_special_tokens=True))
        text = self.tokenizer.decode(context + self.span, skip_special_tokens=True)[head:]
        if text.endswith("\ufffd") or len(text) <= self.shown:
            return
        if self.on_text is not None:
            self.on_text(text[self.shown :])
        self.shown = len(text)

    def end(self) -> None:
        self.index += 1
        self.span, self.shown, self.prompt_pending = [], 0, True
        self.on_end()


def generate_text(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    text: str,
    *,
    truncate: bool = False,
    on_text: Callable[[str], None] | None = None,
    on_span_end: Callable[[], None] = lambda: None,
    **kwargs: Any,
) -> list[TextGeneration]:
    """Fill every blank of ``text``, or continue it; ``kwargs`` are transformers' generation settings.

    Returns ``num_return_sequences`` results (more than one needs a text with a single blank, or plain text).
    ``on_text`` receives the generated text piece by piece as tokens arrive (greedy/sampling only); ``on_span_end``
    is called after each span.
    """
    special, family = tokenizer.special, model_family(model)
    ids, cut = prompt_ids(tokenizer, text, model.config.n_positions, truncate, family)
    blanks = find_blanks(ids, layout(special, family).blank_ids())
    n = kwargs.get("num_return_sequences", 1)
    if n > 1 and on_text is not None:
        raise ValueError(f"num_return_sequences: streaming shows one sequence, got {n}")
    common = dict(special_tokens=special, tokenizer=tokenizer, **kwargs)
    start = time.perf_counter()
    if not blanks:  # a causal LM (ChatGLM2/3, GLM-4) continues the prompt itself: one span after its last token
        streamer = (
            None if n > 1 or kwargs.get("num_beams", 1) > 1 else TextStreamer(tokenizer, ids[-1:], on_text, on_span_end)
        )
        out = generate(model, ids, streamer=streamer, **common)
        rows = []
        for toks, reason in zip(out.new_tokens, out.finish_reasons, strict=True):
            span = toks[:-1] if reason == "stop" else toks
            rows.append((ids + span, [span], [reason]))
        first = streamer.first_token_s if streamer is not None else None
    elif n == 1:
        contexts = [ids[p - 1] for p in blanks]
        streamer = None if kwargs.get("num_beams", 1) > 1 else TextStreamer(tokenizer, contexts, on_text, on_span_end)
        res = fill_blank_ids(model, ids, streamer=streamer, **common)
        rows = [(res.ids, res.spans, list(res.finish_reasons))]
        first = streamer.first_token_s if streamer is not None else None
    else:
        if len(blanks) > 1:
            raise ValueError(f"num_return_sequences: {n} sequences need a text with one blank, this has {len(blanks)}")
        out = generate(model, ids, **common)
        p = blanks[0]
        rows = []
        for toks, reason in zip(out.new_tokens, out.finish_reasons, strict=True):
            span = toks[:-1] if reason == "stop" else toks
            rows.append((ids[:p] + span + ids[p + 1 :], [span], [reason]))
        first = None
    seconds = time.perf_counter() - start
    results = []
    for filled, spans, reasons in rows:
        steps = sum(len(s) + (r == "stop") for s, r in zip(spans, reasons, strict=True))
        results.append(
            TextGeneration(
                prompt=text,
                text=tokenizer.decode(filled, skip_special_tokens=True),
                spans=[tokenizer.decode(s, skip_special_tokens=True) for s in spans],
                tokens=spans,
                finish_reasons=reasons,
                prompt_tokens=len(ids),
                truncated_tokens=cut,
                new_tokens=steps,
                seconds=seconds,
                first_token_s=first,
            )
        )
    return results


# ---- command line -------------------------------------------------------------------------------------------


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """transformers' generation settings as flags; an unset flag keeps transformers' default."""
    g = parser.add_argument_group("generation (transformers' names and defaults)")
    for name, kind in (
        ("max-new-tokens", int),
        ("min-new-tokens", int),
        ("num-beams", int),
        ("top-k", int),
        ("top-p", float),
        ("min-p", float),
        ("typical-p", float),
        ("temperature", float),
        ("repetition-penalty", float),
        ("no-repeat-ngram-size", int),
        ("length-penalty", float),
        ("num-return-sequences", int),
        ("seed", int),
    ):
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam search")
    g.add_argument("--early-stopping", choices=["true", "false", "never"], default=None, help="beam search stop rule")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the one-token decode step")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation settings given on the command line, under transformers' names."""
    names = (
        "max_new_tokens", "min_new_tokens", "num_beams", "top_k", "top_p", "min_p", "typical_p", "temperature",
        "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "num_return_sequences", "seed", "do_sample",
        "compile",
    )  # fmt: skip
    kw = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.early_stopping is not None:
        kw["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, args.early_stopping)
    if args.stop:
        kw["stop_strings"] = args.stop
    return kw


PREFIX_HELP = (
    "a P-tuning v2 prefix / soft prompt folder (glmkit finetune --method prefix, glmkit.prompting.tune_soft_prompt, "
    "a released ChatGLM2 P-tuning checkpoint) to put before every prompt. A prefixed GLM decodes through PyTorch's "
    "cached forward: the fused bf16 decode kernel cannot take a prefix (the linear-layer kernels still run)"
)


def add_prefix_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefix", type=Path, default=None, metavar="DIR", help=PREFIX_HELP)


def with_prefix(model: torch.nn.Module, folder: Path | None) -> torch.nn.Module:
    """``model`` with the prefix saved in ``folder`` on it (``None``: ``model`` itself), frozen, in eval mode."""
    if folder is None:
        return model
    from ..finetune.peft import load_prefix

    try:
        prefixed = load_prefix(model, folder)
    except TypeError as e:  # a model family that takes no prefix: the user's choice of folders, not a bug
        raise ValueError(f"--prefix: {e}") from e
    return prefixed.requires_grad_(False).eval()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", help="text to continue, or with [MASK]/[sMASK]/[gMASK] blanks to fill")
    parser.add_argument("--file", type=Path, help="prompts, one per line (instead of PROMPT)")
    parser.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: bundled)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--truncate", action="store_true", help="drop tokens from the left of a too-long prompt")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    add_prefix_flag(parser)
    add_generation_flags(parser)


def _prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.file is None):
        raise ValueError("prompt: give a PROMPT or --file (one of them)")
    if args.file is None:
        return [args.prompt]
    prompts = [line for line in read_prompt_file(args.file, "--file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--file: {args.file} holds no prompt")
    return prompts


def read_prompt_file(path: Path, flag: str) -> str:
    """The UTF-8 text of the prompt file a command-line ``flag`` names; a folder, a missing file or other bytes raise an
    error naming the flag, the path and the problem."""
    if path.is_dir():
        raise IsADirectoryError(f"{flag}: {path} is a folder; give a text file with one prompt per line")
    if not path.exists():
        raise FileNotFoundError(f"{flag}: {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from e


def run(args: argparse.Namespace) -> int:
    from ..bundled import load_model_and_tokenizer

    if args.stream and args.json:
        raise ValueError("--stream: cannot be combined with --json")
    prompts = _prompts(args)
    kwargs = generation_kwargs(args)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=DTYPES[args.dtype])
    model = with_prefix(model, args.prefix)
    optimize_for_decode(model)
    out = sys.stdout
    results = []
    for prompt in prompts:
        shown: dict[str, Any] = {}
        blanks = has_blank(layout(tokenizer.special, model_family(model)), tokenizer.encode(prompt))
        if args.stream:
            out.write("" if blanks else prompt)
            out.flush()
            shown = dict(on_text=lambda piece: (out.write(piece), out.flush()), on_span_end=lambda: out.write("\n"))
        res = generate_text(model, tokenizer, prompt, truncate=args.truncate, **shown, **kwargs)
        if args.stream and blanks:
            out.write(f"{res[0].text}\n\n")
        elif args.stream:
            out.write("\n")
        elif not args.json:
            out.write("".join(f"{r.text}\n\n" for r in res))
        results += res
    if args.json:
        prefix = None if args.prefix is None else str(args.prefix)
        settings = {"model": args.model or "bundled", "prefix": prefix, "dtype": args.dtype, **kwargs}
        doc = {
            "settings": settings,
            "results": [dataclasses.asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
        }
        out.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return 0
