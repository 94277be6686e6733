"""The ChatGLM family: ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B (v2.py) and ChatGLM-6B (v1.py), loaded from their hub
layouts by hub.py."""

from .v2 import ChatGLM2, ChatGLM2Config

__all__ = ["ChatGLM2", "ChatGLM2Config"]
