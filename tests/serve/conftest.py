"""A tiny GLM with a trained byte-level BPE, saved as a checkpoint folder, for the serving tests."""

import random
from pathlib import Path

import pytest
import torch

from glmkit import GLM, GLMConfig
from glmkit.train_tokenizer import train_tokenizer

WORDS = "the king said unto them go and see what the lord hath done in the land of egypt for ever".split()


class _ConstructOnly(GLM):
    def reset_parameters(self, reference: bool = False) -> None:
        pass


def build_tiny_model_dir(root: Path) -> Path:
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200))
    (root / "corpus.txt").write_text(text)
    folder = root / "model"
    tok = train_tokenizer([root / "corpus.txt"], folder, vocab_size=300)
    config = GLMConfig(
        n_layer=2, n_embd=32, n_head=4, vocab_size=tok.vocab_size, max_sequence_length=64, special_tokens=tok.special
    )
    torch.manual_seed(0)
    model = _ConstructOnly(config)
    # the reference init drawn right after the constructors: random weights whose greedy outputs are visible words
    GLM.reset_parameters(model, reference=True)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def model_and_tokenizer(model_dir):
    from glmkit.bundled import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_dir)
    return model.eval(), tok


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a shared machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LiveServer:
    """``glmkit serve``'s app under a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, state):
        import socket
        import threading

        import uvicorn

        from glmkit.serve.app import build_app

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.state = state
        config = uvicorn.Config(build_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        import time

        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.02)
        assert self.server.started, "server did not start"

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_state(model, tok, **kw):
    from glmkit.serve.app import ServerConfig
    from glmkit.serve.batcher import DynamicBatchingConfig, QueuePolicy
    from glmkit.serve.sampling import Limits
    from glmkit.serve.scheduler import SchedulerConfig
    from glmkit.serve.server import ServeOptions, build_state

    options = ServeOptions(
        scheduler=kw.pop("scheduler", SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=160)),
        batching=kw.pop(
            "batching",
            DynamicBatchingConfig(
                max_batch_size=8, max_queue_delay_microseconds=2000, default_queue_policy=QueuePolicy(max_queue_size=64)
            ),
        ),
        server=ServerConfig(limits=Limits(max_tokens=48, max_prompt_tokens=96), **kw),
    )
    return build_state(model, tok, options)


@pytest.fixture(scope="package")
def live_server(model_and_tokenizer):
    model, tok = model_and_tokenizer
    server = LiveServer(make_state(model, tok))
    yield server
    server.stop()
