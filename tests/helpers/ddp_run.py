"""Run 4 training steps of a tiny GLM; under torchrun each rank joins DDP or FSDP.

Usage: OUT GRAD_ACCUM LOSSES_JSON [ddp|fsdp]
"""

import json
import sys

import torch

from glmkit import GLM, GLMConfig
from glmkit.train import distributed
from glmkit.train.loop import TrainArgs, fit
from tests.helpers.synthetic import synthetic_source

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
hist = fit(GLM(cfg), args, synthetic_source())
if distributed.rank_world()[0] == 0:
    json.dump(hist.losses, open(sys.argv[3], "w"))
distributed.shutdown()
