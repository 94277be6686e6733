"""A real ``glmkit serve`` process: alive while it loads (the kernels' first build), ready after, and on SIGTERM
a drain that keeps listening: not ready, 503 + Retry-After in each protocol's error format, the running request
finishes. And the KV pool sized from memory by default, so 32 concurrent clients are all admitted at once."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from glmkit.serve.app import ServerConfig
from glmkit.serve.sampling import Limits
from glmkit.serve.scheduler import SchedulerConfig
from glmkit.serve.server import (
    DEFAULT_KV_MEMORY,
    MAX_AUTO_SEQS,
    ServeOptions,
    build_state,
    kv_slot_bytes,
    size_kv_pool,
)

from .conftest import LiveServer

# The process under test is glmkit's own CLI; two waits are added so the test can see the phases it checks: the
# kernel build waits for a gate file (a first build takes ~90 s; a cached one, milliseconds), and every model step
# takes 30 ms more, so a 40-token answer is still running when SIGTERM arrives.
SERVE = """
import sys, time
from pathlib import Path
from glmkit.kernels import build
from glmkit.serve.runner import ModelRunner
gate, load, execute = Path(sys.argv[1]), build.load, ModelRunner.execute
def gated_load():
    while not gate.exists():
        time.sleep(0.05)
    return load()
def slow_execute(self, scheduled):
    time.sleep(0.03)
    return execute(self, scheduled)
build.load, ModelRunner.execute = gated_load, slow_execute
from glmkit.cli import main
sys.exit(main(["serve", *sys.argv[2:]]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_serve_process_is_live_while_loading_and_drains_on_sigterm(model_dir, tmp_path):
    port, gate, log = _free_port(), tmp_path / "gate", tmp_path / "serve.log"
    args = ["--model", str(model_dir), "--port", str(port), "--max-num-seqs", "2", "--drain-timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(gate), *args], stdout=out, stderr=out, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        # loading: the kernels "build" until the gate opens
        _wait(lambda: httpx.get(f"{base}/v2/health/live").status_code == 200)
        _wait(lambda: "building/loading glmkit's C++ kernels" in log.read_text(), 10)
        assert httpx.get(f"{base}/v2/health/ready").status_code == 400
        assert httpx.get(f"{base}/health").status_code == 503
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "a"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "ServiceUnavailableError" and "loaded" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v2/models/llm/generate", json={"text_input": "a"})
        assert r.status_code == 503 and r.headers["retry-after"] and isinstance(r.json()["error"], str)
        gate.touch()
        _wait(lambda: httpx.get(f"{base}/v2/health/ready").status_code == 200, 300)  # a real first build: ~90 s
        text = log.read_text()
        assert "KV pool" not in text  # --max-num-seqs given: nothing sized
        assert "C++ kernels" in text and "glmkit serve: ready" in text

        # a 40-token answer (30 ms a step) is running when SIGTERM arrives
        first, events = threading.Event(), []

        def stream() -> None:
            body = {"prompt": "the king", "max_tokens": 40, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first.wait(30)
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(f"{base}/v2/health/ready").status_code == 400, 10)
        assert httpx.get(f"{base}/v2/health/live").status_code == 200
        r = httpx.post(f"{base}/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"] == {
            "message": "the server is shutting down",
            "type": "ServiceUnavailableError",
            "param": None,
            "code": 503,
        }
        r = httpx.post(f"{base}/v2/models/llm/generate", json={"text_input": "a", "parameters": {"max_tokens": 2}})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json() == {"error": "the server is shutting down"}
        assert not events[-1] == "[DONE]"  # the probes above were answered while the answer was still running
        reader.join(60)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # all 40 tokens ran (finish_reason "length"), streamed as they came (how many tokens end a whole character
        # depends on what the random model writes)
        assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 5
        proc.wait(60)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/v2/health/live")
        assert "draining (signal 15)" in log.read_text() and "all requests finished" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kv_pool_sized_from_memory(model_and_tokenizer):
    model, _ = model_and_tokenizer
    c = model.config
    base = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=2048, max_model_len=100)
    slot = kv_slot_bytes(model, 100)
    assert slot == 2 * c.n_layer * c.n_embd * 4 * 100  # fp32 keys and values of every layer
    assert size_kv_pool(model, base, 0.5, 10 * slot).max_num_seqs == 5
    assert size_kv_pool(model, base, 0.25, 10 * slot + slot // 2).max_num_seqs == 2
    assert size_kv_pool(model, base, 1.0, 10_000 * slot).max_num_seqs == MAX_AUTO_SEQS
    small_budget = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=100)
    assert size_kv_pool(model, small_budget, 1.0, 10_000 * slot).max_num_seqs == 64  # a step decodes them all
    with pytest.raises(ValueError, match="holds no KV slot of 100 tokens"):
        size_kv_pool(model, base, 0.5, slot)
    with pytest.raises(ValueError, match="fraction in"):
        size_kv_pool(model, base, 0.0, 10 * slot)


def test_default_kv_pool_admits_32_concurrent_clients_at_once(model_and_tokenizer):
    """With the default sizing (memory allows 32 slots here), 32 streamed clients all decode together: none
    waits for a slot before its first token."""
    model, tok = model_and_tokenizer
    scheduler = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=2048, max_model_len=160)
    server_config = ServerConfig(limits=Limits(max_tokens=48, max_prompt_tokens=96))
    state = build_state(model, tok, ServeOptions(scheduler, server=server_config, kv_cache_memory=DEFAULT_KV_MEMORY))
    engine = state.engine.engine
    assert engine.config.max_num_seqs >= 32
    execute = engine.runner.execute
    engine.runner.execute = lambda scheduled: (time.sleep(0.02), execute(scheduled))[1]
    server = LiveServer(state)
    try:
        body = {"prompt": "the king", "max_tokens": 40, "ignore_eos": True}
        url = f"http://{server.url}/v1/completions"
        clients = [
            threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body, "timeout": 120}) for _ in range(32)
        ]
        for t in clients:
            t.start()
        _wait(lambda: engine.scheduler.num_running == 32, 60)
        assert engine.scheduler.num_waiting == 0
        for t in clients:
            t.join()
        assert engine.scheduler.num_running == 0 and engine.stats.failures["REJECTED"] == 0
    finally:
        server.stop()
