"""Generation speed of a GLM-Large-shaped model on this CPU, beside Hugging Face GPT-2 of the same shape.

One run measures everything it compares, because this shared machine's speed moves by up to 2x between runs:
- the ceilings: memory read bandwidth (before and after the run, and right before each glmkit decode) and the
  bf16/fp32 matmul peaks;
- single-stream greedy decoding, 32-token prompt, 64 new tokens, in bf16 and fp32: glmkit ``generate()`` (which puts
  the model on glmkit's kernels itself) against two transformers models, each in its faster dtype on this CPU
  (a short probe of both picks it: without AVX-512 BF16, transformers' bf16 matmuls crawl): ``GPT2LMHeadModel``
  (random weights, 24 layers, hidden 1024, 16 heads, vocab 30592) and ``GlmForCausalLM`` (GLM-4 architecture,
  same size: 24 layers, hidden 1024, 16 heads of 64, 2 KV groups, FFN 2816, vocab 32000). Each runs twice: eager
  ``generate()`` with its default dynamic KV cache, and what transformers' docs give for speed — a static cache
  (``cache_implementation="static"``) with ``model.forward = torch.compile(model.forward)`` (the first round
  compiles). All interleaved, medians of ``--repeats``, timed end to end (prefill included) and per decoded token
  (from a streamer's timestamps, first token excluded);
- the decode roofline: measured bandwidth / weight bytes read per token (every parameter but the position tables,
  of which a step reads two rows; the KV cache adds ~2 % at these lengths and is not counted), against the higher
  of the before/after readings and, because this machine's bandwidth flips between ~50 and ~80 GB/s from minute
  to minute, also per round against the reading taken just before that round's decode (median of the rounds);
- aggregate decode tokens/s at batch 8 and 32, and prefill tokens/s of a 512-token prompt against the matmul peak
  (FLOPs = 2 · matmul parameters · tokens + 4 · layers · tokens² · hidden for the attention).

    python -m benchmarks.generate [--repeats 3] [--isa avx2|avx512] [--json out.json] [--smoke]

``--smoke`` runs every code path on a 2-layer model of hidden 64 with short prompts (a check that the script works,
in a minute or two; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import torch

from benchmarks.common import Clock, machine, matmul_peak_gflops, memory_bandwidth_gbs, select_isa
from glmkit import GLM, GLMConfig, KVCache, kernels
from glmkit.config import SpecialTokens
from glmkit.generate import generate
from glmkit.generate.engine import prefill
from glmkit.generate.fast import cache_dtype

V = 30592
SPECIAL = SpecialTokens(eos=30522, pad=30522, cls=30523, mask=30524, sop=30525, eop=30526, gmask=30527, smask=30528)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The models' size and the lengths measured."""

    layers: int = 24
    hidden: int = 1024
    heads: int = 16
    glm4_ffn: int = 2816
    prompt: int = 32
    new: int = 64
    prefill: int = 512
    batches: tuple[int, ...] = (8, 32)


# transformers' generation docs ("Static kv-cache and torch.compile"): a cache of fixed shape, so that the compiled
# forward runs one graph for every decode step
STATIC = {"cache_implementation": "static"}
SMOKE = Shape(layers=2, hidden=64, heads=4, glm4_ffn=176, prompt=8, new=8, prefill=32, batches=(2, 4))


def glm_prompt(rng: torch.Generator, n: int) -> list[int]:
    return [SPECIAL.cls] + torch.randint(1000, 30000, (n - 2,), generator=rng).tolist() + [SPECIAL.gmask]


def run_glm(model: GLM, prompts: list[list[int]], new: int) -> tuple[float, float]:
    """Greedy decode of ``new`` tokens for each prompt (one batch): (end-to-end, decode) aggregate tokens/s."""
    kw = dict(max_new_tokens=new, eos_token_id=V, special_tokens=SPECIAL)  # no stop id: always `new` tokens
    if len(prompts) == 1:
        clock = Clock()
        out = generate(model, prompts[0], streamer=clock, **kw)
        assert len(out.new_tokens[0]) == new
        return clock.rates()
    # a batch (transformers' streamer protocol is for one sequence): decode time = total - one prefill
    t = time.perf_counter()
    out = generate(model, prompts, **kw)
    total = time.perf_counter() - t
    t = time.perf_counter()
    prefill(model, prompts, KVCache.for_model(model, len(prompts), len(prompts[0]), dtype=cache_dtype(model)))
    first = time.perf_counter() - t
    n = sum(len(r) for r in out.new_tokens)
    return n / total, n / (total - first)


def batch_rates(model: GLM, prompts: list[list[int]], new: int) -> dict[str, float]:
    end_to_end, decode = run_glm(model, prompts, new)
    return {"tokens_per_s": end_to_end, "decode_tokens_per_s": decode}


def run_hf(model, ids: torch.Tensor, new: int, **generate_kw) -> tuple[float, float]:
    clock = Clock()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, streamer=clock, **generate_kw
    )
    assert out.shape[1] == ids.shape[1] + new
    return clock.rates()


