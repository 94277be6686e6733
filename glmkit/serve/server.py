"""``glmkit serve``: one process serving a GLM over the Triton/KServe v2 and OpenAI HTTP APIs.

``build_state`` wires a model and tokenizer into the engines (continuous batching for ``llm``, one dynamic
batcher per one-shot model) and is what tests call; ``serve`` runs it under uvicorn, loopback by default.

Startup listens first: the C++ kernels (compiled on a machine's first start, up to ~90 s) and the model load on
a thread while ``/v2/health/live`` answers 200 and readiness says not ready. The KV pool is sized from memory
unless ``--max-num-seqs`` is given: ``--kv-cache-memory`` (a share of the RAM available once the model is loaded,
as vLLM sizes its pool from GPU memory) divided by the bytes one slot of ``--max-model-len`` tokens takes. On
SIGTERM/SIGINT the server keeps listening while it drains: not ready, new work refused with 503 + Retry-After,
in-flight requests finish (up to ``--drain-timeout`` s); then it stops listening and stops the engines. A
second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn

from ..generate.fast import cache_dtype
from .app import ServerConfig, ServerState, build_app, drain
from .batcher import DynamicBatchingConfig, QueuePolicy
from .classifier import ClassifierDef, find_classifier
from .repository import ModelRepository, Source
from .sampling import Limits
from .scheduler import SchedulerConfig


@dataclass
class ServeOptions:
    """Everything ``glmkit serve`` configures besides host and port."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    batching: DynamicBatchingConfig = field(
        default_factory=lambda: DynamicBatchingConfig(
            max_batch_size=16, max_queue_delay_microseconds=2000, default_queue_policy=QueuePolicy(max_queue_size=256)
        )
    )
    server: ServerConfig = field(default_factory=ServerConfig)
    max_jobs: int = 8
    threads: int | None = None  # the engine thread's torch threads (None: whatever the process has)
    # bf16 linear weights held in panels for batched steps (GLM-Large 32 streams ~1.2x tokens/s), in place of the
    # row-major ones: the tied head's copy of the embedding is the only extra memory. None: wherever the kernels run
    # a bf16 model; True: also say when nothing could be packed; False: never
    pack_weights: bool | None = None
    # None: scheduler.max_num_seqs KV slots as given; a fraction: as many slots (at most MAX_AUTO_SEQS) as that
    # share of the memory available once the model is loaded holds (glmkit serve's default: DEFAULT_KV_MEMORY)
    kv_cache_memory: float | None = None
    # glm_classify: the fine-tuned classifier the checkpoint is (a sequence-classification head or a cloze task)
    classifier: ClassifierDef | None = None
    # a P-tuning v2 prefix / soft prompt folder every served model runs the GLM with (load_prefix)
    prefix: Path | None = None


log = logging.getLogger("glmkit.serve")
DEFAULT_KV_MEMORY = 0.5
MAX_AUTO_SEQS = 256  # vLLM's default max_num_seqs: beyond it a step's batch, not memory, is the limit


