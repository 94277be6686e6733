"""``glmkit compare-decoding``: greedy, beam search, top-k, nucleus and temperature sampling side by side.

Holtzman et al. (2020) showed that maximisation (greedy, beam) yields repetitive text with unnaturally low
perplexity while pure sampling falls into the unreliable tail, and that truncated sampling sits closest to human
text. This command makes that comparison measurable on any glmkit model: the same prompts, the same
``max_new_tokens`` and the same tokenization for every strategy; metrics from metrics.py (distinct-1/2, self-BLEU-4,
repetition rate, mean length, perplexity under the model scored in float32), plus latency and tokens/s. When the
prompts come with their true continuations, a "human" row gives the reference values (the built-in prompts are
King James Bible verses, the bundled model's domain; that model was trained on them, so their perplexity is a
lower bound of unseen human text's). Sampling is seeded per strategy, so a run is reproducible with ``--seed``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..masks import find_blanks
from ..prompts import DEFAULT_FAMILY, model_family
from ..tokenizer import TokenizerLike
from .cli import DTYPES, prompt_ids, read_prompt_file
from .engine import generate
from .fast import optimize_for_decode
from .metrics import distinct_n, perplexity, repetition_rate, self_bleu, span_nll

# (prompt, its true continuation) from the King James Bible
DEFAULT_PROMPTS: list[tuple[str, str]] = [
    (
        "In the beginning God created",
        " the heaven and the earth. And the earth was without form, and void; and darkness"
        " was upon the face of the deep. And the Spirit of God moved upon the face of the waters.",
    ),
    (
        "The LORD is my shepherd;",
        " I shall not want. He maketh me to lie down in green pastures: he leadeth me beside"
        " the still waters. He restoreth my soul: he leadeth me in the paths of righteousness",
    ),
    (
        "For God so loved the world,",
        " that he gave his only begotten Son, that whosoever believeth in him should not"
        " perish, but have everlasting life. For God sent not his Son into the world to condemn the",
    ),
    (
        "Blessed are the poor in spirit:",
        " for theirs is the kingdom of heaven. Blessed are they that mourn: for they shall be"
        " comforted. Blessed are the meek: for they shall inherit the earth. Blessed are they",
    ),
    (
        "In the beginning was the Word,",
        " and the Word was with God, and the Word was God. The same was in the beginning with"
        " God. All things were made by him; and without him was not any thing made that was",
    ),
    (
        "Vanity of vanities, saith the Preacher,",
        " vanity of vanities; all is vanity. What profit hath a man of all his labour which"
        " he taketh under the sun? One generation passeth away, and another generation cometh:",
    ),
    (
        "Now the serpent was more subtil",
        " than any beast of the field which the LORD God had made. And he said unto the"
        " woman, Yea, hath God said, Ye shall not eat of every tree of the garden? And the woman",
    ),
    (
        "To every thing there is a season,",
        " and a time to every purpose under the heaven: A time to be born, and a time to die;"
        " a time to plant, and a time to pluck up that which is planted; A time to kill, and a",
    ),
    (
        "Our Father which art in heaven,",
        " Hallowed be thy name. Thy kingdom come. Thy will be done in earth, as it is in"
        " heaven. Give us this day our daily bread. And forgive us our debts, as we forgive our",
    ),
    (
        "And it came to pass in those days, when Moses was grown,",
        " that he went out unto his brethren, and looked on their burdens: and he spied an"
        " Egyptian smiting an Hebrew, one of his brethren. And he looked this way and that way,",
    ),
    (
        "I am the way, the truth, and the life:",
        " no man cometh unto the Father, but by me. If ye had known me, ye should have known"
        " my Father also: and from henceforth ye know him, and have seen him. Philip saith unto",
    ),
    (
        "Hear, O Israel:",
        " The LORD our God is one LORD: And thou shalt love the LORD thy God with all thine"
        " heart, and with all thy soul, and with all thy might. And these words, which I command",
    ),
]

# name -> transformers generation settings; sampling strategies disable top-k unless they are top-k
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "beam-4": {"num_beams": 4},
    "top-k-40": {"do_sample": True, "top_k": 40},
    "top-p-0.9": {"do_sample": True, "top_k": 0, "top_p": 0.9},
    "top-p-0.95": {"do_sample": True, "top_k": 0, "top_p": 0.95},
    "temp-0.7": {"do_sample": True, "top_k": 0, "temperature": 0.7},
    "temp-1.0": {"do_sample": True, "top_k": 0, "temperature": 1.0},
    "temp-1.3": {"do_sample": True, "top_k": 0, "temperature": 1.3},
}
METRICS = {  # field -> column title
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "self_bleu_4": "self-BLEU-4",
    "repetition_4": "rep-4",
    "mean_length": "mean len",
    "perplexity": "PPL",
    "latency_s": "latency s",
    "tokens_per_s": "tok/s",
}


@dataclass
class StrategyResult:
    """Metrics of one strategy over all prompts; ``latency_s``/``tokens_per_s`` are ``None`` for human text."""

    name: str
    settings: dict[str, Any]
    distinct_1: float
    distinct_2: float
    self_bleu_4: float
    repetition_4: float
    mean_length: float
    perplexity: float
    latency_s: float | None
    tokens_per_s: float | None
    texts: list[str]


def _score(
    name: str,
    settings: dict[str, Any],
    spans: list[list[int]],
    nlls: list[float],
    tokenizer: TokenizerLike,
    timing: tuple[float, int] | None,
) -> StrategyResult:
    seconds, steps = timing if timing is not None else (0.0, 0)
    return StrategyResult(
        name=name,
        settings=settings,
        distinct_1=distinct_n(spans, 1),
        distinct_2=distinct_n(spans, 2),
        self_bleu_4=self_bleu(spans),
        repetition_4=repetition_rate(spans),
        mean_length=sum(map(len, spans)) / len(spans),
        perplexity=perplexity(nlls),
        latency_s=seconds / len(spans) if timing is not None else None,
        tokens_per_s=steps / seconds if timing is not None and seconds > 0 else None,
        texts=[tokenizer.decode(s, skip_special_tokens=True) for s in spans],
    )


def compare_decoding(
    model: torch.nn.Module,
    tokenizer: TokenizerLike,
    prompts: Sequence[str],
    references: Sequence[str] | None = None,
    *,
    strategies: dict[str, dict[str, Any]] | None = None,
    max_new_tokens: int = 48,
    seed: int = 0,
    score_model: torch.nn.Module | None = None,
) -> list[StrategyResult]:
    """Continue every prompt with every strategy (one prompt per call, batch 1) and measure the outputs.

    Args:
        model: generates (any dtype; prompts longer than its context are cut from the left).
        references: true continuations of the prompts, for a "human" row (cut to ``max_new_tokens`` tokens).
        strategies: name -> generation settings; default ``STRATEGIES``.
        seed: seeds one sampling RNG per strategy, shared by its prompts.
        score_model: scores the generated spans; default ``model``. Pass a float32 model for exact perplexities.
    """
    if len(prompts) < 2:
        raise ValueError(f"prompts: self-BLEU needs at least two prompts, got {len(prompts)}")
    if references is not None and len(references) != len(prompts):
        raise ValueError(f"references: {len(references)} given for {len(prompts)} prompts")
    strategies = STRATEGIES if strategies is None else strategies
    scorer = model if score_model is None else score_model
    special, family = tokenizer.special, model_family(model)
    contexts = [prompt_ids(tokenizer, p, model.config.n_positions, truncate=True, family=family)[0] for p in prompts]

    def nlls(spans: list[list[int]]) -> list[float]:
        return [x for c, s in zip(contexts, spans, strict=True) for x in _span_nll(scorer, c, s, special, family)]

    results = []
    if references is not None:
        spans = [tokenizer.encode(r)[:max_new_tokens] for r in references]
        results.append(_score("human", {}, spans, nlls(spans), tokenizer, None))
    for name, settings in strategies.items():
        generator = torch.Generator().manual_seed(seed)
        spans, seconds, steps = [], 0.0, 0
        for ids in contexts:
            start = time.perf_counter()
            out = generate(
                model,
                ids,
                special_tokens=special,
                tokenizer=tokenizer,
                generator=generator,
                max_new_tokens=max_new_tokens,
                **settings,
            )
            seconds += time.perf_counter() - start
            steps += len(out.new_tokens[0])
            span = out.new_tokens[0]
            spans.append(span[:-1] if out.finish_reasons[0] == "stop" else span)
        results.append(_score(name, settings, spans, nlls(spans), tokenizer, (seconds, steps)))
    return results


def _span_nll(model: torch.nn.Module, context: list[int], span: list[int], special: Any, family: str) -> list[float]:
    """NLL of each ``span`` token as generation produces it after ``context``: GLM's span at the last blank
    (``metrics.span_nll``); a ChatGLM model called as its hub class, which derives positions and mask from the ids
    (ChatGLM-6B: ``context <sop> span``, the span at the [gMASK]; ChatGLM2/3, GLM-4: ``context span``, causal)."""
    if family == DEFAULT_FAMILY:
        return span_nll(model, context, span, special.sop, find_blanks(context, special.mask_ids())[-1])
    if not span:
        return []
    causal = bool(getattr(model, "causal_lm", False))
    ids = [*context, *([] if causal else [special.sop]), *span[:-1]]
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(torch.tensor([ids], device=device))
    start = len(context) - 1 if causal else len(context)
    target = torch.tensor(list(span), device=device)
    return torch.nn.functional.cross_entropy(logits[0, start:].float(), target, reduction="none").tolist()


def _cell(value: float | None, field: str) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if field in ("mean_length", "tokens_per_s") or value >= 100 else f"{value:.3f}"


def to_markdown(results: Sequence[StrategyResult]) -> str:
    head = "| strategy | " + " | ".join(METRICS.values()) + " |"
    rule = "|---|" + "---:|" * len(METRICS)
    rows = [f"| {r.name} | " + " | ".join(_cell(getattr(r, f), f) for f in METRICS) + " |" for r in results]
    return "\n".join([head, rule, *rows]) + "\n"


def print_table(results: Sequence[StrategyResult]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="decoding strategies")
    table.add_column("strategy", no_wrap=True)
    for title in METRICS.values():
        table.add_column(title, justify="right")
    for r in results:
        table.add_row(r.name, *(_cell(getattr(r, f), f) for f in METRICS))
    console = Console()
    console.width = max(console.width, 120)  # piped output defaults to 80 columns, too narrow for 9
    console.print(table)


def plot(results: Sequence[StrategyResult], path: str | Path) -> None:
    """One bar chart per metric (the human row in grey), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    names = [r.name for r in results]
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]  # C7 is grey, kept for the human row
    colors = ["0.6" if n == "human" else palette[i % len(palette)] for i, n in enumerate(names)]
    for ax, (field, title) in zip(axes.flat, METRICS.items(), strict=True):
        values = [getattr(r, field) or 0.0 for r in results]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        if field == "perplexity":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_prompts(path: Path) -> tuple[list[str], list[str] | None]:
    """One prompt per line; a tab may separate a prompt from its true continuation (given for all or none)."""
    rows = [line.split("\t", 1) for line in read_prompt_file(path, "--prompts").splitlines() if line.strip()]
    with_ref = [len(r) == 2 for r in rows]
    if any(with_ref) and not all(with_ref):
        raise ValueError(f"--prompts: {path} gives a continuation (after a tab) for some prompts only")
    return [r[0] for r in rows], ([r[1] for r in rows] if rows and all(with_ref) else None)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: bundled)")
    parser.add_argument("--prompts", type=Path, help="one prompt per line, optionally TAB true continuation")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="generation dtype (scoring: fp32)")
    parser.add_argument("--out", type=Path, default=Path("compare-decoding"), help="folder for .md/.json/.png")


def run(args: argparse.Namespace) -> int:
    from ..bundled import load_model_and_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an int >= 1, got {args.max_new_tokens}")
    if args.prompts:
        prompts, refs = read_prompts(args.prompts)
    else:
        prompts, refs = [p for p, _ in DEFAULT_PROMPTS], [r for _, r in DEFAULT_PROMPTS]
    scorer, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model = optimize_for_decode(copy.deepcopy(scorer).to(DTYPES[args.dtype]))
    results = compare_decoding(
        model, tokenizer, prompts, refs, max_new_tokens=args.max_new_tokens, seed=args.seed, score_model=scorer
    )
    args.out.mkdir(parents=True, exist_ok=True)
    print_table(results)
    (args.out / "compare-decoding.md").write_text(to_markdown(results))
    doc = {
        "model": args.model or "bundled",
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "prompts": prompts,
        "results": [dataclasses.asdict(r) for r in results],
    }
    (args.out / "compare-decoding.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    plot(results, args.out / "compare-decoding.png")
    print(f"wrote {args.out}/compare-decoding.{{md,json,png}}")
    return 0
