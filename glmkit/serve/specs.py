"""The models glmkit serves, described once: Triton metadata, config JSON and ``config.pbtxt`` come from here.

The native server and the exported Triton repository (export.py) must present the same interface, so both render
these specs. The generation model uses the tensor names of NVIDIA's vLLM backend (``text_input``, ``stream``,
``sampling_parameters``, ``exclude_input_in_output`` → ``text_output``, ``finish_reason``), which Triton's generate
endpoint and its OpenAI front end expect; it is decoupled (several responses per request) with
``max_batch_size: 0``. The one-shot models are dynamically batched. Config JSON is written out with every leaf
Triton writes (perf_analyzer reads ``model_transaction_policy.decoupled`` and ``response_cache.enable``
unconditionally once their parents exist).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .batcher import DynamicBatchingConfig, QueuePolicy

LLM, SCORE, EMBED, LOGITS = "llm", "glm_score", "glm_embed", "glm_logits"
CLASSIFY = "glm_classify"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # wire name: BYTES, FP32, INT32, BOOL, ...
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def config_type(self) -> str:
        return "TYPE_STRING" if self.datatype == "BYTES" else f"TYPE_{self.datatype}"


@dataclass
class ModelSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0
    decoupled: bool = False
    dynamic_batching: DynamicBatchingConfig | None = None
    version: str = "1"
    parameters: dict[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def full_shape(self, t: TensorSpec) -> list[int]:
        return ([-1] if self.max_batch_size > 0 else []) + list(t.dims)

    def metadata(self) -> dict[str, Any]:
        """``GET /v2/models/{name}``."""

        def tensors(ts: list[TensorSpec]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": self.full_shape(t)} for t in ts]

        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "python",
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
        }

    def config(self) -> dict[str, Any]:
        """``GET /v2/models/{name}/config``: Triton's JSON, every leaf present, int64s as numbers."""
        cfg: dict[str, Any] = {
            "name": self.name,
            "platform": "",
            "backend": "python",
            "runtime": "",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.max_batch_size,
            "input": [
                {
                    "name": t.name,
                    "data_type": t.config_type,
                    "format": "FORMAT_NONE",
                    "dims": list(t.dims),
                    "is_shape_tensor": False,
                    "allow_ragged_batch": False,
                    "optional": t.optional,
                }
                for t in self.inputs
            ],
            "output": [
                {
                    "name": t.name,
                    "data_type": t.config_type,
                    "dims": list(t.dims),
                    "label_filename": "",
                    "is_shape_tensor": False,
                }
                for t in self.outputs
            ],
            "batch_input": [],
            "batch_output": [],
            "optimization": {
                "priority": "PRIORITY_DEFAULT",
                "input_pinned_memory": {"enable": True},
                "output_pinned_memory": {"enable": True},
            },
            "instance_group": [
                {
                    "name": f"{self.name}_0",
                    "kind": "KIND_CPU",
                    "count": 1,
                    "gpus": [],
                    "secondary_devices": [],
                    "profile": [],
                    "passive": False,
                    "host_policy": "",
                }
            ],
            "default_model_filename": "model.py",
            "cc_model_filenames": {},
            "metric_tags": {},
            "parameters": {k: {"string_value": v} for k, v in self.parameters.items()},
            "model_warmup": [],
            "model_transaction_policy": {"decoupled": self.decoupled},
            "response_cache": {"enable": False},
        }
        if self.dynamic_batching is not None:
            cfg["dynamic_batching"] = _batching_json(self.dynamic_batching)
        return cfg

    def pbtxt(self, instance_kind: str = "KIND_CPU") -> str:
        """``config.pbtxt`` (protobuf text format of ``inference.ModelConfig``) for a Triton python-backend model."""

        def tensor(t: TensorSpec, is_input: bool) -> str:
            opt = " optional: true" if is_input and t.optional else ""
            return f'  {{ name: "{t.name}" data_type: {t.config_type} dims: [ {", ".join(map(str, t.dims))} ]{opt} }}'

        lines = [f'name: "{self.name}"', 'backend: "python"', f"max_batch_size: {self.max_batch_size}"]
        if self.decoupled:
            lines.append("model_transaction_policy { decoupled: true }")
        lines += ["input ["] + [",\n".join(tensor(t, True) for t in self.inputs)] + ["]"]
        lines += ["output ["] + [",\n".join(tensor(t, False) for t in self.outputs)] + ["]"]
        if self.dynamic_batching is not None:
            lines.append(_batching_pbtxt(self.dynamic_batching))
        lines.append(f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]")
        for k, v in self.parameters.items():
            value = v.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'parameters: {{ key: "{k}" value: {{ string_value: "{value}" }} }}')
        return "\n".join(lines) + "\n"


