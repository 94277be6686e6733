"""GLM attention masks and 2D positions: the single source of truth for data, generation and serving.

A GLM input is Part A (the corrupted text, each blank one token: [MASK], [sMASK] or [gMASK]) followed by Part B (one
segment ``<sop> span`` per blank). Part A attends bidirectionally to itself; Part B attends to all of Part A and
causally to Part B. Every Part-B token sits at its blank's position with block positions 1, 2, ...
(docs/glm-notes.md, "2D positions and the attention mask"). Masks here are boolean, ``True`` = may attend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Span = tuple[int, int]  # half-open [start, end) token range of the original text


@dataclass
class BlankSample:
    """One GLM sequence laid out as Part A + Part B.

    ``targets[t]`` is what position ``t`` predicts (no shift); ``loss_mask`` is 1 on Part B only.
    ``blank_positions[k]`` is the Part-A index of the k-th Part-B segment's blank.
    """

    tokens: list[int]
    targets: list[int]
    loss_mask: list[int]
    position_ids: list[int]
    block_position_ids: list[int]
    sep: int
    blank_positions: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


def check_spans(spans: Sequence[Span], length: int) -> None:
    """Raise ``ValueError`` unless spans are non-empty, inside ``[0, length)`` and pairwise disjoint."""
    for s, e in spans:
        if not 0 <= s < e <= length:
            raise ValueError(f"span ({s}, {e}) is empty or outside the text of length {length}")
    ordered = sorted(spans)
    for (_, e1), (s2, _) in zip(ordered, ordered[1:], strict=False):
        if s2 < e1:
            raise ValueError(f"spans overlap: {ordered}")


def make_block_data(
    text: Sequence[int],
    spans: Sequence[Span],
    *,
    mask_id: int | Sequence[int],
    sop_id: int,
    eop_id: int,
    order: Sequence[int] | None = None,
) -> BlankSample:
    """Blank infilling layout of ``text`` with ``spans`` blanked (THUDM/GLM ``make_block_data``; TV1, TV2).

    Args:
        text: original token ids (usually starting with [CLS]).
        spans: half-open spans to blank; each becomes one mask token in Part A.
        mask_id: the blank token id, or one id per span (in the order of ``spans``).
        sop_id / eop_id: ``<|startofpiece|>`` / ``<|endofpiece|>`` ids.
        order: the order of the spans in Part B as indices into ``spans`` (pretraining shuffles it);
            default is left to right, the order generation fills blanks in.
    """
    check_spans(spans, len(text))
    mask_ids = [mask_id] * len(spans) if isinstance(mask_id, int) else list(mask_id)
    if len(mask_ids) != len(spans):
        raise ValueError(f"mask_id: got {len(mask_ids)} ids for {len(spans)} spans")
    by_start = sorted(range(len(spans)), key=lambda k: spans[k][0])
    part_a: list[int] = []
    blank_pos: dict[int, int] = {}
    cursor = 0
    for k in by_start:
        s, e = spans[k]
        part_a.extend(text[cursor:s])
        blank_pos[k] = len(part_a)
        part_a.append(mask_ids[k])
        cursor = e
    part_a.extend(text[cursor:])
    sep = len(part_a)
    order = list(range(len(spans))) if order is None else list(order)
    if sorted(order) != list(range(len(spans))):
        raise ValueError(f"order: {order} is not a permutation of the {len(spans)} spans")

    tokens, targets = list(part_a), list(part_a)
    positions, blocks = list(range(sep)), [0] * sep
    loss_mask = [0] * sep
    for k in order:
        s, e = spans[k]
        span = list(text[s:e])
        tokens += [sop_id] + span
        targets += span + [eop_id]
        positions += [blank_pos[k]] * (len(span) + 1)
        blocks += list(range(1, len(span) + 2))
        loss_mask += [1] * (len(span) + 1)
    return BlankSample(tokens, targets, loss_mask, positions, blocks, sep, [blank_pos[k] for k in order])


def make_prefix_lm_data(text: Sequence[int], n_target: int, *, gmask_id: int, sop_id: int) -> BlankSample:
    """Prefix-LM ("gpt") form of document-level infilling (TV3): ``src [gMASK] <sop> tgt[:-1]`` → ``tgt``.

    The last ``n_target`` tokens of ``text`` are generated left to right; there is no eop target in this form.
    """
    n = len(text)
    if not 1 <= n_target <= n - 1:
        raise ValueError(f"n_target: must be in [1, {n - 1}] for a text of {n} tokens, got {n_target}")
    src, tgt = list(text[: n - n_target]), list(text[n - n_target :])
    sep = len(src) + 1
    tokens = src + [gmask_id, sop_id] + tgt[:-1]
    targets = src + [gmask_id] + tgt
    positions = list(range(sep)) + [sep - 1] * n_target
    blocks = [0] * len(src) + list(range(n_target + 1))
    loss_mask = [0] * sep + [1] * n_target
    return BlankSample(tokens, targets, loss_mask, positions, blocks, sep, [sep - 1])


def find_blanks(tokens: Sequence[int], mask_ids: Sequence[int]) -> list[int]:
    """Indices of every blank token in ``tokens``, left to right."""
    ids = set(mask_ids)
    return [i for i, t in enumerate(tokens) if t in ids]


def part_b_positions(blank_position: int, n: int, start_block: int = 1) -> tuple[list[int], list[int]]:
    """2D positions of ``n`` Part-B tokens of a blank at ``blank_position``: ``(p, ..., p)``, ``(b, b+1, ...)``."""
    return [blank_position] * n, list(range(start_block, start_block + n))


def span_feed(blank_position: int, span: Sequence[int], sop_id: int, max_block: int) -> list[tuple[int, int, int]]:
    """What the cache holds for a filled blank before the next blank is decoded: ``(token, position, block)``.

    ``<sop> span`` at ``(p, 1), (p, 2), ...``, its stop token left out: THUDM/GLM ``generate_samples.py`` keeps each
    span in the memory the later blanks attend to. Block positions end at ``max_block`` (the position table's last
    row), so a span cut there keeps only the tokens that have a block position.
    """
    tokens = [sop_id, *span][:max_block]
    positions, blocks = part_b_positions(blank_position, len(tokens))
    return list(zip(tokens, positions, blocks, strict=True))


# ---- masks -------------------------------------------------------------------------------------------------


def prefix_lm_mask(
    sep: int | Sequence[int] | torch.Tensor,
    seq_len: int,
    valid_lengths: Sequence[int] | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """GLM mask ``[B, 1, S, S]``: key j visible to query i iff ``j < sep_b or j <= i``, and ``j`` is not padding.

    ``sep`` is the Part-A length (scalar or per row); ``valid_lengths`` marks right padding, which is never
    attended. ``sep = 0`` is a plain causal mask. This is the hub ``build_mask_matrix`` plus padding.
    """
    sep_t = torch.as_tensor(sep, dtype=torch.long, device=device).reshape(-1)
    i = torch.arange(seq_len, device=device)
    causal = i[None, :] <= i[:, None]  # (S, S)
    mask = causal[None] | (i[None, None, :] < sep_t[:, None, None])  # (B, S, S)
    if valid_lengths is not None:
        valid = torch.as_tensor(valid_lengths, dtype=torch.long, device=device).reshape(-1)
        mask = mask & (i[None, None, :] < valid[:, None, None])
        # a padding query that would see nothing sees the real tokens instead, so no row is empty
        empty = ~mask.any(-1, keepdim=True)
        mask = mask | (empty & (i[None, None, :] < valid[:, None, None]))
    return mask[:, None]


def sample_mask(sample: BlankSample, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``[S, S]`` mask of one sample (Part A bidirectional, Part B causal)."""
    return prefix_lm_mask(sample.sep, len(sample), device=device)[0, 0]


