"""GLM model configuration: a dataclass that reads and writes the THUDM hub ``config.json`` format.

Internal names follow nanoGPT/litgpt (``n_layer``, ``n_embd``, ``n_head``); the hub names appear only in
``_HUB_TO_FIELD`` below, so a hub ``config.json`` round-trips unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A config field is unknown, has the wrong type or an impossible value; the message names the field."""


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the GLM special tokens for one tokenizer (docs/glm-notes.md, "Special tokens"). ``None`` = not in this
    vocabulary."""

    eos: int
    pad: int
    cls: int
    mask: int
    sop: int
    eop: int
    smask: int | None = None
    gmask: int | None = None
    sep: int | None = None
    unk: int | None = None

    def mask_ids(self) -> tuple[int, ...]:
        """Every blank token id this vocabulary has: [MASK], [sMASK], [gMASK]."""
        return tuple(i for i in (self.mask, self.smask, self.gmask) if i is not None)

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpecialTokens:
        if not isinstance(d, dict):
            raise ConfigError(f"special_tokens: expected a mapping of token name to id, found {_json_kind(d)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"special_tokens: unknown token name(s) {unknown}; known: {sorted(names)}")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ConfigError(f"special_tokens: missing required id(s) {missing}")
        for k, v in d.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ConfigError(f"special_tokens.{k}: expected a non-negative int id, got {v!r}")
        return cls(**d)


# The GPT-2-vocabulary layout of glm-2b / glm-10b (docs/glm-notes.md, TV10), the default for a config that names no
# tokens.
GPT2_SPECIAL_TOKENS = SpecialTokens(
    eos=50256, pad=50256, sop=50257, eop=50258, cls=50259, mask=50260, sep=50261, unk=50262, gmask=50263, smask=50264
)


# What glmkit writes: transformers' own "glm" is GLM-4, so its Auto classes would build the wrong network for a folder
# that says "glm" (glmkit.hf registers this type). The hub's and older glmkit folders' "glm" still loads.
MODEL_TYPE = "glmkit_glm"

POSITION_ENCODINGS = ("learned", "rotary_2d_interleaved")
# The bundled model's config.json (and any checkpoint saved before the rename) says "rotary_2d": the same math.
_RENAMED_POSITION_ENCODINGS = {"rotary_2d": "rotary_2d_interleaved"}


@dataclass
class GLMConfig:
    """Shape and numerics of an original GLM (BlockLM) model.

    Attributes:
        n_layer: transformer blocks (hub ``num_layers``).
        n_embd: hidden size (hub ``hidden_size``); the MLP is always 4 * n_embd wide.
        n_head: attention heads (hub ``num_attention_heads``); must divide ``n_embd``.
        vocab_size: rows of the (padded) word-embedding table, which is also the tied LM head.
        max_sequence_length: largest position id; both position tables have ``max_sequence_length + 1`` rows.
        layernorm_eps: LayerNorm epsilon (hard-coded 1e-5 in the released code; no hub key).
        embedding_dropout / attention_dropout / output_dropout: training-time dropout probabilities.
        gelu: ``"tanh"`` (the original THUDM/GLM training code) or ``"erf"`` (what the hub modeling_glm.py runs).
        block_position_encoding: add the block-position table (the 2D positional encoding); True for every release.
        position_encoding: ``"learned"`` — position and block-position tables added at the input, as released — or
            ``"rotary_2d_interleaved"``: no tables; each head's queries and keys are rotated in adjacent pairs, the
            first half of the head by the position and the second half by the block position (glmkit's 2D RoPE,
            rotary.py; ChatGLM-6B rotates other pairs, so its weights do not fit). Relative positions are what a
            small model learns from little data (benchmarks/RESULTS.md, "2D rotary positions"). The name this
            variant had before, ``"rotary_2d"``, still loads as it.
        initializer_range: std of the normal init of embeddings and input-side linear weights.
        special_tokens: ids of [CLS], [MASK], [sMASK], [gMASK], sop, eop, eos, pad for this vocabulary; ``None``
            when the checkpoint does not say (hub configs do not; the tokenizer then supplies them).
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    vocab_size: int = 640
    max_sequence_length: int = 64
    layernorm_eps: float = 1e-5
    embedding_dropout: float = 0.1
    attention_dropout: float = 0.1
    output_dropout: float = 0.1
    gelu: Literal["tanh", "erf"] = "tanh"
    block_position_encoding: bool = True
    position_encoding: Literal["learned", "rotary_2d_interleaved"] = "learned"
    initializer_range: float = 0.02
    special_tokens: SpecialTokens | None = None

    def __post_init__(self) -> None:
        if isinstance(self.special_tokens, dict):
            self.special_tokens = SpecialTokens.from_dict(self.special_tokens)
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "max_sequence_length"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}: expected a positive int, got {v!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_head: {self.n_head} heads do not divide n_embd={self.n_embd}")
        for name in ("embedding_dropout", "attention_dropout", "output_dropout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise ConfigError(f"{name}: expected a probability in [0, 1), got {v!r}")
        if not isinstance(self.layernorm_eps, (int, float)) or not 0 < self.layernorm_eps < 1:
            raise ConfigError(f"layernorm_eps: expected a small positive float, got {self.layernorm_eps!r}")
        if self.gelu not in ("tanh", "erf"):
            raise ConfigError(f"gelu: expected 'tanh' or 'erf', got {self.gelu!r}")
        if self.position_encoding in _RENAMED_POSITION_ENCODINGS:  # configs and checkpoints written before the rename
            self.position_encoding = _RENAMED_POSITION_ENCODINGS[self.position_encoding]
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ConfigError(
                f"position_encoding: expected one of {list(POSITION_ENCODINGS)}, got {self.position_encoding!r}"
            )
        if self.position_encoding != "learned" and self.head_size % 4:
            raise ConfigError(
                f"position_encoding: {self.position_encoding} needs a head size divisible by 4, got {self.head_size}"
            )
        if not isinstance(self.initializer_range, (int, float)) or not self.initializer_range > 0:
            raise ConfigError(f"initializer_range: expected a positive float, got {self.initializer_range!r}")
        if not isinstance(self.block_position_encoding, bool):
            raise ConfigError(f"block_position_encoding: expected a bool, got {self.block_position_encoding!r}")
        for k, v in (self.special_tokens.to_dict() if self.special_tokens else {}).items():
            if v is not None and v >= self.vocab_size:
                raise ConfigError(
                    f"special_tokens.{k}: id {v} is outside the vocabulary (vocab_size={self.vocab_size})"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_positions(self) -> int:
        """Rows of each position table (GPT2ParallelTransformer allocates max_sequence_length + 1)."""
        return self.max_sequence_length + 1

    def num_parameters(self) -> int:
        h, v, p, n = self.n_embd, self.vocab_size, self.n_positions, self.n_layer
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
        tables = 0 if self.position_encoding != "learned" else (2 if self.block_position_encoding else 1)
        return v * h + p * h * tables + n * per_layer + 2 * h

    # ---- hub config.json ---------------------------------------------------------------------------------

    def to_hub_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_type": MODEL_TYPE,
            "architectures": ["GLMModel"],
            **{hub: getattr(self, f) for hub, f in _HUB_TO_FIELD.items()},
            "relative_encoding": False,
            "attention_scale": 1.0,
            "output_predict": True,
            "parallel_output": True,
            "pool_token": "cls",
            "checkpoint_activations": False,
            "checkpoint_num_layers": 1,
            "max_memory_length": 0,
            "glmkit_gelu": self.gelu,
        }
        if self.special_tokens is not None:
            d["glmkit_special_tokens"] = self.special_tokens.to_dict()
        if self.position_encoding != "learned":
            d["glmkit_position_encoding"] = self.position_encoding
        return d

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any], **overrides: Any) -> GLMConfig:
        """Build from a hub ``config.json`` dict. Unknown keys and unsupported variants raise ``ConfigError``."""
        if not isinstance(d, dict):
            raise ConfigError(f"expected a hub config (a JSON object), found {_json_kind(d)}")
        unknown = sorted(set(d) - set(_HUB_TO_FIELD) - _HUB_IGNORED - _GLMKIT_KEYS)
        if unknown:
            raise ConfigError(f"unknown hub config field(s) {unknown}")
        if d.get("model_type", MODEL_TYPE) not in (MODEL_TYPE, "glm"):
            raise ConfigError(f"model_type: expected {MODEL_TYPE!r} (or the hub's 'glm'), got {d['model_type']!r}")
        if d.get("relative_encoding", False):
            raise ConfigError("relative_encoding: Transformer-XL relative encoding is not used by any released GLM")
        if d.get("attention_scale", 1.0) != 1.0:
            raise ConfigError(f"attention_scale: only 1.0 is supported, got {d['attention_scale']!r}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "max_sequence_length"):
            if key not in d:
                raise ConfigError(f"missing required hub config field {key!r}")
        kwargs = {f: d[hub] for hub, f in _HUB_TO_FIELD.items() if hub in d}
        if "glmkit_gelu" in d:
            kwargs["gelu"] = d["glmkit_gelu"]
        elif "hidden_act" in d:
            acts = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
            if not isinstance(d["hidden_act"], str) or d["hidden_act"] not in acts:
                raise ConfigError(f"hidden_act: expected one of {sorted(acts)}, got {d['hidden_act']!r}")
            kwargs["gelu"] = acts[d["hidden_act"]]
        if "glmkit_position_encoding" in d:
            kwargs["position_encoding"] = d["glmkit_position_encoding"]
        if "glmkit_special_tokens" in d:
            kwargs["special_tokens"] = SpecialTokens.from_dict(d["glmkit_special_tokens"])
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if bad:
            raise ConfigError(f"overrides: unknown GLMConfig field(s) {bad}")
        return cls(**{**kwargs, **overrides})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hub_dict(), indent=2) + "\n")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> GLMConfig:
        """Read a hub ``config.json`` (or the one in folder ``path``); a bad field raises ``ConfigError`` naming it
        and the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {path.parent}")
        d = read_json_object(path)
        try:
            return cls.from_hub_dict(d, **overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object a file holds; a file that is not UTF-8 JSON, or holds another JSON value, raises
    ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object {{...}}, found {_json_kind(d)}")
    return d


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


_HUB_TO_FIELD = {
    "num_layers": "n_layer",
    "hidden_size": "n_embd",
    "num_attention_heads": "n_head",
    "vocab_size": "vocab_size",
    "max_sequence_length": "max_sequence_length",
    "layernorm_epsilon": "layernorm_eps",
    "embedding_dropout_prob": "embedding_dropout",
    "attention_dropout_prob": "attention_dropout",
    "output_dropout_prob": "output_dropout",
    "block_position_encoding": "block_position_encoding",
    "initializer_range": "initializer_range",
}
# Keys the hub configs carry that do not change the base model's math (heads, HF plumbing, P-tuning settings).
_HUB_IGNORED = {
    "model_type", "architectures", "auto_map", "torch_dtype", "transformers_version", "relative_encoding",
    "attention_scale", "checkpoint_activations", "checkpoint_num_layers", "max_memory_length", "parallel_output",
    "output_predict", "pool_token", "spell_length", "spell_func", "hidden_act", "num_hidden_layers",
    "bos_token_id", "eos_token_id", "pad_token_id", "mask_token_id", "gmask_token_id", "smask_token_id",
    "tokenizer_class", "_name_or_path", "use_cache",
    # what transformers' config adds when it saves a folder (glmkit.hf's models, their heads' labels)
    "dtype", "id2label", "label2id", "problem_type", "classifier_dropout", "glmkit_family", "glm_config",
    "special_tokens",
}  # fmt: skip
_GLMKIT_KEYS = {"glmkit_gelu", "glmkit_special_tokens", "glmkit_quantization", "glmkit_position_encoding"}
