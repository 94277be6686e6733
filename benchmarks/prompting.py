"""Knowledge-guided prompting on the bundled model, offline (issue 21 item 4): each Med-PaLM technique's effect.

The questions are ``scripts/make_kjv_questions.py``'s: four-way multiple choice on who begat / said / went / whose
son, from the chapters the bundled model never trained on; the exemplars come from trained chapters; the knowledge is
every verse, retrieved by BM25. Every configuration is one ``glmkit prompt-eval`` run (``prompt_eval``), the
template ``mc-en`` with the domain "the King James Bible", each adding one technique to the one before:

- zero-shot: the instruction and the question, each option scored by log-likelihood: by default its text after
  "Answer:" per character (``--option-mode text --normalise char``, lm-eval's ``acc_norm``), since a model that
  never saw lettered options picks one letter for every question (``--option-mode letter``);
- few-shot: + ``--shots`` exemplars chosen by similarity, stratified by book and question type;
- + knowledge: + the ``--snippets`` verses BM25 ranks first for the question, numbered, with their citations;
- + self-consistency: the same prompt, ``--samples`` answers sampled at temperature 0.7, the plurality vote (its
  share of the votes is the confidence);
- + soft prompt: the few-shot + knowledge prompt with a soft prompt (``--virtual`` tokens, instruction prompt
  tuning, ``glmkit.prompting.tuning``) learned on the exemplar pool's own prompts (each exemplar asked with the
  others as its shots), the model frozen.

Reported per configuration: accuracy with its 95 % bootstrap interval, and the accuracy at 50 % coverage when the
model answers only the half of the questions it is most confident of (selective prediction), with its interval.
A JSON summary and a bar chart (``--png``). The bundled model reads 256 positions (240 beside the soft prompt): a
prompt longer than that loses its beginning (``truncate="left"``; the question is at its end), which the defaults of
two shots and one snippet make rare.

    python scripts/make_kjv_questions.py data/kjv-questions
    python -m benchmarks.prompting --questions data/kjv-questions --out runs/prompting [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine
from glmkit.bundled import load_model_and_tokenizer
from glmkit.prompting.cli import PromptEvalOptions, load_exemplars, prompt_eval
from glmkit.prompting.exemplars import SimilaritySelector
from glmkit.prompting.knowledge import BM25Knowledge
from glmkit.prompting.scoring import option_requests
from glmkit.prompting.templates import load_template
from glmkit.prompting.tuning import SoftPromptConfig, tune_soft_prompt

DOMAIN = "the King James Bible"


def soft_prompt(folder: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Tune a soft prompt on the exemplar pool, each exemplar asked the way the test questions are."""
    template = load_template("mc-en").with_defaults(domain=DOMAIN)
    pool = load_exemplars(folder / "exemplars.jsonl")
    selector = SimilaritySelector(pool, seed=args.seed)
    knowledge = BM25Knowledge.from_jsonl(folder / "verses.jsonl")
    model, tok = load_model_and_tokenizer()
    room = model.config.n_positions - args.virtual - 2  # [CLS] and the blank
    examples = []
    for ex in pool:
        q = ex.question
        for shots in range(args.shots, -1, -1):  # fewer shots where the prompt would not fit beside the soft prompt
            prompt = template.render(q, selector.select(q, shots), knowledge.retrieve(q.question, args.snippets))
            if len(tok.encode(prompt)) <= room:
                break
        examples.append(option_requests(template, q, prompt, args.option_mode)[str(q.answer)])
    out = args.out / "soft-prompt"
    config = SoftPromptConfig(n_virtual=args.virtual, steps=args.tune_steps)
    start = time.perf_counter()
    tune_soft_prompt(model, tok, examples, out, config, progress=True)
    return out / "prefix", {"examples": len(examples), "seconds": time.perf_counter() - start,
                            **dataclasses.asdict(config)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=Path, required=True, help="scripts/make_kjv_questions.py's output folder")
    ap.add_argument("--out", type=Path, required=True, help="one prompt-eval folder per configuration goes here")
    ap.add_argument("--shots", type=int, default=2)
    ap.add_argument("--snippets", type=int, default=1)
    ap.add_argument("--samples", type=int, default=11, help="self-consistency's sampled answers per question")
    ap.add_argument("--virtual", type=int, default=16, help="soft prompt length (virtual tokens)")
    ap.add_argument("--tune-steps", type=int, default=200)
    ap.add_argument("--option-mode", choices=("letter", "text"), default="text", help="what log-likelihood scores")
    ap.add_argument("--normalise", choices=("none", "token", "char"), default="char")
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.questions
    few = {"shots": args.shots, "exemplars": q / "exemplars.jsonl"}
    knowledge = few | {"snippets": args.snippets, "knowledge": q / "verses.jsonl"}
    configs: list[tuple[str, dict[str, Any] | None]] = [
        ("zero-shot", {}),
        ("few-shot", few),
        ("+ knowledge", knowledge),
        ("+ self-consistency", knowledge | {"method": "self-consistency", "samples": args.samples}),
    ]
    rows, tuning = [], {}
    for name, extra in [*configs, ("+ soft prompt", None)]:
        if extra is None:  # tuned last, so that the hard-prompt figures come first
            prefix, tuning = soft_prompt(q, args)
            extra = knowledge | {"prefix": prefix}
        folder = args.out / name.strip("+ ").replace(" ", "-")
        opts = PromptEvalOptions(data=q / "questions.jsonl", out=folder, domain=DOMAIN, limit=args.limit,
                                 seed=args.seed, truncate="left", option_mode=args.option_mode,
                                 normalise=args.normalise, progress=False, **extra)  # fmt: skip
        start = time.perf_counter()
        report = prompt_eval(opts)
        half = report["accuracy_at_coverage"]["0.5"]
        rows.append({"config": name, "n": report["n"], "accuracy": report["accuracy"]["value"],
                     "ci95": report["accuracy"]["ci95"], "at_half_coverage": half["value"],
                     "at_half_ci95": half["ci95"], "unparsed": report["unparsed"], "failed": report["failed"],
                     "ece": report["ece"]["uniform"], "brier": report["brier"],
                     "seconds": time.perf_counter() - start, "folder": str(folder)})  # fmt: skip
        r = rows[-1]
        print(f"{name:20s} n {r['n']}: accuracy {100 * r['accuracy']:.1f} % ({100 * r['ci95'][0]:.1f}-"
              f"{100 * r['ci95'][1]:.1f}), at 50 % coverage {100 * r['at_half_coverage']:.1f} % "
              f"({100 * r['at_half_ci95'][0]:.1f}-{100 * r['at_half_ci95'][1]:.1f}), unparsed {r['unparsed']}, "
              f"{r['seconds']:.0f} s", flush=True)  # fmt: skip
    print(machine())
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "tuning": tuning, "rows": rows}, indent=2) + "\n")
    if args.png:
        plot(rows, args.png)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ((-0.2, "accuracy", "ci95", "all questions", "#2a6fdb"),
            (0.2, "at_half_coverage", "at_half_ci95", "most confident 50 %", "#d9822b"))  # fmt: skip
    for shift, key, ci, label, color in bars:
        value = [100 * r[key] for r in rows]
        err = [[100 * (r[key] - r[ci][0]) for r in rows], [100 * (r[ci][1] - r[key]) for r in rows]]
        ax.bar([i + shift for i in x], value, width=0.4, yerr=err, capsize=3, color=color, label=label)
    ax.axhline(25, color="k", ls=":", lw=1, label="chance (4 options)")
    ax.set_xticks(list(x), [r["config"] for r in rows])
    ax.set_ylabel("accuracy, held-out chapters (%)")
    ax.set_title("Knowledge-guided prompting, glmkit-small (95 % bootstrap intervals)")
    ax.set_ylim(0, 80)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