def available_memory() -> int:
    """Bytes of RAM this process can still take: MemAvailable, or less where a cgroup (container) limit says so."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(free, 0)


def kv_slot_bytes(model: torch.nn.Module, max_model_len: int) -> int:
    """Bytes of one KV slot: keys and values of every layer for ``max_model_len`` tokens, in the cache's dtype (the
    KV heads only: ChatGLM2/3 and GLM-4 cache their groups)."""
    c = model.config
    itemsize = torch.empty((), dtype=cache_dtype(model)).element_size()
    return 2 * c.n_layer * getattr(c, "n_kv_head", c.n_head) * c.head_size * itemsize * max_model_len


def size_kv_pool(
    model: torch.nn.Module, scheduler: SchedulerConfig, fraction: float, available: int
) -> SchedulerConfig:
    """``scheduler`` with ``max_num_seqs`` = the slots ``fraction`` of ``available`` bytes holds (at most
    ``MAX_AUTO_SEQS`` and ``max_num_batched_tokens``); ``ValueError`` if not even one fits."""
    if not 0 < fraction <= 1:
        raise ValueError(f"kv_cache_memory: expected a fraction in (0, 1], got {fraction}")
    slot = kv_slot_bytes(model, scheduler.max_model_len)
    fits = int(available * fraction) // slot
    if fits < 1:
        raise ValueError(
            f"kv_cache_memory: {fraction:.0%} of the {available / 2**30:.2f} GiB available holds no KV slot of "
            f"{scheduler.max_model_len} tokens ({slot / 2**20:.1f} MiB); lower --max-model-len or set --max-num-seqs"
        )
    return dataclasses.replace(scheduler, max_num_seqs=min(fits, MAX_AUTO_SEQS, scheduler.max_num_batched_tokens))


def build_state(
    model: torch.nn.Module, tokenizer: Any, options: ServeOptions | None = None, source: Source | None = None
) -> ServerState:
    """Start the engines over ``model`` and return the state ``build_app`` serves.

    ``source`` reads ``model`` again (``glmkit serve``: from its checkpoint folder): with it, unloading every model
    through Triton's model-repository extension frees the weights too (repository.py)."""
    options = options or ServeOptions()
    if options.kv_cache_memory is not None:
        available = available_memory()
        options = dataclasses.replace(
            options, scheduler=size_kv_pool(model, options.scheduler, options.kv_cache_memory, available)
        )
        s = options.scheduler
        slot = kv_slot_bytes(model, s.max_model_len)
        log.info(
            f"glmkit serve: KV pool of {s.max_num_seqs} slots x {s.max_model_len} tokens "
            f"({s.max_num_seqs * slot / 2**30:.2f} GiB; --kv-cache-memory {options.kv_cache_memory:g} of "
            f"{available / 2**30:.1f} GiB available, {slot / 2**20:.1f} MiB a slot, at most {MAX_AUTO_SEQS}): "
            f"up to {s.max_num_seqs} requests decode together"
        )
    return ModelRepository(options, tokenizer, source).start(model)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains before it stops listening, over an app whose model may still be loading.

    uvicorn closes its listener as soon as a signal arrives, so clients of a draining server would get connection
    refused; here the first SIGTERM/SIGINT runs ``app.drain`` (not ready, 503 + Retry-After, in-flight requests
    finish) and only then lets uvicorn shut down. A signal while loading, or a second one, stops at once."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Future | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        state: ServerState | None = self.app.state.glmkit
        if state is None or state.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        state.draining = True  # readiness drops before the drain's first step runs
        log.info(f"glmkit serve: draining (signal {sig}): new requests get 503, in-flight requests finish")
        self._loop.call_soon_threadsafe(self._start_drain, state, sig, frame)

    def _start_drain(self, state: ServerState, sig: int, frame: Any) -> None:
        async def drain_then_exit() -> None:
            finished = await drain(state)
            log.info(f"glmkit serve: drained ({'all requests finished' if finished else 'drain timeout'}); stopping")
            super(DrainingServer, self).handle_exit(sig, frame)

        self._drain_task = asyncio.ensure_future(drain_then_exit())


