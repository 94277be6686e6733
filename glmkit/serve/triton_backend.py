"""glmkit inside Triton's Python backend: the classes an exported ``model.py`` delegates to.

``TritonLLM`` (decoupled) runs glmkit's continuous-batching engine in the model instance — Triton's dynamic
batcher is request-level only, so the engine keeps its own loop on a background asyncio thread and answers
through each request's response sender (deltas when the ``stream`` input is true, then the FINAL flag exactly
once, also after an error or a cancellation). ``TritonOneShot`` receives the list of requests Triton's dynamic
batcher formed and scores all their rows in one forward pass; ``TritonClassifier`` does the same for
``glm_classify``. ``pb`` is ``triton_python_backend_utils``, passed in so tests can run these classes against a
stand-in.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .batcher import DynamicBatchingConfig
from .classifier import ClassifierDef, ClassifierModel
from .engine import AsyncLLMEngine, LLMEngine
from .sampling import Limits
from .scheduler import SchedulerConfig
from .scoring import Scorer
from .served import GenerationService, LLMModel, OneShotModel
from .specs import classifier_spec, llm_spec, one_shot_specs


def load(args: dict[str, str]) -> tuple[Any, Any, dict[str, str], dict[str, Any]]:
    """Model, tokenizer, string parameters and the parsed model config of a Triton ``initialize(args)``.

    The ``checkpoint`` parameter is a folder, relative to the model's directory unless absolute; GPU instances
    load onto their own device.
    """
    import torch

    from ..bundled import load_model_and_tokenizer
    from ..generate.fast import optimize_for_decode

    config = json.loads(args["model_config"])
    params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
    folder = checkpoint_folder(args, params)
    device = "cpu"
    if args.get("model_instance_kind") == "GPU":
        device = f"cuda:{args.get('model_instance_device_id', '0')}"
    dtype = getattr(torch, params.get("dtype", "float32"))
    model, tok = load_model_and_tokenizer(folder, dtype=dtype, device=device)
    model = optimize_for_decode(model)  # eval mode; bf16 on CPU: the kernels' linears
    if params.get("pack_weights", "true").lower() != "false":
        from .. import kernels

        kernels.pack_linear(model, release=True)  # as glmkit serve: bf16 weights in panels (others: no change)
    return model, tok, params, config


def checkpoint_folder(args: dict[str, str], params: dict[str, str]) -> Path:
    folder = Path(params.get("checkpoint", "1/checkpoint"))
    return folder if folder.is_absolute() else Path(args["model_repository"]) / folder


class TritonLLM:
    def __init__(self, args: dict[str, str], pb: Any) -> None:
        model, tok, p, _ = load(args)
        self.pb = pb
        scheduler = SchedulerConfig(
            max_num_seqs=int(p.get("max_num_seqs", 16)),
            max_num_batched_tokens=int(p.get("max_num_batched_tokens", 2048)),
            max_model_len=int(p.get("max_model_len", 2 * model.config.n_positions)),
            max_queue_size=int(p.get("max_queue_size", 256)),
        )
        self.engine = AsyncLLMEngine(LLMEngine(model, tok, scheduler)).start()
        limits = Limits(
            max_tokens=int(p.get("max_tokens", 256)), max_prompt_tokens=int(p.get("max_prompt_tokens", 2048))
        )
        self.model = LLMModel(llm_spec(), GenerationService(self.engine, tok, limits))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="glmkit-triton", daemon=True)
        self.thread.start()

    def execute(self, requests: list[Any]) -> None:
        """Decoupled: every request answers through its sender; ``execute`` returns at once."""
        for request in requests:
            asyncio.run_coroutine_threadsafe(self._handle(request), self.loop)

    async def _handle(self, request: Any) -> None:
        pb = self.pb
        sender = request.get_response_sender()
        try:
            inputs = {}
            for t in self.model.spec.inputs:
                tensor = pb.get_input_tensor_by_name(request, t.name)
                if tensor is not None:
                    inputs[t.name] = tensor.as_numpy()
            if "text_input" not in inputs:
                raise ValueError("text_input: missing")
            params = json.loads(request.parameters() or "{}")
            responses = self.model.generate(inputs, params)
            try:
                async for out in responses:
                    if getattr(sender, "is_cancelled", lambda: False)():
                        break  # closing the generator aborts the engine request and frees its slot
                    tensors = [pb.Tensor(name, np.asarray(value)) for name, value in out.items()]
                    sender.send(pb.InferenceResponse(output_tensors=tensors))
            finally:
                await responses.aclose()  # type: ignore[attr-defined]
        except Exception as e:
            sender.send(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(f"{type(e).__name__}: {e}")))
        finally:
            sender.send(flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class TritonOneShot:
    def __init__(self, args: dict[str, str], pb: Any) -> None:
        model, tok, p, config = load(args)
        self.pb = pb
        batching = DynamicBatchingConfig(max_batch_size=max(1, int(config.get("max_batch_size", 1))))
        which = p.get("glmkit_model", config.get("name", ""))
        specs = {s.name: s for s in one_shot_specs(batching, model.config.n_embd, model.config.vocab_size)}
        if which not in specs:
            raise ValueError(f"glmkit_model: {which!r} is not one of {sorted(specs)}")
        self.model = OneShotModel(specs[which], Scorer(model, model.config.special_tokens or tok.special), tok)

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; a bad request gets an error response, the others still run (all
        the good ones' rows in one forward pass)."""
        pb = self.pb
        rows, errors = [], {}
        for i, request in enumerate(requests):
            try:
                inputs = {}
                for t in self.model.spec.inputs:
                    tensor = pb.get_input_tensor_by_name(request, t.name)
                    if tensor is None:
                        raise ValueError(f"{t.name}: missing")
                    inputs[t.name] = tensor.as_numpy()
                rows.append(self.model.rows(inputs))
            except ValueError as e:
                errors[i] = str(e)
                rows.append([])
        results = self.model.scorer([r for r in rows if r]) if any(rows) else []
        responses, k = [], 0
        for i in range(len(rows)):
            if i in errors:
                responses.append(pb.InferenceResponse(output_tensors=[], error=pb.TritonError(errors[i])))
                continue
            out = self.model.outputs(results[k])
            k += 1
            responses.append(pb.InferenceResponse(output_tensors=[pb.Tensor(n, v) for n, v in out.items()]))
        return responses


class TritonClassifier(TritonOneShot):
    """``glm_classify`` (classifier.py): the definition ``export-triton`` wrote into the ``glmkit_classifier``
    parameter, its head read from the checkpoint; ``execute`` is the one-shot models'."""

    def __init__(self, args: dict[str, str], pb: Any) -> None:
        model, tok, p, config = load(args)
        self.pb = pb
        definition = ClassifierDef.from_json(p["glmkit_classifier"], checkpoint_folder(args, p))
        batching = DynamicBatchingConfig(max_batch_size=max(1, int(config.get("max_batch_size", 1))))
        spec = classifier_spec(batching, definition.labels, definition.kind)
        self.model = ClassifierModel(spec, definition, tok)
        self.model.scorer, self.model.ready = definition.build(model, tok), True
