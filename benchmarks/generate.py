"""Generation speed of a GLM-Large-shaped model on this CPU, beside Hugging Face GPT-2 of the same shape.

One run measures everything it compares, because this shared machine's speed moves by up to 2x between runs:
- the ceilings: memory read bandwidth (before and after the run, and right before each glmkit decode) and the
  bf16/fp32 matmul peaks;
- single-stream greedy decoding, 32-token prompt, 64 new tokens, in bf16 and fp32: glmkit ``generate()`` (bf16
  through ``optimize_for_decode``) and transformers ``GPT2LMHeadModel.generate()`` (random weights, 24 layers,
  hidden 1024, 16 heads, vocab 30592), interleaved, medians of ``--repeats``. Both are timed end to end (prefill
  included) and per decoded token (from a streamer's timestamps, first token excluded);
- the decode roofline: measured bandwidth / weight bytes read per token (every parameter but the position tables,
  of which a step reads two rows; the KV cache adds ~2 % at these lengths and is not counted), against the higher
  of the before/after readings and, because this machine's bandwidth flips between ~50 and ~80 GB/s from minute
  to minute, also per round against the reading taken just before that round's decode (median of the rounds);
- aggregate decode tokens/s at batch 8 and 32, and prefill tokens/s of a 512-token prompt against the matmul peak
  (FLOPs = 2 · matmul parameters · tokens + 4 · layers · tokens² · hidden for the attention).

    python -m benchmarks.generate [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from benchmarks.common import matmul_peak_gflops, memory_bandwidth_gbs
from glmkit import GLM, GLMConfig, KVCache
from glmkit.config import SpecialTokens
from glmkit.generate import generate
from glmkit.generate.engine import prefill
from glmkit.generate.fast import cache_dtype, optimize_for_decode

L, H, NH, V = 24, 1024, 16, 30592
PROMPT, NEW, PREFILL = 32, 64, 512
SPECIAL = SpecialTokens(eos=30522, pad=30522, cls=30523, mask=30524, sop=30525, eop=30526, gmask=30527, smask=30528)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Clock:
    """A transformers-style streamer that timestamps every generated token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.start, self.stamps = time.perf_counter(), []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps = self.stamps[1:]

    def rates(self) -> tuple[float, float]:
        """(end-to-end tokens/s, decode tokens/s after the first token)."""
        n = len(self.stamps)
        return n / (self.stamps[-1] - self.start), (n - 1) / (self.stamps[-1] - self.stamps[0])


def glm_prompt(rng: torch.Generator, n: int) -> list[int]:
    return [SPECIAL.cls] + torch.randint(1000, 30000, (n - 2,), generator=rng).tolist() + [SPECIAL.gmask]


def run_glm(model: GLM, prompts: list[list[int]]) -> tuple[float, float]:
    """Greedy decode of ``NEW`` tokens for each prompt (one batch): (end-to-end, decode) aggregate tokens/s."""
    kw = dict(max_new_tokens=NEW, eos_token_id=V, special_tokens=SPECIAL)  # no stop id: always NEW tokens
    if len(prompts) == 1:
        clock = Clock()
        out = generate(model, prompts[0], streamer=clock, **kw)
        assert len(out.new_tokens[0]) == NEW
        return clock.rates()
    # a batch (transformers' streamer protocol is for one sequence): decode time = total - one prefill
    t = time.perf_counter()
    out = generate(model, prompts, **kw)
    total = time.perf_counter() - t
    t = time.perf_counter()
    prefill(model, prompts, KVCache.for_model(model, len(prompts), PROMPT, dtype=cache_dtype(model)))
    first = time.perf_counter() - t
    n = sum(len(r) for r in out.new_tokens)
    return n / total, n / (total - first)


def batch_rates(model: GLM, prompts: list[list[int]]) -> dict[str, float]:
    end_to_end, decode = run_glm(model, prompts)
    return {"tokens_per_s": end_to_end, "decode_tokens_per_s": decode}


def run_hf(model, ids: torch.Tensor) -> tuple[float, float]:
    clock = Clock()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, streamer=clock)
    assert out.shape[1] == ids.shape[1] + NEW
    return clock.rates()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(("wpe", "wbpe")))