def hf_baselines(shape: Shape) -> dict[str, torch.nn.Module]:
    """transformers' GPT-2 and GLM-4 (``GlmForCausalLM``) of ``shape``, random weights, fp32, no stop id."""
    from transformers import GlmConfig, GlmForCausalLM, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    L, H, NH = shape.layers, shape.hidden, shape.heads
    gpt2 = GPT2Config(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, n_positions=1024, bos_token_id=0)
    glm4 = GlmConfig(
        num_hidden_layers=L, hidden_size=H, num_attention_heads=NH, num_key_value_heads=2, head_dim=H // NH,
        intermediate_size=shape.glm4_ffn, vocab_size=32000, max_position_embeddings=1024, pad_token_id=0,
    )  # fmt: skip
    models = {"GPT-2": GPT2LMHeadModel(gpt2), "GlmForCausalLM": GlmForCausalLM(glm4)}
    for m in models.values():
        m.generation_config.eos_token_id = m.generation_config.pad_token_id = None  # always NEW tokens
        m.config.eos_token_id = m.config.pad_token_id = None
    return {k: m.eval() for k, m in models.items()}


def faster_dtype(model: torch.nn.Module, ids: torch.Tensor) -> tuple[str, torch.nn.Module, dict[str, float]]:
    """The baseline in the dtype it decodes faster in here (a 4-token probe of each after an 8-token prompt: bf16
    without AVX-512 BF16 is slow enough that more would take minutes), and the probe's rates."""
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    probe = {d: run_hf(m, ids[:, :8], new=4)[1] for d, m in variants.items()}
    best = max(probe, key=probe.get)
    return best, variants[best], probe


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (weights shared) with transformers' recipe for fast generation: ``forward`` compiled by
    ``torch.compile`` (its default inductor backend), to be called with ``cache_implementation="static"`` so that
    every decode step has the same shapes and reuses one compiled graph."""
    fast = copy.copy(model)  # a shallow copy: the eager baseline keeps its forward, the weights are not duplicated
    fast.forward = torch.compile(model.forward)
    return fast


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(("wpe", "wbpe")))


def prefill_rate(model: GLM, rng: torch.Generator, peak: float, n: int) -> dict[str, float]:
    """Tokens/s and matmul-peak fraction of one ``n``-token prefill."""
    row = glm_prompt(rng, n)
    cache = KVCache.for_model(model, 1, n, dtype=cache_dtype(model))
    prefill(model, [row], cache)  # warm-up
    t = time.perf_counter()
    cache.set_lengths([0])
    prefill(model, [row], cache)
    sec = time.perf_counter() - t
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2)
    matmul_params -= model.wte.weight.numel() + model.wpe.weight.numel() + model.wbpe.weight.numel()  # no head
    cfg = model.config
    flops = 2 * matmul_params * n + 4 * cfg.n_layer * n**2 * cfg.n_embd
    return {"tokens_per_s": n / sec, "gflops": flops / sec / 1e9, "fraction_of_peak": flops / sec / 1e9 / peak}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--isa", choices=["avx2", "avx512"], help="run glmkit's kernels built for this instruction set")
    ap.add_argument("--smoke", action="store_true", help="every code path on a tiny model (figures mean nothing)")
    args = ap.parse_args()
    select_isa(args.isa)
    shape = SMOKE if args.smoke else Shape()
    seconds = 0.2 if args.smoke else 3.0
    torch.manual_seed(0)
    rng = torch.Generator().manual_seed(0)
    bandwidth = [memory_bandwidth_gbs(seconds=seconds)]
    peaks = {"fp32": matmul_peak_gflops(torch.float32, seconds=seconds)}
    # without AVX-512 BF16, PyTorch's bf16 matmul crawls on one thread, and glmkit's AVX2 kernels multiply bf16
    # weights in fp32: there the fp32 peak is the bf16 path's ceiling
    peaks["bf16"] = matmul_peak_gflops(torch.bfloat16, seconds=seconds) if kernels.isa() == "avx512" else peaks["fp32"]
    cfg = GLMConfig(n_layer=shape.layers, n_embd=shape.hidden, n_head=shape.heads, vocab_size=V)
    glm32 = GLM(dataclasses.replace(cfg, max_sequence_length=1024)).eval()
    models = {"bf16": copy.deepcopy(glm32).to(torch.bfloat16), "fp32": glm32}
    prompt, hf_ids = glm_prompt(rng, shape.prompt), torch.randint(0, V, (1, shape.prompt), generator=rng)
    hf = {name: faster_dtype(m, hf_ids) for name, m in hf_baselines(shape).items()}
    # (dtype, model, generate() arguments) per baseline: eager with the default dynamic cache, static cache + compile
    hf_runs = {name: (d, m, {}) for name, (d, m, _) in hf.items()}
    hf_runs |= {f"{name} static+compile": (d, compiled(m), STATIC) for name, (d, m, _) in hf.items()}
    runs: dict[str, list] = {k: [] for k in [*models, *hf_runs, "bandwidth"]}
    for _ in range(args.repeats + 1):  # the first round warms up (and compiles)
        for name, (_, m, kw) in hf_runs.items():
            runs[name].append(run_hf(m, hf_ids, shape.new, **kw))
        for d, glm in models.items():
            runs["bandwidth"].append(memory_bandwidth_gbs(seconds=seconds / 3))
            runs[d].append(run_glm(glm, [prompt], shape.new))
    med = {k: [statistics.median(x[i] for x in runs[k][1:]) for i in (0, 1)] for k in [*models, *hf_runs]}
    baselines = {
        name: {"dtype": d, "generate_kwargs": kw, "tokens_per_s": med[name][0], "decode_tokens_per_s": med[name][1]}
        for name, (d, _, kw) in hf_runs.items()
    }
    for name, (_, _, probe) in hf.items():
        baselines[name]["probe_decode_tokens_per_s"] = probe
    single = {}
    for i, (d, glm) in enumerate(models.items()):
        nbytes = weight_bytes(glm)
        rounds = zip(runs[d][1:], runs["bandwidth"][len(models) + i :: len(models)], strict=True)
        paired = [g[1] * nbytes / (bw * 1e9) for g, bw in rounds]
        single[d] = {
            "glmkit_tokens_per_s": med[d][0],
            "glmkit_decode_tokens_per_s": med[d][1],
            "speedup_vs": {name: med[d][0] / b["tokens_per_s"] for name, b in baselines.items()},
            "decode_speedup_vs": {name: med[d][1] / b["decode_tokens_per_s"] for name, b in baselines.items()},
            "weight_bytes_per_token": nbytes,
            "paired_bandwidth_gbs": runs["bandwidth"][len(models) + i :: len(models)],
            "paired_roofline_fractions": paired,
            "paired_roofline_fraction": statistics.median(paired),
        }
    batches = {d: {b: batch_rates(glm, [glm_prompt(rng, shape.prompt) for _ in range(b)], shape.new)
                   for b in shape.batches}
               for d, glm in models.items()}  # fmt: skip
    prefills = {d: prefill_rate(glm, rng, peaks[d], shape.prefill) for d, glm in models.items()}
    bandwidth.append(memory_bandwidth_gbs(seconds=seconds))
    for s in single.values():
        s["roofline_tokens_per_s"] = max(bandwidth) * 1e9 / s["weight_bytes_per_token"]
        s["roofline_fraction"] = s["glmkit_decode_tokens_per_s"] / s["roofline_tokens_per_s"]
    summary = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "shape": dataclasses.asdict(shape),
        "bandwidth_gbs": bandwidth,
        "matmul_peak_gflops": peaks,
        "single_stream": single,
        "baselines": baselines,
        "batch": batches,
        "prefill": prefills,
    }
    report(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def report(r: dict) -> None:
    bw, peaks = r["bandwidth_gbs"], r["matmul_peak_gflops"]
    print(r["machine"])
    if r["shape"] != dataclasses.asdict(Shape()):
        print(f"shape {r['shape']} (not GLM-Large's: the figures below mean nothing)")
    print(f"bandwidth {bw[0]:.1f} / {bw[1]:.1f} GB/s (before / after); matmul peak bf16 {peaks['bf16']:.0f}, "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s")  # fmt: skip
    for name, b in r["baselines"].items():
        probe = b.get("probe_decode_tokens_per_s")
        probe = f" (probe decode tok/s: {', '.join(f'{d} {v:.1f}' for d, v in probe.items())})" if probe else ""
        print(f"transformers {name} in {b['dtype']}{probe}: {b['tokens_per_s']:.1f} tok/s, "
              f"decode {b['decode_tokens_per_s']:.1f}")  # fmt: skip
    for d, s in r["single_stream"].items():
        b, p = r["batch"][d], r["prefill"][d]
        vs = ", ".join(f"{s['speedup_vs'][n]:.2f}x {n}" for n in s["speedup_vs"])
        dec = ", ".join(f"{s['decode_speedup_vs'][n]:.2f}x {n}" for n in s["decode_speedup_vs"])
        print(
            f"{d}: glmkit {s['glmkit_tokens_per_s']:.1f} tok/s, decode {s['glmkit_decode_tokens_per_s']:.1f} = "
            f"{s['roofline_fraction']:.0%} of the {s['roofline_tokens_per_s']:.1f} tok/s roofline "
            f"({s['paired_roofline_fraction']:.0%} against each round's own bandwidth reading, "
            f"{' / '.join(f'{b:.0f}' for b in s['paired_bandwidth_gbs'])} GB/s)"
        )
        print(f"      end to end vs transformers: {vs}")
        print(f"      decode vs transformers: {dec}")
        batch = " / ".join(f"{b[n]['decode_tokens_per_s']:.0f}" for n in b)
        n = r["shape"]["prefill"]
        print(f"      batch {' / '.join(str(n) for n in b)}: {batch} tok/s decode; prefill {n}: "
              f"{p['tokens_per_s']:.0f} tok/s = {p['fraction_of_peak']:.0%} of the {d} matmul peak")  # fmt: skip


if __name__ == "__main__":
    main()
