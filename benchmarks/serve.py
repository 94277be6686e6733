"""Load benchmark of ``glmkit serve`` (not a test): closed-loop asyncio clients against a server in another process.

For each concurrency level C, C workers each send their next request when the previous one finishes, until a
fixed number of requests is done (or a time limit passes) — TGI's "time to complete N requests" method. The
server runs in a subprocess on 127.0.0.1 only. Generation: streamed ``/v1/completions`` with ``ignore_eos`` so
every request produces exactly ``max_tokens`` tokens (throughput in req/s and generated tok/s, latency p50/p99,
time to first token p50/p99). Scoring: ``/v2/models/glm_score/infer`` with the dynamic batcher at
``max_batch_size=1`` (no batching) and at 16.

    python -m benchmarks.serve --model small                 # bundled-model shape (random weights if absent)
    python -m benchmarks.serve --model large --concurrency 1 4 16 32 64 --max-tokens 16
    python -m benchmarks.serve --model small --write         # also write benchmarks/RESULTS.md
    python -m benchmarks.serve --client guidellm --write     # guidellm against `glmkit serve` as shipped

``--model`` takes a checkpoint folder, ``bundled``, ``small`` (the bundled model if present, else its shape
with random weights) or ``large`` (GLM-Large's shape, 335M parameters, random weights).

``--client guidellm`` drives a plain ``glmkit serve`` (the bundled model, default settings, plus
``--serve-args``) with guidellm (PyPI ``guidellm``, the vLLM project's load tool; not a glmkit dependency):
concurrent streams at each ``--streams`` level, synthetic prompts of ``--prompt-tokens`` and answers of
``--max-tokens`` tokens, counted with the bundled tokenizer. Client and server share the machine, so the report
gives the CPU share each used.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx

from benchmarks.common import memory_bandwidth_gbs

RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "## Serving (issue 6)"
GUIDELLM_SECTION = "## Serving under guidellm (issue 15)"
WORDS = "and the lord said unto moses go in to pharaoh king of egypt let my people go that they may serve me".split()


# ---- server process ---------------------------------------------------------------------------------------


def _model(kind: str, tokenizer_dir: str):
    import torch

    from glmkit import GLM, GLMConfig
    from glmkit.bundled import BUNDLED_MODEL, load_model_and_tokenizer
    from glmkit.tokenizer import load_tokenizer

    if kind == "bundled" or (kind == "small" and (BUNDLED_MODEL / "config.json").is_file()):
        return load_model_and_tokenizer(None)
    if kind not in ("small", "large"):
        return load_model_and_tokenizer(kind)
    tok = load_tokenizer(tokenizer_dir)
    shape = (
        dict(n_layer=6, n_embd=320, n_head=5, vocab_size=8192, max_sequence_length=256)
        if kind == "small"
        else dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=30592, max_sequence_length=512)
    )
    torch.manual_seed(0)
    return GLM(GLMConfig(**shape, special_tokens=tok.special)).eval(), tok


def serve_main(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from glmkit.serve.app import ServerConfig, build_app
    from glmkit.serve.batcher import DynamicBatchingConfig, QueuePolicy
    from glmkit.serve.sampling import Limits
    from glmkit.serve.scheduler import SchedulerConfig
    from glmkit.serve.server import ServeOptions, build_state

    torch.set_num_threads(1)  # as glmkit serve: only the engine thread starts an OpenMP team
    model, tok = _model(args.model, args.tokenizer)
    model = model.to(getattr(torch, args.dtype))
    options = ServeOptions(
        threads=args.threads,
        pack_weights=args.pack_weights,
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=4096,
            max_model_len=64 + args.max_tokens,
            max_queue_size=1024,
        ),
        batching=DynamicBatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.max_queue_delay_us,
            default_queue_policy=QueuePolicy(max_queue_size=1024),
        ),
        server=ServerConfig(limits=Limits(max_tokens=args.max_tokens, max_prompt_tokens=64)),
    )
    app = build_app(build_state(model, tok, options))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="error")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_server(args: argparse.Namespace, port: int, max_batch_size: int, delay_us: int) -> Server:
    cmd = [sys.executable, "-m", "benchmarks.serve", "--serve", "--port", str(port), "--model", args.model]
    cmd += ["--tokenizer", args.tokenizer, "--threads", str(args.threads), "--max-num-seqs", str(args.max_num_seqs)]
    cmd += ["--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(delay_us), "--dtype", args.dtype]
    cmd += ["--max-tokens", str(args.max_tokens)] + (["--pack-weights"] if args.pack_weights else [])
    return _ready(subprocess.Popen(cmd, cwd=Path(__file__).parent.parent), port)


def _ready(proc: subprocess.Popen, port: int) -> Server:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a first glmkit serve on a machine compiles the kernels
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server process exited")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return Server(proc, url)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready")


# ---- clients ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    latency: float
    ttft: float
    tokens: int
    ok: bool


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))


async def one_generation(client: aiohttp.ClientSession, rng: random.Random, max_tokens: int) -> Sample:
    body = {"model": "llm", "prompt": prompt(rng), "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    start, ttft, tokens = time.perf_counter(), None, 0
    async with client.post("/v1/completions", json=body) as r:
        if r.status != 200:
            await r.read()
            return Sample(time.perf_counter() - start, 0.0, 0, False)
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            if ttft is None:
                ttft = time.perf_counter() - start
            if b'"usage"' in line:  # parse only the final usage chunk: the client must stay cheap
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return Sample(time.perf_counter() - start, ttft or 0.0, tokens, tokens == max_tokens)


async def one_score(client: aiohttp.ClientSession, rng: random.Random, _: int) -> Sample:
    body = {
        "inputs": [
            {"name": "text_input", "datatype": "BYTES", "shape": [1, 1], "data": [prompt(rng)]},
            {"name": "continuation", "datatype": "BYTES", "shape": [1, 1], "data": [" ".join(rng.sample(WORDS, 4))]},
        ]
    }
    start = time.perf_counter()
    async with client.post("/v2/models/glm_score/infer", json=body) as r:
        await r.read()
    latency = time.perf_counter() - start
    return Sample(latency, latency, 0, r.status == 200)


async def closed_loop(
    url: str,
    fn: Callable[[aiohttp.ClientSession, random.Random, int], Awaitable[Sample]],
    concurrency: int,
    n_requests: int,
    time_limit: float,
    max_tokens: int,
) -> dict:
    rng = random.Random(concurrency)
    samples: list[Sample] = []
    issued = 0
    # aiohttp, not httpx: on this 2-core machine the client shares the server's cores, and httpx spent ~1.3 ms of
    # CPU per scoring request against aiohttp's ~0.25 (its parser is C)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(base_url=url, connector=connector, timeout=timeout) as client:
        start = time.perf_counter()

        async def worker() -> None:
            nonlocal issued
            while issued < n_requests and time.perf_counter() - start < time_limit:
                issued += 1
                samples.append(await fn(client, rng, max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [s for s in samples if s.ok]

    def pct(values: list[float], q: float) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    lat, ttft = [s.latency for s in ok], [s.ttft for s in ok]
    return {
        "concurrency": concurrency,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "seconds": wall,
        "req_s": len(ok) / wall,
        "tok_s": sum(s.tokens for s in ok) / wall,
        "p50": pct(lat, 0.5),
        "p99": pct(lat, 0.99),
        "ttft_p50": pct(ttft, 0.5),
        "ttft_p99": pct(ttft, 0.99),
    }


def engine_alone(args: argparse.Namespace) -> dict[str, float]:
    """The same model without HTTP, in this process: decode tok/s at 1 and 32 sequences, scored rows/s at batch
    1 and 16. It separates the engine's own scaling from the HTTP layer and the machine's other load."""
    import torch

    from glmkit.prompts import continuation_ids
    from glmkit.serve.engine import LLMEngine
    from glmkit.serve.scheduler import SchedulerConfig
    from glmkit.serve.scoring import Scorer, ScoreRow

    torch.set_num_threads(args.threads)
    model, tok = _model(args.model, args.tokenizer)
    model = model.to(getattr(torch, args.dtype))
    if args.pack_weights:
        from glmkit.generate.fast import optimize_for_decode

        optimize_for_decode(model, pack=True)
    engine = LLMEngine(
        model, tok, SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096, max_model_len=64 + args.max_tokens)
    )
    rng = random.Random(0)
    out: dict[str, float] = {}
    for n in (1, 32, 1, 32):  # the second pass is the measurement
        for i in range(n):
            ids = continuation_ids(tok, prompt(rng))
            engine.add_request(
                engine.make_request(f"{n}-{i}-{rng.random()}", ids, max_new_tokens=args.max_tokens, ignore_eos=True)
            )
        engine.step()  # prefill
        start, steps = time.perf_counter(), 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        out[f"decode_{n}"] = n * steps / (time.perf_counter() - start)
    scorer = Scorer(model, tok.special)
    rows = [
        scorer.check(
            ScoreRow("loglikelihood", continuation_ids(tok, prompt(rng)), tok.encode(" ".join(rng.sample(WORDS, 4))))
        )
        for _ in range(16)
    ]
    for bs in (1, 16, 1, 16):
        start, done = time.perf_counter(), 0
        while time.perf_counter() - start < 2.0:
            for i in range(0, 16, bs):
                scorer([[r] for r in rows[i : i + bs]])
                done += bs
        out[f"score_{bs}"] = done / (time.perf_counter() - start)
    return out


# ---- report ----------------------------------------------------------------------------------------------


def gen_table(rows: list[dict]) -> str:
    out = [
        "| concurrency | requests | req/s | tok/s | p50 latency s | p99 latency s | TTFT p50 s | TTFT p99 s | errors |"
    ]
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append(
            f"| {r['concurrency']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | {r['p50']:.3f} | "
            f"{r['p99']:.3f} | {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['errors']} |"
        )
    return "\n".join(out)


def score_table(rows: list[tuple[int, dict]]) -> str:
    out = ["| max_batch_size | concurrency | requests | req/s | p50 latency ms | p99 latency ms | errors |"]
    out.append("|---|---|---|---|---|---|---|")
    for mbs, r in rows:
        out.append(
            f"| {mbs} | {r['concurrency']} | {r['requests']} | {r['req_s']:.1f} | {r['p50'] * 1000:.1f} | "
            f"{r['p99'] * 1000:.1f} | {r['errors']} |"
        )
    return "\n".join(out)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def guidellm_report(args: argparse.Namespace) -> str:
    """Run guidellm against ``glmkit serve`` and return its figures as a Markdown table."""
    from glmkit.bundled import BUNDLED_MODEL

    if shutil.which("guidellm") is None:
        raise SystemExit("benchmarks.serve --client guidellm needs guidellm: pip install guidellm")
    cmd = [sys.executable, "-m", "glmkit.cli", "serve", "--port", str(args.port), *args.serve_args]
    server = _ready(subprocess.Popen(cmd), args.port)
    out = Path(tempfile.mkdtemp()) / "guidellm.json"
    streams = ",".join(str(c) for c in args.streams)
    run = ["guidellm", "run", "--backend", f"kind=openai_http,target={server.url},model=llm"]
    run += ["--profile", "kind=concurrent", "--override", "profile.streams", streams, "--disable-progress"]
    run += ["--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.max_tokens}"]
    run += ["--tokenizer", f"kind=hf_auto,model={BUNDLED_MODEL}", "--output", f"kind=json,path={out}"]
    run += ["--constraint", f"kind=max_requests,count={args.guidellm_requests}"]
    try:
        server_cpu, wall = _cpu_seconds(server.proc.pid), time.monotonic()
        before = os.times()
        subprocess.run(run, check=True)
        after = os.times()
        wall, server_cpu = time.monotonic() - wall, _cpu_seconds(server.proc.pid) - server_cpu
    finally:
        server.stop()
    client_cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    rows = ["| streams | req/s | output tok/s | TTFT p50 / p95 ms | ITL p50 ms | latency p50 / p95 s | errors |"]
    rows.append("|---|---|---|---|---|---|---|")
    rate = {}
    for b in json.loads(out.read_text())["benchmarks"]:
        m = {k: v["successful"] for k, v in b["metrics"].items() if isinstance(v, dict) and "successful" in v}
        n, ttft, lat = b["config"]["strategy"]["streams"], m["time_to_first_token_ms"], m["request_latency"]
        rate[n] = m["output_tokens_per_second"]["mean"]
        rows.append(
            f"| {n} | {m['requests_per_second']['mean']:.2f} | {rate[n]:.1f} | {ttft['median']:.0f} / "
            f"{ttft['percentiles']['p95']:.0f} | {m['inter_token_latency_ms']['median']:.1f} | "
            f"{lat['median']:.2f} / {lat['percentiles']['p95']:.2f} | {b['metrics']['request_totals']['errored']} |"
        )
    cores = os.cpu_count() or 1
    share = f"guidellm used {client_cpu / wall / cores:.0%} and the server {server_cpu / wall / cores:.0%}"
    lines = [*rows, "", f"CPU over the run ({wall:.0f} s, {cores} cores): {share} of the machine."]
    if 1 in rate and 32 in rate:
        lines.append(f"Output tok/s at 32 streams / 1 stream: **{rate[32] / rate[1]:.1f}x**.")
    return "\n".join(lines)


def write_results(text: str, section: str = SECTION) -> None:
    """Replace this benchmark's section of RESULTS.md (re-read now: other benchmarks write other sections)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(section)
    if start >= 0:
        end = old.find("\n## ", start + len(section))
        old = old[:start].rstrip("\n") + ("\n\n" + old[end + 1 :] if end >= 0 else "\n")
    RESULTS.write_text(old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--tokenizer", default="data/kjv/tokenizer", help="tokenizer for random-weight models")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests-per-worker", type=int, default=2, help="requests per concurrency level = C x this")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level")
    p.add_argument("--score-concurrency", type=int, default=32)
    p.add_argument(
        "--score-requests",
        type=int,
        default=960,
        help="per mode; the unbatched figure moves by ~15 %% between short runs here",
    )
    p.add_argument("--threads", type=int, default=1, help="server torch threads (the machine is shared)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--port", type=int, default=8471)
    p.add_argument("--write", action="store_true", help=f"write the tables into {RESULTS.name}")
    p.add_argument("--skip-score", action="store_true")
    p.add_argument("--pack-weights", action="store_true", help="bf16 weights in panels (glmkit serve's default)")
    # server-process flags
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", choices=["builtin", "guidellm"], default="builtin", help="the load generator")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32, 64], help="guidellm: concurrent streams")
    p.add_argument("--prompt-tokens", type=int, default=32, help="guidellm: synthetic prompt length")
    p.add_argument("--guidellm-requests", type=int, default=128, help="guidellm: requests per stream level")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="guidellm: glmkit serve flags (last)")
    p.add_argument("--max-batch-size", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve_main(args)
        return 0
    if args.client == "guidellm":
        command = " ".join(argv if argv is not None else sys.argv[1:])
        report = f"### guidellm, {datetime.date.today().isoformat()}\n\n`python -m benchmarks.serve {command}`\n\n"
        report += guidellm_report(args)
        print(report)
        if args.write:
            write_results(f"{GUIDELLM_SECTION}\n\n{report}\n", GUIDELLM_SECTION)
        return 0

    bandwidth = [memory_bandwidth_gbs(seconds=1.0)]  # the machine's state: decode speed follows it
    server = start_server(args, args.port, 16, 2000)
    try:
        # warm-up, once at the highest concurrency: on this machine the first wave of 3+ new loopback connections
        # to a fresh server stalls ~200 ms (a TCP retransmission timeout), which would land in the first level's TTFT
        top = max(args.concurrency)
        asyncio.run(closed_loop(server.url, one_generation, 2, 4, 60, args.max_tokens))
        asyncio.run(closed_loop(server.url, one_generation, top, top, 60, 4))
        gen_rows = []
        for c in args.concurrency:
            n = max(args.min_requests, c * args.requests_per_worker)
            gen_rows.append(
                asyncio.run(closed_loop(server.url, one_generation, c, n, args.time_limit, args.max_tokens))
            )
            print(gen_table(gen_rows[-1:]).splitlines()[-1], flush=True)
        score_rows = []
        if not args.skip_score:
            c, n = args.score_concurrency, args.score_requests
            asyncio.run(closed_loop(server.url, one_score, 4, 16, 60, 0))  # warm-up
            score_rows.append((16, asyncio.run(closed_loop(server.url, one_score, c, n, args.time_limit, 0))))
    finally:
        server.stop()
    if not args.skip_score:
        server = start_server(args, args.port + 1, 1, 0)
        try:
            asyncio.run(closed_loop(server.url, one_score, 4, 16, 60, 0))
            single = asyncio.run(closed_loop(server.url, one_score, c, n, args.time_limit, 0))
            score_rows.insert(0, (1, single))
        finally:
            server.stop()

    alone = engine_alone(args)
    bandwidth.append(memory_bandwidth_gbs(seconds=1.0))
    by_c = {r["concurrency"]: r for r in gen_rows}
    packed = " (prepacked weights)" if args.pack_weights else ""
    lines = [
        f"### {args.model} model, {datetime.date.today().isoformat()}",
        "",
        f"`python -m benchmarks.serve {' '.join(argv if argv is not None else sys.argv[1:])}` — server and client on",
        f"127.0.0.1 in separate processes; server: {args.dtype}{packed}, {args.threads} torch thread(s),",
        f"{args.max_num_seqs} KV slots; each request streams {args.max_tokens} tokens (`ignore_eos`), greedy.",
        f"Memory read bandwidth before / after: {bandwidth[0]:.0f} / {bandwidth[1]:.0f} GB/s (one stream's decode is",
        "bound by it, many streams' by compute, so the 32/1 ratio is higher when the bandwidth is low).",
        "",
        "Generation (continuous batching, streamed `/v1/completions`):",
        "",
        gen_table(gen_rows),
    ]
    if 1 in by_c and 32 in by_c:
        lines += ["", f"tok/s at 32 streams / 1 stream: **{by_c[32]['tok_s'] / by_c[1]['tok_s']:.1f}x** (goal >= 8x)"]
    lines += [
        "",
        f"Engine alone (same process, no HTTP): {alone['decode_1']:.0f} tok/s at 1 sequence, {alone['decode_32']:.0f} "
        f"at 32 (**{alone['decode_32'] / alone['decode_1']:.1f}x**); scorer {alone['score_1']:.1f} rows/s at batch 1, "
        f"{alone['score_16']:.1f} at 16 ({alone['score_16'] / alone['score_1']:.1f}x).",
    ]
    if score_rows:
        (_, one), (_, batched) = score_rows
        lines += [
            "",
            f"Scoring (`glm_score` log-likelihood, Triton `/infer`, {args.score_concurrency} concurrent clients,",
            "dynamic batcher with 2 ms max queue delay vs `max_batch_size=1`):",
            "",
            score_table(score_rows),
            "",
            f"req/s batched / unbatched: **{batched['req_s'] / one['req_s']:.1f}x** at p99 "
            f"{batched['p99'] * 1000:.0f} ms vs {one['p99'] * 1000:.0f} ms (goal >= 3x at equal or lower p99)",
        ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        body = RESULTS.read_text() if RESULTS.exists() else ""
        start = body.find(SECTION)
        kept = ""
        if start >= 0:  # keep the other models' subsections of this section
            end = body.find("\n## ", start + len(SECTION))
            section = body[start + len(SECTION) : end if end >= 0 else len(body)]
            parts = section.split("\n### ")
            kept = parts[0] + "".join("\n### " + s for s in parts[1:] if not s.startswith(f"{args.model} model"))
        write_results(f"{SECTION}\n\n{kept.strip()}\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
