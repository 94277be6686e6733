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
        # grouped-query models (ChatGLM2/3, GLM-4) cache only their KV heads
        return cls(c.n_layer, batch_size, getattr(c, "n_kv_head", c.n_head), max_length, c.head_size, **kw)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_length(self) -> int:
        return self.k.shape[3]

    @property
    def device(self) -> torch.device:
        return self.k.device

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
        """Store new ``k, v`` ``[B, H, S, D]`` (cast to the cache's dtype) after each row's cached tokens; return
        keys/values up to the end."""
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
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

    def rows(self, slots: list[int]) -> KVCacheRows:
        """The rows ``slots`` of this cache as a cache of their own (continuous batching: one row per request)."""
        return KVCacheRows(self, slots)


class KVCacheRows:
    """A batch made of some rows of a pool ``KVCache``: the model reads and writes the pool in place.

    A server keeps one pool row ("slot") per running sequence and runs each step on the slots that take part;
    the model sees an ordinary cache of ``len(slots)`` rows. Contiguous slots are a view; others are gathered.
    """

    def __init__(self, pool: KVCache, slots: list[int]) -> None:
        if not slots or len(set(slots)) != len(slots) or not all(0 <= s < pool.batch_size for s in slots):
            raise ValueError(f"slots: {slots} must be distinct rows of a cache of {pool.batch_size}")
        self.pool, self.slots = pool, list(slots)
        first = self.slots[0]
        self._range = (first, first + len(slots)) if self.slots == list(range(first, first + len(slots))) else None
        self._index = torch.tensor(self.slots, dtype=torch.long, device=pool.k.device)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    @property
    def max_length(self) -> int:
        return self.pool.max_length

    @property
    def device(self) -> torch.device:
        return self.pool.k.device

    def host_lengths(self) -> list[int]:
        lengths = self.pool.host_lengths()
        return [lengths[s] for s in self.slots]

    def set_lengths(self, lengths: list[int] | torch.Tensor) -> None:
        values = lengths.tolist() if isinstance(lengths, torch.Tensor) else list(lengths)
        if len(values) != len(self.slots):
            raise ValueError(f"lengths: {values} must be {len(self.slots)} values")
        all_lengths = self.pool.host_lengths()
        for s, n in zip(self.slots, values, strict=True):
            all_lengths[s] = n
        self.pool.set_lengths(all_lengths)

    def check_room(self, new_tokens: int) -> None:
        need = max(self.host_lengths()) + new_tokens
        if need > self.max_length:
            raise ValueError(f"KV cache full: {need} tokens needed, capacity is {self.max_length}")

    def advance(self, new_tokens: int) -> None:
        self.set_lengths([n + new_tokens for n in self.host_lengths()])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``KVCache.write``, on the pool rows of this batch (cast to the pool's dtype)."""
        k, v = k.to(self.pool.k.dtype), v.to(self.pool.v.dtype)
        S = k.shape[2]
        lengths = self.host_lengths()
        lo, hi = min(lengths), max(lengths)
        end = hi + S
        if self._range is not None:
            a, b = self._range
            pk, pv = self.pool.k[layer, a:b], self.pool.v[layer, a:b]  # views
            if lo == hi:
                pk[:, :, lo:end], pv[:, :, lo:end] = k, v
            else:
                idx = torch.tensor(lengths, device=k.device)[:, None] + torch.arange(S, device=k.device)
                idx = idx[:, None, :, None].expand_as(k)
                pk.scatter_(2, idx, k)
                pv.scatter_(2, idx, v)
            return pk[:, :, :end], pv[:, :, :end]
        pk, pv = self.pool.k[layer], self.pool.v[layer]
        pos = torch.tensor(lengths, device=k.device)[:, None] + torch.arange(S, device=k.device)  # (N, S)
        pk[self._index[:, None], :, pos] = k.transpose(1, 2)  # advanced indices first: (N, S, H, D)
        pv[self._index[:, None], :, pos] = v.transpose(1, 2)
        return pk[:, :, :end].index_select(0, self._index), pv[:, :, :end].index_select(0, self._index)


class PassThroughCache:
    """A cache for one forward pass whose keys and values are not kept (scoring): ``write`` hands the new ``k, v``
    back in ``dtype`` - the dtype the engine's cache would round them to, so scores match generation."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # each head's keys contiguous, as the attention kernel reads them (a view of the qkv output is not)
        return k.to(self.dtype, memory_format=torch.contiguous_format), v.to(
            self.dtype, memory_format=torch.contiguous_format
        )

    def check_room(self, new_tokens: int) -> None:
        pass

    def advance(self, new_tokens: int) -> None:
        pass