def load_state(model_path: str | None, options: ServeOptions, dtype: str) -> ServerState:
    """Build (or load) the kernels, load the model and start the engines, saying what takes time."""
    from ..bundled import load_model_and_tokenizer
    from ..kernels import build

    log.info(
        "glmkit serve: building/loading glmkit's C++ kernels (a machine's first start compiles them, up to ~90 s; "
        "/v2/health/live answers meanwhile)"
    )
    start = time.perf_counter()
    if build.load():
        log.info(f"glmkit serve: C++ kernels loaded ({time.perf_counter() - start:.1f} s)")
    else:
        why = build.unavailable_reason()
        log.info(f"glmkit serve: C++ kernels unavailable ({why}); using PyTorch ({time.perf_counter() - start:.1f} s)")
    from ..generate.cli import with_prefix

    def load() -> tuple[torch.nn.Module, Any]:
        model, tokenizer = load_model_and_tokenizer(model_path, dtype=getattr(torch, dtype))
        return with_prefix(model, options.prefix), tokenizer

    start = time.perf_counter()
    model, tokenizer = load()
    log.info(f"glmkit serve: model loaded ({time.perf_counter() - start:.1f} s)")
    if options.prefix is not None:
        log.info(
            f"glmkit serve: prefix of {model.pre_seq_len} virtual tokens from {options.prefix} on every model "
            "(decoded through PyTorch's cached forward: the fused bf16 decode kernel takes no prefix)"
        )
    if options.classifier is not None:
        c = options.classifier
        log.info(f"glmkit serve: glm_classify: {c.kind.replace('_', ' ')}, labels {', '.join(c.labels)}")
    return build_state(model, tokenizer, options, lambda: load()[0])


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    dtype: str = "float32",
) -> None:
    """Listen at once, load the model (``None`` = the bundled one) in ``dtype`` on a thread, serve until
    SIGTERM/SIGINT. A failed load stops the server and is raised here."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dataclasses.replace(options or ServeOptions())
    options.threads = options.threads or torch.get_num_threads()
    app = build_app(None, options.server)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(options.server.drain_timeout) + 1,
        limit_concurrency=4096,
    )
    server = DrainingServer(config, app)
    failure: list[BaseException] = []

    def load() -> None:
        torch.set_num_threads(1)  # loading starts no OpenMP team beside the engine's: see AsyncLLMEngine._run
        try:
            state = load_state(model_path, options, dtype)
        except BaseException as e:
            failure.append(e)
            server.should_exit = True
            return
        if server.should_exit:  # stopped while loading
            state.engine.shutdown()
            return
        app.state.glmkit = state
        log.info("glmkit serve: ready")

    torch.set_num_threads(1)  # the main thread (HTTP) too
    page = ", the playground at /" if options.server.playground else ""
    log.info(f"glmkit serve: http://{host}:{port} (Triton /v2, OpenAI /v1, /metrics, /openapi.json{page}); loading")
    threading.Thread(target=load, name="glmkit-load", daemon=True).start()
    server.run()
    if failure:
        raise failure[0]


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: the bundled model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default %(default)s: loopback only; 0.0.0.0 exposes it)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--cloze-task",
        default=None,
        metavar="FILE",
        help="serve the model as a cloze classifier (glm_classify) with this task: a YAML/JSON task section "
        "(name: cloze, a pattern with one {field} and one [MASK], a verbalizer); default: the cloze task of the "
        "folder's finetune.json. A sequence-classification folder is served as one without it",
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but health")
    p.add_argument(
        "--no-playground",
        dest="playground",
        action="store_false",
        help="leave out the web playground at / (its pages ask for the API key and call the APIs with it)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="sequences decoding together (KV slots); default: as many as --kv-cache-memory holds, at most "
        f"{MAX_AUTO_SEQS}",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=DEFAULT_KV_MEMORY,
        help="share of the RAM available after loading the model that the KV pool may take when --max-num-seqs is "
        "not given (default %(default)s; the resulting limit is logged)",
    )
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per model step")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="KV rows per slot (default: a GLM's 2x its context, Part A and B; a ChatGLM model's context)",
    )
    p.add_argument("--max-queue-size", type=int, default=256, help="waiting requests before 503/429")
    p.add_argument("--max-batch-size", type=int, default=16, help="dynamic batcher: one-shot requests per batch")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher: wait for a fuller batch")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=2048)
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds in-flight requests get on shutdown")
    p.add_argument(
        "--threads", type=int, default=None, help="the engine's torch threads (default: torch's choice, the cores)"
    )
    p.add_argument(
        "--pack-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="hold a bf16 model's linear weights packed in panels, which batched steps multiply faster (the tied LM "
        "head keeps a packed copy of the embedding beside it); default: wherever glmkit's CPU kernels run",
    )
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and KV cache dtype"
    )
    from ..generate.cli import add_prefix_flag

    add_prefix_flag(p)


def run(args: argparse.Namespace) -> int:
    from ..bundled import load_config, model_path

    config = load_config(args.model)
    # GLM's Part B has its own block positions beside Part A's; a ChatGLM context holds prompt and answer together
    context = config.n_positions * (2 if getattr(config, "family", "glm") == "glm" else 1)
    options = ServeOptions(
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs or 1,  # without --max-num-seqs, build_state sizes it from memory
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len or context,
            max_queue_size=args.max_queue_size,
        ),
        batching=DynamicBatchingConfig(
            max_batch_size=args.max_batch_size,
            max_queue_delay_microseconds=args.max_queue_delay_us,
            default_queue_policy=QueuePolicy(max_queue_size=args.max_queue_size),
        ),
        server=ServerConfig(
            api_key=args.api_key,
            max_body_bytes=args.max_body_bytes,
            limits=Limits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens),
            drain_timeout=args.drain_timeout,
            playground=args.playground,
        ),
        threads=args.threads,
        pack_weights=args.pack_weights,
        kv_cache_memory=None if args.max_num_seqs else args.kv_cache_memory,
        classifier=find_classifier(model_path(args.model), config.n_positions, args.cloze_task),
        prefix=args.prefix,
    )
    if options.prefix is not None and options.classifier is not None:
        raise ValueError("--prefix: glm_classify serves a fine-tuned classifier, which takes no prefix")
    serve(args.model, args.host, args.port, options, args.dtype)
    return 0
