"""What the ChatGLM model classes (v1.py, v2.py) share: random init for tests and benchmarks, and loading / saving
through the family registry of hub.py."""

from __future__ import annotations

import torch
import torch.nn as nn


class HubModel(nn.Module):
    """A ChatGLM model whose checkpoints are hub folders (``glmkit.chatglm.hub``)."""

    def reset_parameters(self, std: float = 0.02) -> None:
        """N(0, std) weights, zero biases, unit norms: the hub ships no init, this is a random model for tests and
        benchmarks."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".norm_" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, std)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", **config_overrides) -> nn.Module:
        """Load a hub checkpoint folder (``glmkit.chatglm.hub.load_pretrained``)."""
        from .hub import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device, **config_overrides)

    def save_pretrained(self, path, max_shard_size: int | None = None) -> None:
        """Write the hub layout (``glmkit.chatglm.hub.save_pretrained``)."""
        from .hub import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)
