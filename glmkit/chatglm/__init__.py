"""The ChatGLM family: ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B (v2.py) and ChatGLM-6B (v1.py), loaded from and saved in
their hub layouts by hub.py (``GLM.from_pretrained`` of a ``model_type: "chatglm"`` folder goes there)."""

from .hub import load_pretrained, save_pretrained
from .v1 import ChatGLM6B, ChatGLM6BConfig
from .v2 import ChatGLM2, ChatGLM2Config

__all__ = ["ChatGLM2", "ChatGLM2Config", "ChatGLM6B", "ChatGLM6BConfig", "load_pretrained", "save_pretrained"]
