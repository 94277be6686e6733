"""A preallocated per-layer key/value cache with a length per row.

GLM adds its (2D) positions only at the input, so a cached token's keys and values never change: caching K/V is
exactly equivalent to the hub's ``mems`` (per-layer hidden states recomputed every step), and much cheaper.
Rows may hold different numbers of tokens (batched prompts of different lengths, continuous batching); the
model writes new tokens of row ``b`` at ``lengths[b]`` and later tokens see every cached token of their row.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_length: int,
        head_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_length, head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        # a host-side mirror avoids a device sync on every decode step
        self._host_lengths: list[int] = [0] * batch_size

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_length: int, **kw) -> KVCache:
        c = model.config
        p = next(model.parameters())
        kw.setdefault("dtype", p.dtype if p.is_floating_point() else torch.float32)
        kw.setdefault("device", p.device)
        return cls(c.n_layer, batch_size, c.n_head, max_length, c.head_size, **kw)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    def host_lengths(self) -> list[int]:
        return list(self._host_lengths)

    def set_lengths(self, lengths: list[int] | torch.Tensor) -> None:
        """Set how many tokens each row holds (e.g. drop the right padding after a batched prefill)."""
        values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(values) != self.batch_size or any(not 0 <= v <= self.max_length for v in values):
            raise ValueError(f"lengths: {values} must be {self.batch_size} values in [0, {self.max_length}]")
        self._host_lengths = values
        self.lengths = torch.tensor(values, dtype=torch.long, device=self.k.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new ``k, v`` ``[B, H, S, D]`` after each row's cached tokens; return keys/values up to the end."""
        S = k.shape[2]
        lo, hi = min(self._host_lengths), max(self._host_lengths)
        end = hi + S
        if lo == hi:
            self.k[layer, :, :, lo:end] = k
            self.v[layer, :, :, lo:end] = v
        else:
            idx = (self.lengths[:, None] + torch.arange(S, device=k.device))[:, None, :, None].expand_as(k)
            self.k[layer].scatter_(2, idx, k)
            self.v[layer].scatter_(2, idx, v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def check_room(self, new_tokens: int) -> None:
        need = max(self._host_lengths) + new_tokens
        if need > self.max_length:
            raise ValueError(f"KV cache full: {need} tokens needed, capacity is {self.max_length}")

    def advance(self, new_tokens: int) -> None:
        self.set_lengths([n + new_tokens for n in self._host_lengths])

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder rows (beam search): row ``b`` becomes old row ``index[b]``."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)
        self.set_lengths([self._host_lengths[i] for i in index.tolist()])
