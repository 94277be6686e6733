"""Training throughput of a GLM-Large-shaped model on this machine, beside Hugging Face GPT-2 of the same shape.

Same run, same batch (2 x 512 tokens), same dtype (bf16 autocast over fp32 master weights), same optimizer
(AdamW), dropout 0.1 (both configs' default, the paper's): glmkit's blank-infilling step (real collated batches:
Part A bidirectional, shuffled Part B) against ``GPT2LMHeadModel`` doing causal LM. Model FLOPs utilisation is
counted against a bf16 matmul peak measured in the same run, from the FLOPs each objective needs: 6 · non-embedding
params · tokens, + 6 · vocab · hidden per position that gets logits (every position for GPT-2, Part B for GLM),
+ the attention matmuls (12 · layers · seq · hidden per token).

    python -m benchmarks.pretrain [--steps 3] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from benchmarks.common import matmul_peak_gflops
from glmkit import GLM, GLMConfig
from glmkit.kernels.training import use_training_kernels
from glmkit.masks import collate, make_block_data
from glmkit.train.loop import batch_loss

L, H, NH, V, SEQ, BATCH = 24, 1024, 16, 30592, 512, 2


def glm_batches(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        samples = []
        for _ in range(BATCH):
            text = [101] + [rng.randrange(1000, 30000) for _ in range(SEQ - 49)]  # + 24 blanks and 24 sop = SEQ
            starts = sorted(rng.sample(range(1, len(text) - 5, 6), 24))
            spans = [(s, s + rng.randint(1, 4)) for s in starts]
            order = list(range(len(spans)))
            rng.shuffle(order)
            samples.append(make_block_data(text, spans, mask_id=103, sop_id=30522, eop_id=30523, order=order))
        b = collate(samples, pad_id=0, pad_to=SEQ)
        out.append(b)
    return out


def time_steps(step, batches, steps: int) -> float:
    step(batches[0])  # warm-up: kernel selection, allocator
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(batches[(i + 1) % len(batches)])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the glmkit model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak_gflops(torch.bfloat16)
    tokens = BATCH * SEQ

    cfg = GLMConfig(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, max_sequence_length=SEQ)
    glm = use_training_kernels(GLM(cfg).train())  # what glmkit's training loop runs
    glm_opt = torch.optim.AdamW(glm.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(glm) if args.compile else glm
    batches = glm_batches(3)

    def glm_step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(fwd, b)
        loss.backward()
        glm_opt.step()
        glm_opt.zero_grad(set_to_none=True)

    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, n_positions=SEQ)).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)
    hf_batches = [torch.randint(0, V, (BATCH, SEQ)) for _ in range(3)]

    def hf_step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    results = {}
    glm_logit_rows = statistics.mean(float((b["loss_mask"] > 0).sum()) for b in batches)
    runs = (("glmkit", glm_step, batches, glm, glm_logit_rows), ("hf_gpt2", hf_step, hf_batches, hf, tokens))
    for name, step, data, model, logit_rows in runs:
        params = sum(p.numel() for p in model.parameters())
        tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
        sec = time_steps(step, data, args.steps)
        flops = 6 * (params - tables) * tokens + 6 * V * H * logit_rows + 12 * L * SEQ * H * tokens
        results[name] = {
            "params": params,
            "sec_per_step": sec,
            "tokens_per_s": tokens / sec,
            "logit_rows": logit_rows,
            "mfu": flops / sec / 1e9 / peak,
        }
        print(f"{name:8s} {params / 1e6:6.1f} M params  {tokens / sec:7.1f} tok/s  MFU {results[name]['mfu']:.1%}")
    ratio = results["glmkit"]["tokens_per_s"] / results["hf_gpt2"]["tokens_per_s"]
    summary = {
        "bf16_matmul_peak_gflops": peak,
        "batch": [BATCH, SEQ],
        "compile": args.compile,
        **results,
        "speedup_vs_hf": ratio,
    }
    print(f"bf16 matmul peak {peak:.0f} GFLOP/s; glmkit / HF GPT-2 = {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
