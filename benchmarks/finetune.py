"""Fine-tuning methods on real text, offline: which part of the Bible a held-out verse comes from (issue 19 item 7).

The task is ``scripts/make_kjv_tasks.py``'s: six labels (law, history, wisdom, prophets, gospels, letters), training
verses from the chapters the bundled model was pretrained on, test verses only from its held-out chapters. Methods,
all on the bundled model (glmkit-small, 10 M parameters) and all trained by the one loop (``glmkit.finetune``):

- zero-shot cloze: the pattern ``{verse} These are the words of [MASK].`` scored by the verbalizer's logits at the
  blank (`` Moses``, `` kings``, `` David``, `` prophet``, `` Jesus``, `` Paul``: one token each), no training;
- cloze fine-tuning (PET / the GLM paper's NLU recipe): the same pattern and verbalizer, every weight trained;
- classification head: ``[CLS] verse <eos>`` → the pooled-[CLS] head (THUDM/GLM ``PoolingModel``), every weight;
- LoRA (r 8, every block linear) and P-tuning v2 (16 prefix tokens per layer): the cloze objective, base frozen.

Few-shot (``--shots``, default 16 and 64 training verses, balanced) over ``--seeds`` draws of the training verses,
and a larger training set (``--many``) for the cloze and head methods. Reported per method: test accuracy (mean and
range over seeds), trainable parameters, training wall-clock and training tokens/s (tokens of the batches fed,
padding excluded). A JSON file and a bar chart (``--png``).

    python -m benchmarks.finetune --tasks data/kjv-tasks [--shots 16,64] [--many 256] [--seeds 3] [--chosen F]
        [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine
from glmkit.bundled import load_model_and_tokenizer
from glmkit.finetune import BLANK, ClozeTask, FinetuneArgs, evaluate_task, finetune, read_jsonl, shortenable
from glmkit.finetune.classify import ClassificationTask, classification_model
from glmkit.finetune.peft import add_lora, add_prefix, count_parameters
from glmkit.train.loop import TrainArgs

# words the corpus ties to each division, one token each; pattern and words chosen by zero-shot accuracy on the
# validation verses (29.5 %, against 21.4 % for the division names " law", " kings", " wisdom", ...)
VERBALIZER = {"law": " Moses", "history": " kings", "wisdom": " David", "prophets": " prophet", "gospels": " Jesus",
              "letters": " Paul"}  # fmt: skip
CLOZE = ClozeTask(
    name="kjv-division",
    pattern=lambda row: [shortenable(row["text"]), " These are the words of", BLANK, "."],
    verbalizer=VERBALIZER,
)
HEAD = ClassificationTask(labels=tuple(VERBALIZER), name="kjv-division-head")
METHODS = ("cloze", "head", "lora", "prefix")
# the learning rates ``--sweep`` tries per method (full fine-tuning around GLM's small-model rates, adapters higher)
LR_GRID = {"cloze": (1e-5, 3e-5, 1e-4), "head": (1e-5, 3e-5, 1e-4), "lora": (3e-4, 1e-3, 3e-3),
           "prefix": (3e-3, 1e-2, 3e-2)}  # fmt: skip


def balanced(rows: list, n: int, seed: int) -> list:
    """``n`` training rows, as even over the labels as ``n`` allows, drawn with ``seed``."""
    rng = random.Random(seed)
    by_label = {lab: [r for r in rows if r.data["label"] == lab] for lab in VERBALIZER}
    out = []
    for i, lab in enumerate(VERBALIZER):
        out += rng.sample(by_label[lab], n // len(VERBALIZER) + (i < n % len(VERBALIZER)))
    rng.shuffle(out)
    return out


def run(method: str, lr: float, steps: int, warmup: int, batch: int, train: list, test: list, seed: int,
        workdir: Path, validation: list | None = None, eval_every: int = 0) -> dict:  # fmt: skip
    """Train ``method`` for ``steps`` at a constant ``lr`` after ``warmup`` steps (so that stopping at step k of a
    longer run is the same as a run of k steps), then its ``test`` accuracy; ``validation`` accuracy every
    ``eval_every`` steps on the way, when given."""
    base, tok = load_model_and_tokenizer()
    if method == "head":
        model, task = classification_model(base, HEAD, tok), HEAD
    elif method == "lora":
        model, task = add_lora(base), CLOZE
    elif method == "prefix":
        model, task = add_prefix(base, 16), CLOZE
    else:
        model, task = base, CLOZE
    params = count_parameters(model)
    items = task.prepare(tok, train, train=True)
    epochs = steps * batch / len(train)
    tokens = epochs * sum(len(it.ids) if method == "head" else sum(len(s.tokens) for s in it.samples) for it in items)
    out = workdir / f"{method}-{seed}-{len(train)}"
    shutil.rmtree(out, ignore_errors=True)
    # the scheduler wants warm-up shorter than the run: a run that stops when warm-up ends keeps 1 % of a step
    targs = TrainArgs(out_dir=str(out), lr=lr, max_steps=steps, micro_batch_size=batch,
                      warmup=min(0.99, warmup / steps),
                      decay_style="constant", precision="fp32", eval_every=eval_every or 10_000, save_every=10_000,
                      progress=False, seed=seed)  # fmt: skip
    start = time.perf_counter()
    history = finetune(model, tok, task, train, validation, FinetuneArgs(train=targs), resume=False)
    seconds = time.perf_counter() - start
    accuracy = evaluate_task(model, tok, task, test)["accuracy"] if test else None
    return {"method": method, "shots": len(train), "seed": seed, "lr": lr, "steps": steps, "accuracy": accuracy,
            "validation": [(e["step"], e["accuracy"]) for e in history.evals], "trainable": params.trainable,
            "total": params.total, "seconds": seconds, "tokens_per_s": tokens / seconds}  # fmt: skip


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((r["method"], r["shots"]) for r in results):
        rs = [r for r in results if (r["method"], r["shots"]) == key]
        acc = [r["accuracy"] for r in rs]
        rows.append({"method": key[0], "shots": key[1], "runs": len(rs), "accuracy": statistics.mean(acc),
                     "accuracy_min": min(acc), "accuracy_max": max(acc), "trainable": rs[0]["trainable"],
                     "seconds": statistics.mean(r["seconds"] for r in rs),
                     "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in rs)})  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['method']}\n{r['shots']} shots" if r["shots"] else "zero-shot\ncloze" for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    err = [
        [100 * (r["accuracy"] - r["accuracy_min"]) for r in rows],
        [100 * (r["accuracy_max"] - r["accuracy"]) for r in rows],
    ]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["#888" if r["method"] == "zero-shot" else "#2a6fdb" if r["method"] != "head" else "#d9822b" for r in rows]
    ax.bar(labels, acc, yerr=err, capsize=4, color=colors)
    ax.axhline(100 / len(VERBALIZER), color="k", ls=":", lw=1, label="chance (6 labels)")
    ax.set_ylabel("test accuracy, held-out chapters (%)")
    ax.set_title("Which part of the Bible? glmkit-small, fine-tuning methods (range over seeds)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=Path, required=True, help="scripts/make_kjv_tasks.py's output folder")
    ap.add_argument("--shots", default="16,64", help="comma-separated few-shot training set sizes")
    ap.add_argument("--many", type=int, default=256, help="the larger training set (0: skip)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=float, default=20, help="the longest few-shot run the sweep tries, in epochs")
    ap.add_argument("--many-epochs", type=float, default=5, help="epochs of the larger training set's runs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--per-label", type=int, default=40, help="validation verses per label (at most) to choose on")
    ap.add_argument("--chosen", type=Path, default=None, help="a JSON file of earlier choices: skip the sweep")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_all = read_jsonl(args.tasks / "train.jsonl")
    # the validation verses' labels are far from even (18 of 672 are wisdom): choosing on them as they come would
    # reward a model that never says wisdom, so at most --per-label of each
    validation = list(read_jsonl(args.tasks / "validation.jsonl"))
    random.Random(1).shuffle(validation)
    validation = [r for lab in VERBALIZER for r in [v for v in validation if v.data["label"] == lab][: args.per_label]]
    test = read_jsonl(args.tasks / "test.jsonl")
    shots = [int(n) for n in args.shots.split(",")]
    with tempfile.TemporaryDirectory(prefix="glmkit-ft-") as tmp:
        sweep, chosen = [], {}
        if args.chosen:
            given = json.loads(args.chosen.read_text())
            chosen = {(m, int(n)): c for key, c in given["chosen"].items() for m, n in [key.split("/")]}
            sweep = given.get("sweep", [])
        for n, method in ((n, m) for n in shots for m in METHODS if (m, n) not in chosen):
            # learning rate and number of steps chosen per method and training-set size on validation verses
            # (seed 0's training draw): one run per rate to ``--epochs``, evaluated every other epoch
            per_epoch = -(-n // args.batch)
            longest, warmup = round(args.epochs * per_epoch), max(1, round(0.1 * args.epochs * per_epoch))
            for lr in LR_GRID[method]:
                r = run(method, lr, longest, warmup, args.batch, balanced(train_all, n, 0), [], 0, Path(tmp),
                        validation, 2 * per_epoch)  # fmt: skip
                sweep.append(r)
                print(f"sweep {method:7s} {n:4d} shots lr {lr:g}: validation accuracy by step {r['validation']}",
                      flush=True)  # fmt: skip
            tried = sweep[-len(LR_GRID[method]) :]
            best = max((acc, -step, r["lr"]) for r in tried for step, acc in r["validation"])
            chosen[method, n] = {"lr": best[2], "steps": -best[1], "warmup": warmup, "validation": best[0]}
            print(f"chosen {method} {n}: {chosen[method, n]}", flush=True)
        model, tok = load_model_and_tokenizer()
        zero = evaluate_task(model, tok, CLOZE, test)
        results = [{"method": "zero-shot", "shots": 0, "seed": 0, "accuracy": zero["accuracy"], "trainable": 0,
                    "total": count_parameters(model).total, "seconds": 0.0, "tokens_per_s": 0.0}]  # fmt: skip
        zero_validation = evaluate_task(model, tok, CLOZE, validation)["accuracy"]
        print(f"zero-shot cloze: test {zero['accuracy']:.3f}, validation {zero_validation:.3f}", flush=True)
        plan = [(m, n, s, chosen[m, n]["lr"], chosen[m, n]["steps"], chosen[m, n]["warmup"])
                for n in shots for s in range(args.seeds) for m in METHODS]  # fmt: skip
        if args.many:
            steps = round(args.many_epochs * -(-args.many // args.batch))
            plan += [
                (m, args.many, 0, chosen[m, max(shots)]["lr"], steps, round(0.1 * steps)) for m in ("cloze", "head")
            ]
        for method, n, seed, lr, steps, warmup in plan:
            r = run(method, lr, steps, warmup, args.batch, balanced(train_all, n, seed), test, seed, Path(tmp))
            results.append(r)
            print(f"{method:7s} {n:4d} shots seed {seed} lr {lr:g} {steps} steps: accuracy {r['accuracy']:.3f}, "
                  f"trainable {r['trainable']:,}, {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s",
                  flush=True)  # fmt: skip
    rows = summarize(results)
    print(machine())
    for r in rows:
        print(f"{r['method']:9s} {r['shots']:4d} shots x{r['runs']}: {100 * r['accuracy']:.1f} % "
              f"({100 * r['accuracy_min']:.1f}-{100 * r['accuracy_max']:.1f}), trainable {r['trainable']:,}, "
              f"{r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "test_rows": len(test), "runs": results, "sweep": sweep,
                                         "zero_shot_validation": zero_validation,
                                         "chosen": {f"{m}/{n}": c for (m, n), c in chosen.items()},
                                         "summary": rows}, indent=2) + "\n")  # fmt: skip
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
