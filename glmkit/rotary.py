"""Rotary position embeddings (RoPE, Su et al. 2021, arXiv 2104.09864) over GLM's 2D positions.

GLM positions are pairs (position, block position), ``position_ids [B, 2, S]``. The 2D rotary encoding gives each
coordinate half of a head's rotation angles: angles ``[0, head_size / 4)`` follow the position and the rest follow
the block position, each with the RoPE frequencies of a half, ``f_i = 10000^(-2i / (head_size / 2))``.

Which dimensions an angle turns is the variant:

- ``interleaved`` (``position_encoding="rotary_2d_interleaved"``, glmkit's bundled model): angle ``i`` turns the
  adjacent pair ``(x[2i], x[2i + 1])`` (the paper's and GPT-J's layout), so the position turns the first half of
  the head and the block position the second.
- ChatGLM-6B pairs element ``k`` with ``k + head_size / 4`` within each half instead (``rotate_half``,
  THUDM/ChatGLM-6B ``modeling_chatglm.py`` ``apply_rotary_pos_emb_index``): the same frequencies on other dimension
  pairs, so its weights do not fit this layout.
"""

from __future__ import annotations

import functools

import torch

Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, 1, S, head_size / 2]


@functools.lru_cache(maxsize=8)
def _frequencies(quarter: int, device: torch.device) -> torch.Tensor:
    # cached: recomputing it cost ~5 % of a serving engine's step on the bundled model; a normal tensor even when
    # first made under inference_mode, so that training can use it too
    with torch.inference_mode(False):
        return 10000.0 ** (-torch.arange(quarter, dtype=torch.float32, device=device) / quarter)


def angles_2d(position_ids: torch.Tensor, head_size: int) -> Rope:
    """cos/sin ``[B, 1, S, head_size / 2]`` of the 2D rotary angles for ``position_ids [B, 2, S]``: angle ``i`` is
    ``position * f_i`` for ``i < head_size / 4`` and ``block_position * f_(i - head_size / 4)`` after."""
    angle = position_ids.float()[..., None] * _frequencies(head_size // 4, position_ids.device)  # [B, 2, S, quarter]
    angle = torch.cat((angle[:, 0], angle[:, 1]), dim=-1)[:, None]  # [B, 1, S, head_size / 2]
    return angle.cos(), angle.sin()


def apply_interleaved(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Turn the pairs ``(x[..., 2i], x[..., 2i + 1])`` of ``x [B, nh, S, head_size]`` by ``rope``'s angle ``i``."""
    cos, sin = (t.to(x.dtype) for t in rope)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