def _policy_json(p: QueuePolicy) -> dict[str, Any]:
    return {
        "timeout_action": p.timeout_action,
        "default_timeout_microseconds": p.default_timeout_microseconds,
        "allow_timeout_override": p.allow_timeout_override,
        "max_queue_size": p.max_queue_size,
    }


def _batching_json(b: DynamicBatchingConfig) -> dict[str, Any]:
    return {
        "preferred_batch_size": list(b.preferred_batch_size),
        "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
        "preserve_ordering": b.preserve_ordering,
        "priority_levels": b.priority_levels,
        "default_priority_level": b.default_priority_level,
        "default_queue_policy": _policy_json(b.default_queue_policy),
        "priority_queue_policy": {str(k): _policy_json(v) for k, v in b.priority_queue_policy.items()},
    }


def _policy_pbtxt(p: QueuePolicy) -> str:
    return (
        f"{{ timeout_action: {p.timeout_action} default_timeout_microseconds: {p.default_timeout_microseconds} "
        f"allow_timeout_override: {str(p.allow_timeout_override).lower()} max_queue_size: {p.max_queue_size} }}"
    )


def _batching_pbtxt(b: DynamicBatchingConfig) -> str:
    parts = []
    if b.preferred_batch_size:
        parts.append(f"  preferred_batch_size: [ {', '.join(map(str, b.preferred_batch_size))} ]")
    parts.append(f"  max_queue_delay_microseconds: {b.max_queue_delay_microseconds}")
    parts.append(f"  preserve_ordering: {str(b.preserve_ordering).lower()}")
    if b.priority_levels:
        parts.append(f"  priority_levels: {b.priority_levels}")
        parts.append(f"  default_priority_level: {b.default_priority_level}")
    parts.append(f"  default_queue_policy {_policy_pbtxt(b.default_queue_policy)}")
    for level, p in b.priority_queue_policy.items():
        parts.append(f"  priority_queue_policy {{ key: {level} value {_policy_pbtxt(p)} }}")
    return "dynamic_batching {\n" + "\n".join(parts) + "\n}"


def llm_spec() -> ModelSpec:
    """The generation model: vLLM-backend tensor names, decoupled, batched by the engine (not by Triton)."""
    return ModelSpec(
        LLM,
        inputs=[
            TensorSpec("text_input", "BYTES", (1,)),
            TensorSpec("stream", "BOOL", (1,), optional=True),
            TensorSpec("sampling_parameters", "BYTES", (1,), optional=True),
            TensorSpec("exclude_input_in_output", "BOOL", (1,), optional=True),
        ],
        outputs=[TensorSpec("text_output", "BYTES", (-1,)), TensorSpec("finish_reason", "BYTES", (-1,))],
        decoupled=True,
    )


def one_shot_specs(batching: DynamicBatchingConfig, n_embd: int, vocab_size: int) -> list[ModelSpec]:
    """The dynamically batched models: continuation log-likelihood, embeddings, next-token logits."""
    text = TensorSpec("text_input", "BYTES", (1,))
    mbs = batching.max_batch_size
    return [
        ModelSpec(
            SCORE,
            [text, TensorSpec("continuation", "BYTES", (1,))],
            [
                TensorSpec("logprob", "FP32", (1,)),
                TensorSpec("is_greedy", "BOOL", (1,)),
                TensorSpec("num_tokens", "INT32", (1,)),
            ],
            max_batch_size=mbs,
            dynamic_batching=batching,
        ),
        ModelSpec(
            EMBED, [text], [TensorSpec("embedding", "FP32", (n_embd,))], max_batch_size=mbs, dynamic_batching=batching
        ),
        ModelSpec(
            LOGITS, [text], [TensorSpec("logits", "FP32", (vocab_size,))], max_batch_size=mbs, dynamic_batching=batching
        ),
    ]


def classifier_spec(batching: DynamicBatchingConfig, labels: Sequence[str], kind: str) -> ModelSpec:
    """``glm_classify`` (classifier.py): ``TEXT`` → ``LOGITS`` over ``labels`` and the best one's name as ``LABEL``;
    the parameters name the kind of head and the labels in logit order (the config endpoint shows them)."""
    return ModelSpec(
        CLASSIFY,
        [TensorSpec("TEXT", "BYTES", (1,))],
        [TensorSpec("LOGITS", "FP32", (len(labels),)), TensorSpec("LABEL", "BYTES", (1,))],
        max_batch_size=batching.max_batch_size,
        dynamic_batching=batching,
        parameters={"classifier": kind, "labels": json.dumps(list(labels))},
    )
