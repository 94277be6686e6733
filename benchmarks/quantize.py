"""Weight-only INT8 / INT4 against bf16 on this CPU: decode speed and resident memory, and, for a trained checkpoint
and its prepared data, what quantization costs in accuracy.

Speed and memory (default). A GLM-Large-shaped model (24 layers, hidden 1024, 16 heads, vocab 30592, random
weights) is saved as a bf16 checkpoint and quantized with ``quantize_checkpoint`` (int8; int4 with groups of 32;
both as ``glmkit quantize`` does by default, word embeddings / tied head included, and with them kept in bf16,
"bf16 emb" = ``--no-quantize-embeddings``).
Every variant runs in a subprocess of its own, so its resident memory (RSS) is its own; all are loaded with
``GLM.from_pretrained(dtype=bf16)``. "model MiB" is what RSS grows by from loading and running the model, over the
same process after it ran the engine and kernels on a tiny model (the runtime's own libraries and caches). The
variants decode one at a time, interleaved, for ``--rounds`` rounds (medians): single-stream greedy
``glmkit.generate``, 32-token prompt, ``--new`` tokens, decode tokens/s from a streamer's timestamps (first token
excluded). bf16 runs twice: with the stock ``F.linear`` (``GLMKIT_KERNELS=0``) and with glmkit's kernels
(``glmkit.kernels.replace_linear``), the baseline the goals are stated against. The roofline is the memory
bandwidth measured in the same run divided by the bytes a decode step reads; "matmul ms" times a step's matmuls
alone (every linear layer and the head on one token), "rest ms" is the remainder of the step.

    python -m benchmarks.quantize [--rounds 3] [--new 64] [--threads N] [--isa avx2|avx512] [--json out.json]

Accuracy (``--model DIR --data DIR``, a checkpoint folder and the ``glmkit prepare-data`` folder it was trained
on): held-out blank-infilling loss per objective (``glmkit.train.loop.evaluate`` on ``batch_sources`` batches) in
fp32, int8 and int4 (group 32), each with the word embeddings quantized (the default) and kept ("bf16 emb"), and
how often their greedy outputs equal fp32's on ``--prompts`` held-out prompts.

    python -m benchmarks.quantize --model glmkit/assets/glmkit-small --data data/kjv/shards
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, memory_bandwidth_gbs, select_isa
from glmkit import GLM, GLMConfig
from glmkit.config import SpecialTokens
from glmkit.quantize import quantize_checkpoint

L, H, NH, V, PROMPT = 24, 1024, 16, 30592, 32
SPECIAL = SpecialTokens(eos=30522, pad=30522, cls=30523, mask=30524, sop=30525, eop=30526, gmask=30527, smask=30528)
VARIANTS = {  # name: (checkpoint, glmkit kernels on)
    "bf16 stock": ("bf16", False),
    "bf16": ("bf16", True),
    "int8": ("int8", True),
    "int4 g32": ("int4", True),
    "int8 bf16 emb": ("int8-bf16-emb", True),  # --no-quantize-embeddings: the tied head stays bf16
    "int4 bf16 emb": ("int4-bf16-emb", True),
}


# ---- speed: one subprocess per variant -------------------------------------------------------------------------


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def bytes_per_token(model: GLM) -> int:
    """Bytes a decode step reads: every tensor but the position tables, of which it reads two rows."""
    total = 0
    # the tensors themselves: state_dict() would build the checkpoint layout of interleaved int4 weights (copies)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        total += t.element_size() * (2 * t.shape[1] if name.startswith(("wpe.", "wbpe.")) else t.numel())
    return total


class Clock:
    """Streamer that timestamps every generated token (the first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        self.stamps = self.stamps[1:]


@torch.inference_mode()
def matmul_ms(model: GLM) -> float:
    """Milliseconds of one decode step's matmuls alone: every linear layer and the tied head on one token."""
    calls = []
    for block in model.blocks:
        for m in (block.attn.qkv, block.attn.proj, block.mlp.fc, block.mlp.proj):
            calls.append((m, torch.randn(1, 1, m.in_features, dtype=torch.bfloat16)))
    x = torch.randn(1, 1, model.config.n_embd, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for m, xm in calls:
            m(xm)
        model.lm_head(x, model.wte)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def worker(folder: str, kernels: bool, new: int) -> None:
    """Load one variant, then decode on every ``run`` line from stdin and answer with a JSON line."""
    from glmkit.checkpoint import read_quantization
    from glmkit.generate import generate
    from glmkit.kernels import available, replace_linear
    from glmkit.quantize import quantize_model

    use_kernels = kernels and available()
    body = torch.randint(1000, 30000, (PROMPT - 2,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = [SPECIAL.cls, *body, SPECIAL.gmask]
    # the runtime's own memory (libraries, thread pools, kernel caches) is the baseline: run the same engine and
    # kernels once on a tiny model of the same kind, then everything RSS grows by is the model's
    scheme = read_quantization(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tiny = GLM(GLMConfig(n_layer=1, n_embd=128, n_head=2, vocab_size=V, special_tokens=SPECIAL))
        quantize_model(tiny, scheme) if scheme else None
        tiny.to(torch.bfloat16).save_pretrained(tmp)
        tiny = GLM.from_pretrained(tmp, dtype=torch.bfloat16)
        replace_linear(tiny) if use_kernels else None
        generate(tiny, prompt[-8:], special_tokens=SPECIAL, max_new_tokens=4, min_new_tokens=4)
        del tiny
    base = rss_mib()[0]
    model = GLM.from_pretrained(folder, dtype=torch.bfloat16)
    if use_kernels:
        replace_linear(model)

    def run(n: int) -> dict:
        clock = Clock()
        t = time.perf_counter()
        generate(model, prompt, special_tokens=SPECIAL, max_new_tokens=n, min_new_tokens=n, streamer=clock)
        seconds = time.perf_counter() - t
        return {"decode_tps": (n - 1) / (clock.stamps[-1] - clock.stamps[0]), "e2e_tps": n / seconds}

    run(4)  # warm-up: kernels, allocator
    info = {"kernels": use_kernels, "bytes_per_token": bytes_per_token(model), "rss_base_mib": base}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        rss, peak = rss_mib()
        print(json.dumps({**run(new), "matmul_ms": matmul_ms(model), "rss_mib": rss, "peak_rss_mib": peak}), flush=True)


def build_checkpoints(root: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    cfg = GLMConfig(n_layer=L, n_embd=H, n_head=NH, vocab_size=V, max_sequence_length=512, special_tokens=SPECIAL)
    GLM(cfg).to(torch.bfloat16).save_pretrained(root / "bf16")
    for emb in (True, False):
        tag = "" if emb else "-bf16-emb"
        quantize_checkpoint(root / "bf16", root / f"int8{tag}", bits=8, quantize_embeddings=emb)
        quantize_checkpoint(root / "bf16", root / f"int4{tag}", bits=4, group_size=32, quantize_embeddings=emb)
    return {ckpt: root / ckpt for ckpt, _ in VARIANTS.values()}


def speed(rounds: int, new: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="glmkit-quant-bench-") as tmp:
        folders = build_checkpoints(Path(tmp))
        procs, info = {}, {}
        for name, (ckpt, kernels) in VARIANTS.items():  # started one after another: loading is not timed
            env = {**os.environ, "GLMKIT_THREADS": str(threads), **({} if kernels else {"GLMKIT_KERNELS": "0"})}
            cmd = [sys.executable, "-m", "benchmarks.quantize", "--worker", str(folders[ckpt]), "--new", str(new)]
            procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            info[name] = json.loads(procs[name].stdout.readline())
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        bandwidth = []
        names = list(VARIANTS)
        for r in range(rounds):
            bandwidth.append(memory_bandwidth_gbs(seconds=2.0))
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
                procs[name].stdin.write("run\n")
                procs[name].stdin.flush()
                runs[name].append(json.loads(procs[name].stdout.readline()))
        bandwidth.append(memory_bandwidth_gbs(seconds=2.0))
        for p in procs.values():
            p.stdin.close()
            p.wait()
    bw = max(bandwidth)
    out = {
        "machine": machine(),
        "threads": threads,
        "bandwidth_gbs": bandwidth,
        "rounds": rounds,
        "new_tokens": new,
        "prompt_tokens": PROMPT,
        "variants": {},
    }
    for name in VARIANTS:
        tps = statistics.median(x["decode_tps"] for x in runs[name])
        rss = runs[name][-1]["rss_mib"]
        out["variants"][name] = {
            **info[name],
            "decode_tps": tps,
            "decode_tps_all": [round(x["decode_tps"], 2) for x in runs[name]],
            "e2e_tps": statistics.median(x["e2e_tps"] for x in runs[name]),
            "matmul_ms": statistics.median(x["matmul_ms"] for x in runs[name]),
            "rss_mib": rss,
            "peak_rss_mib": runs[name][-1]["peak_rss_mib"],
            "model_rss_mib": rss - info[name]["rss_base_mib"],
            "roofline_fraction": tps * info[name]["bytes_per_token"] / (bw * 1e9),
        }
    base = out["variants"]["bf16"]
    for v in out["variants"].values():
        v["speedup_vs_bf16"] = v["decode_tps"] / base["decode_tps"]
        v["matmul_speedup_vs_bf16"] = base["matmul_ms"] / v["matmul_ms"]
        v["other_ms"] = 1e3 / v["decode_tps"] - v["matmul_ms"]
        v["rss_vs_bf16"] = v["rss_mib"] / base["rss_mib"]
        v["model_rss_vs_bf16"] = v["model_rss_mib"] / base["model_rss_mib"]
    return out


def print_speed(res: dict) -> None:
    bw = ", ".join(f"{b:.0f}" for b in res["bandwidth_gbs"])
    print(res["machine"])
    print(f"{res['threads']} thread(s); memory bandwidth (fp32 sum, GB/s) per round: {bw}; roofline uses the best")
    head = f"{'variant':13s} {'tok/s':>6s} {'x bf16':>6s} {'roofline':>8s} {'MB/tok':>6s} {'matmul ms':>9s}"
    head += f" {'x bf16':>6s} {'rest ms':>7s} {'RSS MiB':>7s} {'x bf16':>6s} {'model MiB':>9s} {'x bf16':>6s}"
    print(f"{head}  per round")
    for name, v in res["variants"].items():
        print(
            f"{name:13s} {v['decode_tps']:6.1f} {v['speedup_vs_bf16']:6.2f} {v['roofline_fraction']:8.0%} "
            f"{v['bytes_per_token'] / 1e6:6.0f} {v['matmul_ms']:9.2f} {v['matmul_speedup_vs_bf16']:6.2f} "
            f"{v['other_ms']:7.2f} {v['rss_mib']:7.0f} {v['rss_vs_bf16']:6.2f} {v['model_rss_mib']:9.0f} "
            f"{v['model_rss_vs_bf16']:6.2f}  {v['decode_tps_all']}"
        )


# ---- accuracy on a trained checkpoint -----------------------------------------------------------------------------


def heldout_losses(model: GLM, data: str, batches: int, micro_batch: int, seq: int) -> dict[str, float]:
    from glmkit.data.blank_infill import BlankInfillConfig
    from glmkit.train.loop import TrainArgs, evaluate
    from glmkit.train.pretrain import OBJECTIVES, PretrainConfig, batch_sources

    cfg = PretrainConfig(
        data=data,
        tokenizer=data,
        model=model.config,
        blank=BlankInfillConfig(seq_length=seq),
        train=TrainArgs(micro_batch_size=micro_batch, eval_batches=batches, precision="fp32", progress=False),
    )
    sources = {o: batch_sources(cfg, "val", o) for o in OBJECTIVES}
    return evaluate(model, sources, cfg.train, torch.device("cpu"))


def heldout_prompts(data: str, n: int, length: int) -> list[list[int]]:
    from glmkit.data.shards import TokenShards

    docs = TokenShards(data, "val")
    rng = torch.Generator().manual_seed(0)
    prompts = []
    while len(prompts) < n:
        doc = docs[int(torch.randint(len(docs), (1,), generator=rng))]
        if len(doc) > length:
            start = int(torch.randint(len(doc) - length, (1,), generator=rng))
            prompts.append([int(t) for t in doc[start : start + length]])
    return prompts


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def accuracy(model_dir: str, data: str, batches: int, prompts_n: int, new: int) -> dict:
    from glmkit.generate import generate

    special = GLMConfig.from_file(model_dir).special_tokens
    seq = min(256, GLMConfig.from_file(model_dir).max_sequence_length)
    prompts = heldout_prompts(data, prompts_n, length=min(48, seq - new - 2))
    out: dict = {"model": model_dir, "data": data, "prompts": prompts_n, "new_tokens": new, "variants": {}}
    with tempfile.TemporaryDirectory(prefix="glmkit-quant-acc-") as tmp:
        folders = {"fp32": Path(model_dir)}
        schemes = {"int8": {"bits": 8}, "int4 g32": {"bits": 4, "group_size": 32}}
        schemes |= {f"{n} bf16 emb": kw | {"quantize_embeddings": False} for n, kw in schemes.items()}
        for name, kw in schemes.items():
            folders[name] = Path(tmp) / name.replace(" ", "-")
            quantize_checkpoint(model_dir, folders[name], **kw)
        outputs = {}
        for name, folder in folders.items():
            model = GLM.from_pretrained(folder, dtype=torch.float32)
            res = generate(model, prompts, special_tokens=special, max_new_tokens=new)
            outputs[name] = res.new_tokens
            out["variants"][name] = {"loss": heldout_losses(model, data, batches, 8, seq)}
    for name, toks in outputs.items():
        pairs = list(zip(toks, outputs["fp32"], strict=True))
        prefix = [common_prefix(x, y) for x, y in pairs]
        out["variants"][name]["greedy_identical"] = sum(x == y for x, y in pairs) / len(pairs)
        out["variants"][name]["mean_common_prefix"] = statistics.mean(prefix)
    return out


def print_accuracy(res: dict) -> None:
    print(f"{res['model']} on {res['data']} (val): blank-infilling loss per objective; greedy outputs vs fp32")
    for name, v in res["variants"].items():
        losses = "  ".join(f"{o} {loss:.4f}" for o, loss in v["loss"].items())
        print(
            f"{name:14s} {losses}  identical {v['greedy_identical']:.0%} of {res['prompts']}, "
            f"common prefix {v['mean_common_prefix']:.1f}/{res['new_tokens']} tokens"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new", type=int, default=None, help="new tokens per decode (default 64; accuracy: 32)")
    ap.add_argument("--model", help="accuracy: a trained checkpoint folder")
    ap.add_argument("--data", help="accuracy: the prepare-data folder it was trained on (val split)")
    ap.add_argument("--batches", type=int, default=8, help="accuracy: held-out batches per objective")
    ap.add_argument("--prompts", type=int, default=50, help="accuracy: held-out greedy prompts")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per variant")
    ap.add_argument("--json", default=None)
    ap.add_argument("--isa", choices=["avx2", "avx512"], help="run glmkit's kernels built for this instruction set")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    select_isa(args.isa)  # the workers inherit GLMKIT_ISA
    torch.set_num_threads(int(os.environ.get("GLMKIT_THREADS", args.threads)))  # workers: the controller's value
    if args.worker:
        return worker(args.worker, os.environ.get("GLMKIT_KERNELS", "1") != "0", args.new or 64)
    if args.model or args.data:
        if not (args.model and args.data):
            ap.error("--model and --data go together")
        res = accuracy(args.model, args.data, args.batches, args.prompts, args.new or 32)
        print_accuracy(res)
    else:
        res = speed(args.rounds, args.new or 64, args.threads)
        print_speed(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
