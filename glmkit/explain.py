"""``glmkit explain``: the picture from the GLM paper (Figure 2) for any text with blanks.

Blanks are written ``[MASK]``, ``[sMASK]`` or ``[gMASK]``; a blank may be followed by ``{span text}`` to say what
fills it (as in pretraining), otherwise ``--span-length`` placeholder tokens stand for what generation will
produce. Everything shown comes from masks.py, the same code that data, generation and serving use.
``--family chatglm6b`` lays the text out as ChatGLM-6B does (``text [gMASK] <sop>``, no [CLS]; [MASK] infill) with
its 2D positions (masks.chatglm6b_inputs, the hub's ``get_position_ids``); ``--family chatglm2`` as ChatGLM2/3 and
GLM-4 do (``[gMASK] sop text``, positions 0..n-1, every token causal: no blanks to fill). Without ``--family`` the
layout is the tokenizer folder's model family (``glmkit.prompts``): a ChatGLM hub folder is drawn as its family.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .masks import BlankSample, chatglm6b_inputs, make_block_data, prefix_lm_mask, sample_mask
from .prompts import layout

_BLANK = re.compile(r"\[(MASK|sMASK|gMASK)\](?:\{([^}]*)\})?")
PLACEHOLDER = "▢"


@dataclass
class Explanation:
    sample: BlankSample
    labels: list[str]  # a display string per token (placeholders shown as ▢)
    causal: bool = False  # a causal LM's prompt and answer (sample.sep == 0): no Part A / Part B

    @property
    def part_a(self) -> range:
        return range(self.sample.sep)

    @property
    def part_b(self) -> range:
        return range(self.sample.sep, len(self.sample))


def explain(
    text: str, tokenizer: str | Path | Any = None, span_length: int = 2, family: str | None = None
) -> Explanation:
    """Lay out ``text`` as GLM Part A + Part B (blanks filled left to right, the order generation uses), or as
    ChatGLM-6B's prompt and answer with ``family="chatglm6b"``; ``None``: the family of the tokenizer folder's model
    (GLM unless it is a ChatGLM hub folder). ``tokenizer`` is a folder, or a tokenizer already loaded (the server's
    playground passes the one it serves with, and its model's family)."""
    from .tokenizer import load_tokenizer

    if span_length < 1:
        raise ValueError(f"span_length: must be at least 1, got {span_length}")
    if family is None:
        family = _folder_family(tokenizer) if _is_folder(tokenizer) else "glm"
    if family == "chatglm6b":
        return _explain_chatglm6b(text, tokenizer, span_length)
    if family == "chatglm2":
        return _explain_causal(text, tokenizer, span_length)
    if family != "glm":
        raise ValueError(f"family: expected 'glm', 'chatglm6b' or 'chatglm2', got {family!r}")
    tok = load_tokenizer(tokenizer) if _is_folder(tokenizer) else tokenizer
    sp = tok.special
    blank_ids = {"MASK": sp.mask, "sMASK": sp.smask, "gMASK": sp.gmask}
    ids: list[int] = [sp.cls]
    spans: list[tuple[int, int]] = []
    mask_ids: list[int] = []
    placeholder_at: set[int] = set()
    cursor = 0
    for m in _BLANK.finditer(text):
        ids += tok.encode(text[cursor : m.start()])
        kind = m.group(1)
        if blank_ids[kind] is None:
            raise ValueError(f"text: this tokenizer has no [{kind}] token")
        fill = tok.encode(m.group(2)) if m.group(2) is not None else []
        if not fill:
            filler = sp.unk if sp.unk is not None else sp.pad
            fill = [filler] * span_length
            placeholder_at.update(range(len(ids), len(ids) + span_length))
        spans.append((len(ids), len(ids) + len(fill)))
        mask_ids.append(blank_ids[kind])
        ids += fill
        cursor = m.end()
    if not spans:
        raise ValueError("text: no blank found; write [MASK], [sMASK] or [gMASK] where the model should fill in")
    ids += tok.encode(text[cursor:])
    if not re.search(r"\[gMASK\](\{[^}]*\})?\s*$", text):
        ids.append(sp.eos)  # the original generate_samples.py ends the context with eos unless it ends in [gMASK]
    sample = make_block_data(ids, spans, mask_id=mask_ids, sop_id=sp.sop, eop_id=sp.eop)

    # labels: map every output token back to its source token to show placeholders as ▢
    origin: list[int | None] = []
    starts = {s: k for k, (s, _) in enumerate(spans)}
    i = 0
    while i < len(ids):
        if i in starts:
            origin.append(None)  # the blank token
            i = spans[starts[i]][1]
        else:
            origin.append(i)
            i += 1
    for s, e in spans:
        origin += [None] + list(range(s, e))
    labels = []
    for t, o in zip(sample.tokens, origin, strict=True):
        labels.append(PLACEHOLDER if o in placeholder_at else tok.convert_ids_to_tokens([t])[0])
    return Explanation(sample, labels)


def _explain_chatglm6b(text: str, tokenizer: str | Path | Any, span_length: int) -> Explanation:
    """ChatGLM-6B: the prompt ``text [gMASK]`` (prompts.ChatGLM6BPrompts) is bidirectional; ``<sop>`` and the
    answer (``span_length`` placeholders) are causal at (blank position, 1, 2, ...), the blank being the [gMASK], or
    the [MASK] of a text without one."""
    from .tokenizer import load_tokenizer

    if not _is_folder(tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        from .chatglm.tokenizers import load_chatglm_tokenizer

        tok = load_chatglm_tokenizer(tokenizer, "chatglm6b")
    else:
        tok = load_tokenizer(None)
    sp = tok.special
    ids: list[int] = []
    cursor = 0
    for m in _BLANK.finditer(text):
        if m.group(1) == "sMASK" or m.group(2) is not None:
            raise ValueError("text: ChatGLM-6B fills [MASK] or [gMASK] blanks, without a {span}")
        ids += tok.encode(text[cursor : m.start()]) + [sp.mask if m.group(1) == "MASK" else sp.gmask]
        cursor = m.end()
    ids += tok.encode(text[cursor:])
    prompt = layout(sp, "chatglm6b").model_input(ids)
    filler = sp.unk if sp.unk is not None else sp.pad
    tokens = [*prompt, sp.sop] + [filler] * span_length
    pos = chatglm6b_inputs(torch.tensor([tokens]), sop_id=sp.sop, mask_id=sp.mask, gmask_id=sp.gmask)[0][0]
    sep = len(prompt)
    loss_mask = [0] * sep + [1] * (span_length + 1)
    sample = BlankSample(tokens, tokens, loss_mask, pos[0].tolist(), pos[1].tolist(), sep, [int(pos[0, sep])])
    if hasattr(tok, "convert_ids_to_tokens"):
        labels = tok.convert_ids_to_tokens(tokens[: sep + 1])
    else:
        labels = [tok.decode([t]) for t in tokens[: sep + 1]]
    return Explanation(sample, labels + [PLACEHOLDER] * span_length)


def _explain_causal(text: str, tokenizer: str | Path | Any, span_length: int) -> Explanation:
    """ChatGLM2/3 and GLM-4: the prompt ``[gMASK] sop text`` (prompts.ChatGLM2Prompts) and the answer
    (``span_length`` placeholders), every token attending to itself and those before, at positions 0..n-1."""
    if tokenizer is None:
        raise ValueError("--tokenizer: a ChatGLM2/3 or GLM-4 folder is needed for --family chatglm2")
    if _BLANK.search(text):
        raise ValueError("text: ChatGLM2/3 and GLM-4 continue a text causally; it has no blanks to fill")
    from .chatglm.tokenizers import load_chatglm_tokenizer

    tok = load_chatglm_tokenizer(tokenizer) if _is_folder(tokenizer) else tokenizer
    sp = tok.special
    prompt = layout(sp, "chatglm2").continuation(tok.encode(text))
    filler = sp.pad if sp.pad is not None else sp.eos
    tokens = [*prompt] + [filler] * span_length
    n = len(tokens)
    loss_mask = [0] * len(prompt) + [1] * span_length
    sample = BlankSample(tokens, tokens, loss_mask, list(range(n)), [0] * n, 0, [])
    labels = [tok.decode([t]) or f"<{t}>" for t in prompt]
    return Explanation(sample, labels + [PLACEHOLDER] * span_length, causal=True)


def _is_folder(tokenizer: Any) -> bool:
    return tokenizer is None or isinstance(tokenizer, (str, Path))


def _folder_family(folder: str | Path | None) -> str:
    """The prompt family of the model a tokenizer folder belongs to: a ChatGLM hub folder's (by its tokenizer:
    ``chatglm6b``, or ``chatglm2`` for ChatGLM2/3 and GLM-4), else GLM's."""
    from .bundled import is_chatglm_folder

    if folder is None or not is_chatglm_folder(folder):
        return "glm"
    from .chatglm.tokenizers import load_chatglm_tokenizer

    return load_chatglm_tokenizer(folder).prompt_family


def render_terminal(ex: Explanation, max_grid: int = 64) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    s = ex.sample
    parts = (("Part A (corrupted text, bidirectional)", ex.part_a), ("Part B (spans, in generation order)", ex.part_b))
    if ex.causal:
        parts = (("prompt and answer (causal: each token sees itself and those before)", range(len(s))),)
    for title, rows in parts:
        table = Table(title=title, title_justify="left")
        table.add_column("index", justify="right")
        table.add_column("token")
        table.add_column("position", justify="right")
        table.add_column("block position", justify="right")
        for i in rows:
            table.add_row(str(i), escape(ex.labels[i]), str(s.position_ids[i]), str(s.block_position_ids[i]))
        console.print(table)
    n = len(s)
    if n > max_grid:
        console.print(f"[yellow]attention mask not drawn: {n} tokens > {max_grid} (use --png)[/yellow]")
        return
    mask = sample_mask(s)
    where = "causal" if ex.causal else f"Part A = first {s.sep} tokens"
    console.print(f"Attention mask (row attends to column; ■ = visible; {where}):")
    width = max(len(x) for x in ex.labels[:n])
    for i in range(n):
        cells = "".join(("■" if mask[i, j] else "·") + ("│" if j == s.sep - 1 else "") for j in range(n))
        console.print(f"{ex.labels[i]:>{width}} {cells}", markup=False, highlight=False)
        if i == s.sep - 1:
            console.print(" " * (width + 1) + "─" * (n + 1), highlight=False)


def render_png(ex: Explanation, path: str | Path) -> None:
    """GLM's mask beside GPT's (causal) and BERT's (bidirectional) for the same tokens, 2D positions on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = ex.sample
    n = len(s)
    title = "ChatGLM2/3, GLM-4 (causal)" if ex.causal else "GLM (Part A bidirectional, Part B autoregressive)"
    masks = {
        title: sample_mask(s),
        "GPT (causal)": prefix_lm_mask(0, n)[0, 0],
        "BERT (bidirectional)": torch.ones(n, n, dtype=torch.bool),
    }
    ticks = [f"{lab} ({p},{b})" for lab, p, b in zip(ex.labels, s.position_ids, s.block_position_ids, strict=True)]
    size = max(4.0, 0.32 * n)
    fig, axes = plt.subplots(1, 3, figsize=(3 * size + 2, size + 1.5))
    for ax, (title, m) in zip(axes, masks.items(), strict=True):
        ax.imshow(m.float().numpy(), cmap="Blues", vmin=0, vmax=1.25)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(n), ticks, rotation=90, fontsize=7)
        ax.set_yticks(range(n), ticks, fontsize=7)
        if title.startswith("GLM"):
            ax.axhline(s.sep - 0.5, color="crimson", lw=1)
            ax.axvline(s.sep - 0.5, color="crimson", lw=1)
    fig.suptitle("token (position, block position); rows attend to columns", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help='text with blanks, e.g. "Paris is the [MASK] of France"; [MASK]{span} fixes a span')
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a whitespace tokenizer)")
    p.add_argument("--png", default=None, help="also draw GLM vs GPT vs BERT masks into this PNG file")
    p.add_argument("--span-length", type=int, default=2, help="placeholder tokens per blank with no {span}")
    p.add_argument(
        "--family",
        choices=("glm", "chatglm6b", "chatglm2"),
        default=None,
        help="prompt layout: GLM ([CLS] text, blanks filled), ChatGLM-6B (text [gMASK] <sop>, its 2D positions) or "
        "ChatGLM2/3 / GLM-4 ([gMASK] sop text, causal); default: the family of the --tokenizer folder's model",
    )


def run(args: argparse.Namespace) -> int:
    ex = explain(args.text, tokenizer=args.tokenizer, span_length=args.span_length, family=args.family)
    render_terminal(ex)
    if args.png:
        render_png(ex, args.png)
        print(f"wrote {args.png}")
    return 0
