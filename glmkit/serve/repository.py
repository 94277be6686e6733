"""Triton's model-repository extension for ``glmkit serve``: ``load`` builds a model, ``unload`` frees it.

The served models (four; five with ``glm_classify``) are views of one GLM. Unloading one refuses its new requests
(404, as Triton answers a model with no available version), lets the ones in flight finish, stops its worker and
drops what is its own: ``llm`` its engine thread and KV pool (the OpenAI routes answer 404 meanwhile), a one-shot
model its dynamic batcher. Once no loaded model uses the GLM its weights go too, when the server has a ``source``
to read them again from (``glmkit serve`` loads its checkpoint folder in the same dtype, and prepares it for
decoding as at start); a server built from a model object with no source keeps that object. ``load`` rebuilds what
``unload`` dropped, reading the GLM from the source first if it is gone.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import kernels
from ..generate.engine import resolve_special_tokens
from ..generate.fast import optimize_for_decode
from .app import ServerState
from .batcher import DynamicBatcher
from .classifier import ClassifierModel
from .engine import AsyncLLMEngine, LLMEngine
from .metrics import ServerMetrics
from .scoring import Scorer
from .served import GenerationService, LLMModel, OneShotModel
from .specs import CLASSIFY, classifier_spec, llm_spec, one_shot_specs
from .stats import ModelStats

if TYPE_CHECKING:
    from .server import ServeOptions

Source = Callable[[], torch.nn.Module]
LLM = "llm"
log = logging.getLogger("glmkit.serve")


class ModelRepository:
    """Builds the served models of ``build_state`` and loads and unloads them one by one."""

    def __init__(self, options: ServeOptions, tokenizer: Any, source: Source | None) -> None:
        self.options, self.tok, self.source = options, tokenizer, source
        self._lock = asyncio.Lock()
        self._kept: torch.nn.Module | None = None  # the GLM, held here only when there is no source to reread it
        self._glm: weakref.ref[torch.nn.Module] | None = None
        self.llm_stats = ModelStats(LLM)
        self.state: ServerState

    def start(self, model: torch.nn.Module) -> ServerState:
        """Every model loaded over ``model``: the state ``build_app`` serves."""
        self._adopt(model)
        options = self.options
        service = GenerationService(self._engine(model), self.tok, options.server.limits)
        models: dict[str, Any] = {LLM: LLMModel(llm_spec(), service)}
        for spec in one_shot_specs(options.batching, model.config.n_embd, model.config.vocab_size):
            models[spec.name] = OneShotModel(spec, None, self.tok, stats=ModelStats(spec.name))
        c = options.classifier
        if c is not None:  # a fine-tuned classifier: one more view of the GLM (classifier.py)
            spec = classifier_spec(options.batching, c.labels, c.kind)
            models[CLASSIFY] = ClassifierModel(spec, c, self.tok, stats=ModelStats(CLASSIFY))
        state = ServerState(options.server, service.engine, service, models, [], repository=self)
        self.state = state
        for name in models:
            if name != LLM:
                self._start_one_shot(models[name], model)
        state.metrics = ServerMetrics(m.stats for m in models.values())
        return state

    def _adopt(self, model: torch.nn.Module) -> None:
        model.eval()  # the engine's runner also puts a bf16 model's linears and LM head on the kernels (in place)
        if self.options.pack_weights is not False:
            packed = kernels.pack_linear(optimize_for_decode(model), release=True)
            if self.options.pack_weights and not packed:
                log.warning("pack_weights: nothing packed (it needs bf16 weights on a CPU with glmkit's kernels)")
        self._glm = weakref.ref(model)
        self._kept = model if self.source is None else None

    def _model(self) -> torch.nn.Module:
        """The GLM the loaded models share, read from the source again if none is loaded."""
        model = self._glm() if self._glm is not None else None
        if model is None:
            assert self.source is not None  # without a source the GLM is kept
            model = self.source()
            self._adopt(model)
        return model

    def _engine(self, model: torch.nn.Module) -> AsyncLLMEngine:
        o = self.options
        engine = LLMEngine(model, self.tok, o.scheduler, stats=self.llm_stats)
        return AsyncLLMEngine(engine, o.max_jobs, o.threads).start()

    def _start_one_shot(self, served: OneShotModel, model: torch.nn.Module) -> None:
        name = served.spec.name
        if isinstance(served, ClassifierModel):
            scorer = served.definition.build(model, self.tok)
        else:
            scorer = Scorer(model, resolve_special_tokens(model, None, self.tok))
        served.batcher = DynamicBatcher(self.options.batching, scorer, stats=served.stats, name=name).start()
        served.scorer, served.ready = scorer, True
        self.state.batchers.append(served.batcher)

    def _load(self, name: str) -> None:
        model = self._model()
        served = self.state.models[name]
        if isinstance(served, LLMModel):
            engine = self._engine(model)
            served.service.attach(engine)
            self.state.engine = engine
            served.ready = True
        else:
            self._start_one_shot(served, model)

    async def load(self, name: str) -> None:
        """Build ``name`` again (a loaded model stays as it is), on a thread: reading the GLM takes a while."""
        async with self._lock:
            if not self.state.models[name].ready:
                await asyncio.to_thread(self._load, name)

    async def unload(self, name: str) -> None:
        """Refuse ``name``'s new requests, wait up to ``drain_timeout`` s for those in flight, free what it holds."""
        async with self._lock:
            served = self.state.models[name]
            if not served.ready:
                return
            served.ready = False
            timeout = self.state.config.drain_timeout
            if isinstance(served, LLMModel):
                engine = self.state.engine
                await engine.drain(timeout)
                await asyncio.to_thread(engine.shutdown)
                served.service.attach(None)
                self.state.engine = None  # type: ignore[assignment]
            else:
                batcher, served.batcher, served.scorer = served.batcher, None, None
                deadline = time.monotonic() + timeout
                while served.active and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert batcher is not None
                await asyncio.to_thread(batcher.shutdown)
                self.state.batchers.remove(batcher)
            gc.collect()  # the modules' reference cycles hold the weights until a collection