def prefill_rate(model: GLM, rng: torch.Generator, peak: float) -> dict[str, float]:
    row = glm_prompt(rng, PREFILL)
    cache = KVCache.for_model(model, 1, PREFILL, dtype=cache_dtype(model))
    prefill(model, [row], cache)  # warm-up
    t = time.perf_counter()
    cache.set_lengths([0])
    prefill(model, [row], cache)
    sec = time.perf_counter() - t
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    matmul_params -= model.wte.weight.numel() + model.wpe.weight.numel() + model.wbpe.weight.numel()  # no head
    flops = 2 * matmul_params * PREFILL + 4 * L * PREFILL**2 * H
    return {"tokens_per_s": PREFILL / sec, "gflops": flops / sec / 1e9, "fraction_of_peak": flops / sec / 1e9 / peak}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    bandwidth = [memory_bandwidth_gbs()]
    peaks = {"bf16": matmul_peak_gflops(torch.bfloat16), "fp32": matmul_peak_gflops(torch.float32)}

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    hf_cfg = GPT2Config(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, n_positions=1024, bos_token_id=0)
    hf_cfg.eos_token_id = hf_cfg.pad_token_id = None  # no stop id: always 64 tokens
    hf32 = GPT2LMHeadModel(hf_cfg).eval()
    glm32 = GLM(GLMConfig(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, max_sequence_length=1024)).eval()
    models = {
        "bf16": (optimize_for_decode(copy.deepcopy(glm32).to(torch.bfloat16)), copy.deepcopy(hf32).to(torch.bfloat16)),
        "fp32": (optimize_for_decode(glm32), hf32),
    }
    prompt, hf_ids = glm_prompt(rng, PROMPT), torch.randint(0, V, (1, PROMPT), generator=rng)
    runs: dict[str, dict[str, list]] = {d: {"glmkit": [], "hf": [], "bandwidth": []} for d in models}
    for _ in range(args.repeats + 1):  # the first round warms up
        for d, (glm, hf) in models.items():
            runs[d]["hf"].append(run_hf(hf, hf_ids))
            runs[d]["bandwidth"].append(memory_bandwidth_gbs(seconds=1.0))
            runs[d]["glmkit"].append(run_glm(glm, [prompt]))
    single = {}
    for d, (glm, _) in models.items():
        med = {k: [statistics.median(x[i] for x in runs[d][k][1:]) for i in (0, 1)] for k in ("glmkit", "hf")}
        nbytes = weight_bytes(glm)
        rounds = zip(runs[d]["glmkit"][1:], runs[d]["bandwidth"][1:], strict=True)
        paired = [g[1] * nbytes / (bw * 1e9) for g, bw in rounds]
        single[d] = {
            "glmkit_tokens_per_s": med["glmkit"][0],
            "glmkit_decode_tokens_per_s": med["glmkit"][1],
            "hf_tokens_per_s": med["hf"][0],
            "hf_decode_tokens_per_s": med["hf"][1],
            "speedup_vs_hf": med["glmkit"][0] / med["hf"][0],
            "weight_bytes_per_token": nbytes,
            "paired_bandwidth_gbs": runs[d]["bandwidth"][1:],
            "paired_roofline_fractions": paired,
            "paired_roofline_fraction": statistics.median(paired),
        }
    batches = {d: {b: batch_rates(glm, [glm_prompt(rng, PROMPT) for _ in range(b)]) for b in (8, 32)}
               for d, (glm, _) in models.items()}  # fmt: skip
    prefills = {d: prefill_rate(glm, rng, peaks[d]) for d, (glm, _) in models.items()}
    bandwidth.append(memory_bandwidth_gbs())
    for s in single.values():
        s["roofline_tokens_per_s"] = max(bandwidth) * 1e9 / s["weight_bytes_per_token"]
        s["roofline_fraction"] = s["glmkit_decode_tokens_per_s"] / s["roofline_tokens_per_s"]
        s["hf_roofline_fraction"] = s["hf_decode_tokens_per_s"] / s["roofline_tokens_per_s"]
    summary = {
        "threads": torch.get_num_threads(),
        "bandwidth_gbs": bandwidth,
        "matmul_peak_gflops": peaks,
        "single_stream": single,
        "batch": batches,
        "prefill_512": prefills,
    }
    report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def report(r: dict) -> None:
    bw, peaks = r["bandwidth_gbs"], r["matmul_peak_gflops"]
    print(f"bandwidth {bw[0]:.1f} / {bw[1]:.1f} GB/s (before / after); matmul peak bf16 {peaks['bf16']:.0f}, "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s; {r['threads']} threads")  # fmt: skip
    for d, s in r["single_stream"].items():
        b, p = r["batch"][d], r["prefill_512"][d]
        print(
            f"{d}: glmkit {s['glmkit_tokens_per_s']:.1f} tok/s, decode {s['glmkit_decode_tokens_per_s']:.1f} = "
            f"{s['roofline_fraction']:.0%} of the {s['roofline_tokens_per_s']:.1f} tok/s roofline "
            f"({s['paired_roofline_fraction']:.0%} against each round's own bandwidth reading, "
            f"{' / '.join(f'{b:.0f}' for b in s['paired_bandwidth_gbs'])} GB/s) | HF GPT-2 "
            f"{s['hf_tokens_per_s']:.1f}, decode {s['hf_decode_tokens_per_s']:.1f} | {s['speedup_vs_hf']:.2f}x HF"
        )
        batch = " / ".join(f"{b[n]['decode_tokens_per_s']:.0f}" for n in (8, 32))
        print(f"      batch 8 / 32: {batch} tok/s decode; prefill 512: {p['tokens_per_s']:.0f} tok/s = "
              f"{p['fraction_of_peak']:.0%} of the {d} matmul peak")  # fmt: skip


if __name__ == "__main__":
    main()
