"""The hub (THUDM/glm-*) side of layouts and checkpoints, for comparing glmkit against: test helpers only."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmkit import GLM
from glmkit.checkpoint import hub_key_map
from glmkit.masks import find_blanks
from glmkit.quantize.modules import scheme_of


def to_hub_state_dict(model: GLM, prefix: str = "glm.") -> dict[str, torch.Tensor]:
    """The model's tensors under hub key names (``glm.word_embeddings.weight``, ...), as a hub checkpoint has them."""
    hub_name = {ours: hub for hub, ours in hub_key_map(model.config, scheme_of(model)).items()}
    return {prefix + hub_name[name]: t for name, t in model.state_dict().items()}


def build_inputs_for_generation(
    context_ids: torch.Tensor,
    context_mask: torch.Tensor | None,
    max_gen_length: int,
    *,
    mask_ids: Sequence[int],
    sop_id: int,
) -> dict[str, torch.Tensor]:
    """The hub ``GLMTokenizerMixin.build_inputs_for_generation`` (tokenization_glm.py; no targets).

    Returns ``input_ids`` = context + sop ``[B, S+1]``, ``position_ids [B, 2, S+G]`` for the whole window
    (the first blank's position, blocks 1..G) and ``generation_attention_mask [B, 1, S+G, S+G]``.
    """
    B, S = context_ids.shape
    if context_mask is None:
        context_mask = torch.ones(B, S, dtype=torch.long)
    G = max_gen_length
    positions = torch.zeros(B, 2, S + G, dtype=torch.long)
    for b in range(B):
        blanks = find_blanks(context_ids[b].tolist(), mask_ids)
        if not blanks:
            raise ValueError(f"context row {b} has no blank token (any of {list(mask_ids)})")
        positions[b, 0] = torch.tensor(list(range(S)) + [blanks[0]] * G)
        positions[b, 1, S:] = torch.arange(1, G + 1)
    mask = torch.zeros(B, 1, S + G, S + G, dtype=torch.long)
    mask[:, 0, :, :S] = context_mask[:, None, :].long()
    mask[:, 0, S:, S:] = torch.tril(torch.ones(G, G, dtype=torch.long))
    input_ids = torch.cat([context_ids, torch.full((B, 1), sop_id, dtype=context_ids.dtype)], dim=1)
    return {"input_ids": input_ids, "position_ids": positions, "generation_attention_mask": mask}
