"""The GLM paper's SuperGLUE recipe on a local copy of SuperGLUE and a released GLM checkpoint (not run in CI).

Each task is fine-tuned as a cloze question with GLM's default pattern and verbalizer (``glmkit.finetune.superglue``,
THUDM/GLM ``tasks/superglue/pvp.py``) and the hyper-parameters of THUDM/GLM's ``scripts/finetune_superglue.sh`` with
``config_tasks/task_*.sh`` for GLM-Large: lr 1e-5, linear decay, warmup 0.1, weight decay 0.1, batch 16 (64 for
MultiRC and ReCoRD), at most 256 tokens (512 for MultiRC and ReCoRD, 128 for WSC), the epochs below; the dev
checkpoint with the best first metric is kept. The paper reports GLM-Large at 77.0 SuperGLUE average (dev).

    python scripts/superglue_glm.py --data SuperGLUE/ --model glm-large/ --out runs/superglue [--tasks rte,cb]

``--data`` holds the official task folders (``BoolQ/``, ``CB/``, ``COPA/``, ``MultiRC/``, ``ReCoRD/``, ``RTE/``,
``WiC/``, ``WSC/``, each with ``train.jsonl`` and ``val.jsonl``; lower-case names work too); ``--model`` is a GLM
checkpoint folder ``GLM.from_pretrained`` reads (e.g. THUDM's ``glm-large`` hub folder, downloaded beforehand). On a
CPU this takes days for the large tasks; ``--epochs-scale`` and ``--limit`` shorten a trial run (the bundled model
needs ``--multi-token``: its tokenizer splits `` Yes``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmkit.bundled import load_model_and_tokenizer
from glmkit.finetune import FinetuneArgs, evaluate_task, finetune, load_split, superglue_task
from glmkit.finetune.superglue import TASKS
from glmkit.train.loop import TrainArgs

EPOCHS = {"record": 5, "copa": 50, "wsc": 50, "rte": 50, "boolq": 20, "wic": 30, "cb": 50, "multirc": 15}
BATCH = {"multirc": 64, "record": 64}
MAX_LENGTH = {"multirc": 512, "record": 512, "wsc": 128}
FOLDERS = {"boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD", "rte": "RTE",
           "wic": "WiC", "wsc": "WSC"}  # fmt: skip


def task_folder(data: Path, task: str) -> Path:
    for name in (FOLDERS[task], task):
        if (data / name / "train.jsonl").is_file():
            return data / name
    sys.exit(f"--data: no {FOLDERS[task]}/train.jsonl (or {task}/train.jsonl) under {data}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default=None, help="GLM checkpoint folder (default: the bundled model)")
    ap.add_argument("--out", type=Path, default=Path("runs/superglue"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply the recipe's epochs (a trial run)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many rows per split (a trial run)")
    ap.add_argument("--multi-token", action="store_true", help="score verbalizer words by span likelihood (a tokenizer "
                    "that splits ' Yes' / ' No', e.g. the bundled model's)")  # fmt: skip
    args = ap.parse_args()
    tasks = [t.strip().lower() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        ap.error(f"--tasks: unknown {unknown}; known: {', '.join(TASKS)}")
    results = {}
    for name in tasks:
        folder = task_folder(args.data, name)
        train, dev = load_split(folder, "train")[: args.limit], load_split(folder, "val")[: args.limit]
        model, tok = load_model_and_tokenizer(args.model)
        task = superglue_task(
            name, max_length=MAX_LENGTH.get(name, 256), **({"multi_token": True} if args.multi_token else {})
        )
        targs = TrainArgs(
            out_dir=str(args.out / name), lr=1e-5, decay_style="linear", decay_ratio=0.0, warmup=0.1,
            weight_decay=0.1, micro_batch_size=BATCH.get(name, 16), eval_every=max(1, len(train) // 16),
            save_every=max(1, len(train) // 16), best_metric=task.metric_names[0],
        )  # fmt: skip
        finetune(model, tok, task, train, dev, FinetuneArgs(epochs=EPOCHS[name] * args.epochs_scale, train=targs))
        best, _ = load_model_and_tokenizer(str(args.out / name / "best"))
        results[name] = evaluate_task(best, tok, task, dev)
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[name].items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dev_metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"dev metrics -> {args.out / 'dev_metrics.json'}")


if __name__ == "__main__":
    main()
