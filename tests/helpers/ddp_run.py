"""Run 4 training steps of a tiny GLM; under torchrun each rank joins DDP or FSDP.

Usage: OUT GRAD_ACCUM LOSSES_JSON [ddp|fsdp]

Besides the losses, every rank writes ``OUT/rank-R.json`` (how many parameter elements it held after each
optimizer step, and the model's full count) and ``OUT/rank-R.pt`` (its local parameter tensors after the last
step), so a test can see that FSDP ranks hold only their shard and that the shards are what the checkpoint holds.
"""

import json
import sys
from pathlib import Path

import torch

from glmkit import GLM, GLMConfig
from glmkit.train import distributed
from glmkit.train.loop import TrainArgs, fit
from tests.helpers.synthetic import synthetic_source


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # FSDP2 parameters are DTensors sharded on dim 0


distributed.init_from_env()
torch.manual_seed(0)
cfg = GLMConfig(
    n_layer=2,
    n_embd=32,
    n_head=4,
    vocab_size=96,
    max_sequence_length=48,
    embedding_dropout=0.0,
    attention_dropout=0.0,
    output_dropout=0.0,
)
args = TrainArgs(
    out_dir=sys.argv[1],
    max_steps=4,
    grad_accum=int(sys.argv[2]),
    lr=3e-3,
    warmup=0.0,
    save_every=2,
    progress=False,
    precision="fp32",
    parallel=sys.argv[4] if len(sys.argv) > 4 else "ddp",
)
model = GLM(cfg)
full_numel = sum(p.numel() for p in model.parameters())
held: list[int] = []
# fully_shard converts ``model`` in place, so between steps its parameters are what this rank keeps in memory
hist = fit(
    model,
    args,
    synthetic_source(),
    on_step=lambda step, loss: held.append(sum(_local(p).numel() for p in model.parameters())),
)
rank = distributed.rank_world()[0]
out = Path(args.out_dir)
(out / f"rank-{rank}.json").write_text(json.dumps({"held_numel": held, "full_numel": full_numel}))
torch.save({n: _local(p).detach().clone() for n, p in model.named_parameters()}, out / f"rank-{rank}.pt")
if rank == 0:
    json.dump(hist.losses, open(sys.argv[3], "w"))
distributed.shutdown()
