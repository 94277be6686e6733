"""``glmkit serve``: one process serving a GLM over the Triton/KServe v2 and OpenAI HTTP APIs.

``build_state`` wires a model and tokenizer into the engines (continuous batching for ``llm``, one dynamic
batcher per one-shot model) and is what tests call; ``serve`` runs it under uvicorn, loopback by default. On
SIGTERM/SIGINT the server stops reporting ready, refuses new work with 503 + Retry-After, lets in-flight requests
finish (up to ``--drain-timeout`` s) and then stops the engines.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import kernels
from ..generate.fast import optimize_for_decode
from .app import ServerConfig, ServerState, build_app
from .batcher import DynamicBatcher, DynamicBatchingConfig, QueuePolicy
from .engine import AsyncLLMEngine, LLMEngine
from .metrics import ServerMetrics
from .sampling import Limits
from .scheduler import SchedulerConfig
from .scoring import Scorer
from .served import GenerationService, LLMModel, OneShotModel
from .specs import llm_spec, one_shot_specs
from .stats import ModelStats


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


def build_state(model: torch.nn.Module, tokenizer: Any, options: ServeOptions | None = None) -> ServerState:
    """Start the engines over ``model`` and return the state ``build_app`` serves."""
    options = options or ServeOptions()
    model.eval()  # the engine's runner also puts a bf16 model's linears and LM head on the kernels (in place)
    if options.pack_weights is not False:
        packed = kernels.pack_linear(optimize_for_decode(model), release=True)
        if options.pack_weights and not packed:
            logging.getLogger("glmkit.serve").warning(
                "pack_weights: nothing packed (it needs bf16 weights on a CPU with glmkit's kernels)"
            )
    llm_stats = ModelStats("llm")
    engine = AsyncLLMEngine(
        LLMEngine(model, tokenizer, options.scheduler, stats=llm_stats), options.max_jobs, options.threads
    ).start()
    service = GenerationService(engine, tokenizer, options.server.limits)
    models: dict[str, Any] = {"llm": LLMModel(llm_spec(), service)}
    scorer = Scorer(model, engine.engine.special)
    batchers = []
    for spec in one_shot_specs(options.batching, model.config.n_embd, model.config.vocab_size):
        stats = ModelStats(spec.name)
        batcher = DynamicBatcher(options.batching, scorer, stats=stats, name=spec.name).start()
        batchers.append(batcher)
        models[spec.name] = OneShotModel(spec, scorer, tokenizer, batcher, stats)
    state = ServerState(options.server, engine, service, models, batchers)
    state.metrics = ServerMetrics(m.stats for m in models.values())
    return state


def serve(
    model_path: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    options: ServeOptions | None = None,
    dtype: str = "float32",
) -> None:
    """Load the model (``None`` = the bundled one) in ``dtype`` and serve until SIGTERM/SIGINT."""
    import uvicorn

    from ..bundled import load_model_and_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = dataclasses.replace(options or ServeOptions())
    options.threads = options.threads or torch.get_num_threads()
    torch.set_num_threads(1)  # the main thread (loading, then HTTP) starts no OpenMP team: see AsyncLLMEngine._run
    model, tokenizer = load_model_and_tokenizer(model_path, dtype=getattr(torch, dtype))
    state = build_state(model, tokenizer, options)
    config = uvicorn.Config(
        build_app(state),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(options.server.drain_timeout) + 1,
        limit_concurrency=4096,
    )
    server = uvicorn.Server(config)
    handle_exit = server.handle_exit

    def draining_exit(sig: int, frame: Any) -> None:
        state.draining = True  # not ready, new work gets 503 + Retry-After; in-flight requests finish
        handle_exit(sig, frame)

    server.handle_exit = draining_exit  # type: ignore[method-assign]
    logging.getLogger("glmkit.serve").info(f"glmkit serve: http://{host}:{port} (Triton /v2, OpenAI /v1, /metrics)")
    server.run()


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder with its tokenizer (default: the bundled model)")
    p.add_argument(
        "--host", default="127.0.0.1", help="bind address (default %(default)s: loopback only; 0.0.0.0 exposes it)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but health")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences decoding together (KV slots)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens per model step")
    p.add_argument("--max-model-len", type=int, default=None, help="KV rows per slot (default: 2x the context)")
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


def run(args: argparse.Namespace) -> int:
    from ..bundled import model_path
    from ..config import GLMConfig

    n_positions = GLMConfig.from_file(model_path(args.model) / "config.json").n_positions
    options = ServeOptions(
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len or 2 * n_positions,
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
        ),
        threads=args.threads,
        pack_weights=args.pack_weights,
    )
    serve(args.model, args.host, args.port, options, args.dtype)
    return 0
