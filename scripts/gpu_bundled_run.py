"""Pretrain the bundled model's recipe on a GPU for a fixed wall-clock budget (the run behind the shipped weights).

Calibrates the step time with a short run, sizes ``max_steps`` to fit ``--budget`` seconds (so the lr schedule
anneals fully), runs ``configs/glmkit-small.yaml`` with the overrides below, then writes the final model in bf16.
Usage: python scripts/gpu_bundled_run.py OUT_DIR [--budget 400] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from glmkit import GLM
from glmkit.train.pretrain import load_config, pretrain

GPU_RECIPE = [
    "train.micro_batch_size=128",
    "train.lr=6.0e-4",
    "train.warmup=0.02",
    "train.eval_every=500",
    "train.log_every=50",
    "train.progress=false",
    "model.embedding_dropout=0.1",
    "model.attention_dropout=0.1",
    "model.output_dropout=0.1",
]


def step_seconds(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [(r["step"], r["time"]) for r in rows if "loss" in r]
    (s0, t0), (s1, t1) = steps[len(steps) // 2], steps[-1]
    return (t1 - t0) / (s1 - s0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds of training steps")
    ap.add_argument("--set", nargs="*", default=[])
    a = ap.parse_args()
    recipe = GPU_RECIPE + a.set
    cal = Path(a.out) / "calibrate"
    cfg = load_config(
        "configs/glmkit-small.yaml",
        recipe + [f"train.out_dir={cal}", "train.max_steps=60", "train.log_every=10", "train.save_every=60"],
    )
    pretrain(cfg, resume=False)
    dt = step_seconds(cal / "metrics.jsonl")
    steps = max(100, int(a.budget / (dt * 1.08)))  # ~8 % for the held-out evaluations
    print(f"step {dt * 1000:.1f} ms -> {steps} steps", flush=True)
    run = Path(a.out) / "run"
    cfg = load_config(
        "configs/glmkit-small.yaml",
        recipe + [f"train.out_dir={run}", f"train.max_steps={steps}", f"train.save_every={steps}"],
    )
    t = time.time()
    pretrain(cfg, resume=False)
    print(f"trained {steps} steps in {time.time() - t:.0f} s", flush=True)
    GLM.from_pretrained(run / "final").to(torch.bfloat16).save_pretrained(Path(a.out) / "packed")


if __name__ == "__main__":
    main()