def chatglm6b_inputs(
    input_ids: torch.Tensor, *, sop_id: int, mask_id: int, gmask_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM-6B's 2D positions ``[B, 2, S]`` and mask ``[B, 1, S, S]`` (True = may attend) of ``input_ids``, as
    the hub ``ChatGLMModel.get_position_ids`` / ``get_masks`` (THUDM/chatglm-6b ``modeling_chatglm.py``) derive them.

    The context, every token before a row's first ``<sop>`` (the whole row without one), is Part A: bidirectional,
    at positions ``(i, 0)``. From ``<sop>`` on (Part B) tokens are causal at ``(blank, 1), (blank, 2), ...``, where
    the blank is the row's first [gMASK], or its first [MASK] when it has no [gMASK] (unlike GLM, which takes the
    first blank of any kind). Padding is not recognised: left-padded batches pass the tokenizer's mask and positions.
    """
    B, S = input_ids.shape
    rows = input_ids.tolist()
    context = [r.index(sop_id) if sop_id in r else S for r in rows]
    positions = torch.arange(S).repeat(B, 1)
    blocks = torch.zeros(B, S, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, context, strict=True)):
        if n == S:
            continue
        blank = gmask_id if gmask_id in row else mask_id
        if blank not in row:
            raise ValueError(
                f"input_ids: row {b} has <sop> ({sop_id}) at {n} but no [gMASK] ({gmask_id}) or [MASK] ({mask_id}) "
                "to take its position from"
            )
        positions[b, n:] = row.index(blank)
        blocks[b, n:] = torch.arange(1, S - n + 1)
    position_ids = torch.stack([positions, blocks], dim=1).to(input_ids.device)
    return position_ids, prefix_lm_mask(context, S, device=input_ids.device)


def normalize_attention_mask(
    attention_mask: int | torch.Tensor | Sequence[int] | None,
    batch: int,
    q_len: int,
    k_len: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Turn any accepted ``attention_mask`` into a boolean ``[B|1, 1, q_len, q_len or k_len]`` mask.

    Accepted forms (the hub ``GLMModel`` convention): ``None`` (causal, sep = 0), a scalar or ``[B]`` Part-A
    length ``sep``, or an explicit 0/1 ``[B, 1, q_len, q_len]`` / ``[B, 1, q_len, k_len]`` matrix. With a cache,
    ``k_len`` counts the cached keys too; a ``q_len``-wide mask covers the new tokens only (the cache is visible).
    """
    if attention_mask is None:
        attention_mask = 0
    if not isinstance(attention_mask, torch.Tensor):
        attention_mask = torch.as_tensor(attention_mask, device=device)
    m = attention_mask.to(device) if device is not None else attention_mask
    if m.dim() <= 1 and m.numel() in (1, batch) and not m.is_floating_point():
        return prefix_lm_mask(m, q_len, device=m.device)
    if m.dim() <= 1 and m.numel() in (1, batch) and m.is_floating_point() and torch.equal(m, m.round()):
        return prefix_lm_mask(m.long(), q_len, device=m.device)
    if m.dim() == 4 and m.shape[0] in (1, batch) and m.shape[1] == 1 and m.shape[2] == q_len:
        if m.shape[3] in (q_len, k_len):
            return m.bool() if m.dtype == torch.bool else m != 0
    raise ValueError(
        f"attention_mask: shape {tuple(m.shape)} is not an accepted form; expected a scalar or [B={batch}] "
        f"Part-A length, or a 0/1 mask of shape [B, 1, {q_len}, {q_len}]"
        + (f" or [B, 1, {q_len}, {k_len}]" if k_len != q_len else "")
    )


