"""Load benchmark of ``glm_classify`` (not a test): requests/s of a served classifier with the dynamic batcher against
``max_batch_size=1``, closed-loop clients as in ``benchmarks.serve``.

The classifier is the bundled model with a random six-label sequence-classification head, saved by ``glmkit.hf``
(the shape of a classifier ``glmkit finetune`` trains from it); each mode starts the real ``glmkit serve --model``
on that folder in its own process on 127.0.0.1 and C clients each send their next ``/v2/models/glm_classify/infer``
request (one text of 6-14 words) when the previous one is answered.

    python -m benchmarks.serve_classifier                       # 16 clients, 480 requests per mode
    python -m benchmarks.serve_classifier --concurrency 32 --requests 960 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from benchmarks.serve import Sample, Server, _ready, closed_loop, prompt, score_table

LABELS = ["law", "history", "wisdom", "prophets", "gospels", "letters"]


def make_classifier(folder: Path) -> Path:
    """The bundled model under a random six-label head, with its tokenizer, as glmkit.hf saves it."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from glmkit.bundled import BUNDLED_MODEL

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        BUNDLED_MODEL, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), dtype=torch.float32
    )
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(BUNDLED_MODEL).save_pretrained(folder)
    return folder


def start(folder: Path, args: argparse.Namespace, port: int, max_batch_size: int, delay_us: int) -> Server:
    cmd = [sys.executable, "-m", "glmkit", "serve", "--model", str(folder), "--port", str(port), "--no-playground"]
    cmd += ["--max-batch-size", str(max_batch_size), "--max-queue-delay-us", str(delay_us), "--dtype", args.dtype]
    cmd += ["--threads", str(args.threads), "--max-num-seqs", "2", "--max-queue-size", "1024"]
    log = open(Path(tempfile.gettempdir()) / f"glmkit-classify-bench-{port}.log", "w")  # noqa: SIM115
    return _ready(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), port)


async def one_classify(client: aiohttp.ClientSession, rng: random.Random, _: int) -> Sample:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1, 1], "data": [prompt(rng)]}]}
    t0 = asyncio.get_running_loop().time()
    async with client.post("/v2/models/glm_classify/infer", json=body) as r:
        await r.read()
    latency = asyncio.get_running_loop().time() - t0
    return Sample(latency, latency, 0, r.status == 200)


async def batch_sizes(url: str) -> dict[int, int]:
    """Executions per batch size so far (Triton's batch_stats)."""
    async with aiohttp.ClientSession(base_url=url) as c, c.get("/v2/models/glm_classify/stats") as r:
        stats = (await r.json())["model_stats"][0]
    return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=480, help="per mode")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per mode")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (the machine is shared)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--port", type=int, default=8481)
    args = p.parse_args(argv)
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_classifier(Path(tmp) / "classifier")
        for i, (mbs, delay) in enumerate([(16, 2000), (1, 0)]):
            server = start(folder, args, args.port + i, mbs, delay)
            try:
                asyncio.run(closed_loop(server.url, one_classify, 4, 32, 60, 0))  # warm-up
                before = asyncio.run(batch_sizes(server.url))
                c, n = args.concurrency, args.requests
                rows.append((mbs, asyncio.run(closed_loop(server.url, one_classify, c, n, args.time_limit, 0))))
                after = asyncio.run(batch_sizes(server.url))
                sizes[mbs] = {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}
            finally:
                server.stop()
    (_, batched), (_, one) = rows
    command = " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            f"### glm_classify, bundled-model classifier, {datetime.date.today().isoformat()}",
            "",
            f"`python -m benchmarks.serve_classifier {command}` on {platform.machine()}, server and clients on",
            f"127.0.0.1 in separate processes; `glmkit serve --model <classifier> --dtype {args.dtype} --threads "
            f"{args.threads}`, {args.concurrency} closed-loop clients, one text of 6-14 words a request:",
            "",
            score_table(rows),
            "",
            f"req/s dynamic batcher (max_batch_size 16, 2 ms delay) / max_batch_size 1: "
            f"**{batched['req_s'] / one['req_s']:.1f}x**; executions per batch size: {sizes[16]}",
        ]
    )
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
