"""The transformers config of a glmkit model, registered with ``AutoConfig`` as ``model_type: "glmkit_glm"``.

Why a type of glmkit's own: transformers' built-in ``glm`` is GLM-4 (and ``glm4`` its successor); a GLM folder that
says ``"glm"`` builds that network under the Auto classes (pad id 151329 against an 8192-row embedding). glmkit's
checkpoint writer says ``"glmkit_glm"``; its loader still reads ``"glm"`` (the THUDM hub and older glmkit folders).

Two layouts share the type: a glmkit checkpoint's ``config.json`` (the THUDM hub keys ``num_layers``,
``hidden_size``, ... plus ``glmkit_*`` keys, read by ``GLMConfig.from_hub_dict``), and the transformers wrapper of a
ChatGLM model, whose config dict sits under ``glm_config`` with its ``glmkit_family``. Building the config imports the
model and tokenizer classes (``glmkit.hf.models``), which registers them with the Auto classes: ``import glmkit``
pays only for transformers' config machinery, and the first ``Auto*.from_pretrained`` of a glmkit folder for the
rest.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from ..config import GLMConfig, SpecialTokens
from ..prompts import DEFAULT_FAMILY

MODEL_TYPE = "glmkit_glm"


class GLMHFConfig(PretrainedConfig):
    """transformers config of a glmkit model: a GLM's hub keys as attributes, or (a ChatGLM wrapper) the model config
    as a dict under ``glm_config`` with its family and special token ids."""

    model_type = MODEL_TYPE
    glm_config: dict | None = None
    special_tokens: dict | None = None
    glmkit_family: str = DEFAULT_FAMILY
    use_cache: bool = False
    classifier_dropout: float | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        # a folder that says the hub's "glm" read with this class is glmkit's: its weights take glmkit's renaming
        self.model_type = MODEL_TYPE
        if self.glm_config is None and getattr(self, "num_layers", None) is not None:
            special = self.model_config().special_tokens
            if special is not None:  # what generate() stops at and pads with, unless the folder says otherwise
                if getattr(self, "eos_token_id", None) is None:
                    self.eos_token_id = list(dict.fromkeys([special.eop, special.eos]))
                if getattr(self, "pad_token_id", None) is None:
                    self.pad_token_id = special.pad
        from . import auto  # noqa: F401  (registers the model and tokenizer classes with the Auto classes)

    @classmethod
    def from_glm_config(cls, config: GLMConfig, **kwargs: Any) -> GLMHFConfig:
        """The config of a GLM with ``config``: its hub keys, as glmkit's checkpoint writer writes them."""
        hub = {k: v for k, v in config.to_hub_dict().items() if k not in ("model_type", "architectures")}
        return cls(**hub, **kwargs)

    def hub_dict(self) -> dict[str, Any]:
        """The GLM hub keys this config holds (every key transformers' own config does not define)."""
        own = set(PretrainedConfig().to_dict()) | {"glm_config", "special_tokens", "glmkit_family", "use_cache"}
        own |= {"classifier_dropout", "pad_token_id", "eos_token_id", "bos_token_id"}
        return {k: v for k, v in self.to_dict().items() if k not in own}

    def model_config(self) -> Any:
        """The glmkit model config: a ``GLMConfig`` from the hub keys, or the ChatGLM config under ``glm_config``."""
        if self.glm_config is not None:
            from .models import MODELS

            if self.glmkit_family not in MODELS:
                raise ValueError(f"glmkit_family: unknown model family {self.glmkit_family!r}; known: {sorted(MODELS)}")
            return MODELS[self.glmkit_family][1](**self.glm_config)
        return GLMConfig.from_hub_dict(self.hub_dict())

    def special(self) -> SpecialTokens | None:
        """The special token ids: ``special_tokens`` where the wrapper recorded them, else the GLM config's."""
        if self.special_tokens:
            return SpecialTokens.from_dict(self.special_tokens)
        return getattr(self.model_config(), "special_tokens", None)


AutoConfig.register(MODEL_TYPE, GLMHFConfig, exist_ok=True)