# ---- batching ----------------------------------------------------------------------------------------------


def collate(samples: Sequence[BlankSample], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad samples into a batch: pad tokens get position 0 / block 0 and are never attended.

    Returns ``input_ids [B,S]``, ``position_ids [B,2,S]``, ``attention_mask [B,1,S,S]`` (bool), ``targets``,
    ``loss_mask`` (float), ``sep [B]`` and ``lengths [B]``.
    """
    if not samples:
        raise ValueError("collate: no samples")
    S = max(len(s) for s in samples) if pad_to is None else pad_to
    if any(len(s) > S for s in samples):
        raise ValueError(f"pad_to: {S} is shorter than the longest sample ({max(len(s) for s in samples)})")
    B = len(samples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    targets = torch.full((B, S), pad_id, dtype=torch.long)
    pos = torch.zeros((B, 2, S), dtype=torch.long)
    loss_mask = torch.zeros((B, S))
    for b, s in enumerate(samples):
        n = len(s)
        ids[b, :n] = torch.tensor(s.tokens)
        targets[b, :n] = torch.tensor(s.targets)
        pos[b, 0, :n] = torch.tensor(s.position_ids)
        pos[b, 1, :n] = torch.tensor(s.block_position_ids)
        loss_mask[b, :n] = torch.tensor(s.loss_mask, dtype=torch.float)
    sep = torch.tensor([s.sep for s in samples])
    lengths = torch.tensor([len(s) for s in samples])
    mask = prefix_lm_mask(sep, S, lengths)
    return {
        "input_ids": ids,
        "position_ids": pos,
        "attention_mask": mask,
        "targets": targets,
        "loss_mask": loss_mask,
        "sep": sep,
        "lengths": lengths,
    }


def build_inputs_for_generation(
    context_ids: torch.Tensor,
    context_mask: torch.Tensor | None,
    max_gen_length: int,
    *,
    mask_ids: Sequence[int],
    sop_id: int,
) -> dict[str, torch.Tensor]:
    """The hub ``GLMTokenizerMixin.build_inputs_for_generation`` (no targets; TV6).

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


def mask_with_cache(new_mask: torch.Tensor, cached: Sequence[int], batch: int) -> torch.Tensor:
    """Widen a ``[B|1, 1, S, S]`` mask over new tokens to the cached keys: ``[B, 1, S, max(cached) + S]``.

    Row ``b``'s new tokens are stored after its ``cached[b]`` tokens; every cached token of the row is visible
    (the hub's memory semantics), slots past the row's end are not.
    """
    S = new_mask.shape[-1]
    lo, hi = min(cached), max(cached)
    new_mask = new_mask.expand(batch, 1, S, S)
    if lo == hi:
        mem = torch.ones(batch, 1, S, lo, dtype=torch.bool, device=new_mask.device)
        return torch.cat([mem, new_mask], dim=-1)
    lengths = torch.as_tensor(list(cached), device=new_mask.device)
    rel = torch.arange(hi + S, device=new_mask.device)[None, :] - lengths[:, None]  # (B, T)
    in_new = (rel >= 0) & (rel < S)
    gathered = new_mask.gather(-1, rel.clamp(0, S - 1)[:, None, None, :].expand(batch, 1, S, hi + S))
    return (rel < 0)[:, None, None, :] | (in_new[:, None, None, :] & gathered)


# ---- generation ----------------------------------------------------------------------------------------------


def part_a_positions(lengths: Sequence[int], seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """2D positions ``[B, 2, S]`` of right-padded Part-A rows: ``(0..L_b-1, 0)``, padding ``(0, 0)`` (rule 4)."""
    i = torch.arange(seq_len, device=device)
    valid = i[None, :] < torch.as_tensor(list(lengths), device=device)[:, None]
    return torch.stack([torch.where(valid, i[None, :], 0), torch.zeros_like(valid, dtype=torch.long)], dim=1)


def part_b_step_positions(blank_positions: torch.Tensor, block: int) -> torch.Tensor:
    """2D positions ``[N, 2, 1]`` of one Part-B token per row: ``(blank position of the row, block)``."""
    return torch.stack([blank_positions, torch.full_like(blank_positions, block)], dim=1)[:, :, None]


def pad_batch(batch: dict, multiple: int, pad_id: int = 0) -> dict:
    """Right-pad a ``collate`` batch to a multiple of ``multiple`` tokens, with ``collate``'s padding rules.

    Few distinct shapes let CPU kernels (oneDNN) and compiled graphs be reused instead of rebuilt every step.
    """
    S = batch["input_ids"].shape[1]
    extra = -S % multiple
    if extra == 0:
        return batch
    out = dict(batch)
    out["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id)
    out["targets"] = torch.nn.functional.pad(batch["targets"], (0, extra), value=pad_id)
    out["position_ids"] = torch.nn.functional.pad(batch["position_ids"], (0, extra))
    out["loss_mask"] = torch.nn.functional.pad(batch["loss_mask"], (0, extra))
    out["attention_mask"] = prefix_lm_mask(batch["sep"], S + extra, batch["lengths"])
    return out
