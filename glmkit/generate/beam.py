"""Beam search with transformers >= 4.50 semantics (the vectorised ``GenerationMixin._beam_search``;
docs/generation-semantics.md).

Ported step for step so that scores, tie-breaking and stopping match transformers 5.x exactly: log-softmax, then
processors, running scores added, top ``K = max(2, 1 + n_eos) * num_beams`` candidates, candidates that hit a
stopping criterion (stop id, max length) enter the finished set only if ranked within the first ``num_beams``,
hypothesis score ``sum_logprobs / generated_length ** length_penalty`` (EOS counted), and the early-stop heuristic
for ``early_stopping`` False / True / "never". ``do_sample`` gives beam sampling (multinomial without replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .processors import Processor, apply_processors
from .sampling import Stepper
from .stopping import StopCriteria


@dataclass
class BeamResult:
    sequences: torch.Tensor  # (B * num_return_sequences, prompt + longest returned generation)
    scores: torch.Tensor  # (B * num_return_sequences,) length-normalised hypothesis scores
    lengths: list[int]  # generated tokens per returned sequence


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select beams ``index [B, k]`` along dim 1 of ``t [B, n, ...]``."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(
    stepper: Stepper,
    ids: torch.Tensor,
    stop: StopCriteria,
    processors: list[Processor],
    *,
    num_beams: int,
    n_eos: int,
    length_penalty: float,
    early_stopping: bool | str,
    num_return_sequences: int,
    fill_id: int,
    do_sample: bool = False,
    generator: torch.Generator | None = None,
) -> BeamResult:
    """Run beam search. ``ids [B * num_beams, P]`` are the prompts, each repeated ``num_beams`` times.

    ``stepper.step`` must return logits for all ``B * num_beams`` rows; ``stepper.reorder`` follows the parents.
    """
    device = ids.device
    BN, P = ids.shape
    B = BN // num_beams
    max_length = stop.max_length
    K = max(2, 1 + n_eos) * num_beams
    top_num_beam_mask = torch.cat(
        [torch.ones(num_beams, dtype=torch.bool), torch.zeros(K - num_beams, dtype=torch.bool)]
    )
    top_num_beam_mask = top_num_beam_mask.to(device)

    running = torch.full((B, num_beams, max_length), fill_id, dtype=torch.long, device=device)
    running[:, :, :P] = ids.view(B, num_beams, P)
    sequences = running.clone()
    running_scores = torch.zeros((B, num_beams), dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9  # step 1 expands beam 0 only
    beam_scores = torch.full((B, num_beams), -1e9, dtype=torch.float, device=device)
    finished = torch.zeros((B, num_beams), dtype=torch.bool, device=device)
    can_improve = torch.ones((B, 1), dtype=torch.bool, device=device)
    running_idx = torch.full((B, num_beams, max_length - P), -1, dtype=torch.int32, device=device)
    beam_idx = running_idx.clone()
    batch_offset = torch.arange(B, device=device).view(-1, 1) * num_beams

    cur_len = P
    logits = stepper.step(None)
    while True:
        flat = running[:, :, :cur_len].reshape(BN, cur_len)
        log_probs = apply_processors(processors, flat, torch.nn.functional.log_softmax(logits.float(), dim=-1))
        acc = (log_probs.view(B, num_beams, -1) + running_scores[:, :, None]).reshape(B, -1)
        V = acc.shape[-1] // num_beams

        # top-K continuations over all beams of an item
        if do_sample:
            top_idx = torch.multinomial(torch.nn.functional.softmax(acc, dim=-1), K, generator=generator)
            top_lp = torch.gather(acc, 1, top_idx)
            top_lp, order = top_lp.sort(dim=-1, descending=True)
            top_idx = top_idx.gather(-1, order)
        else:
            top_lp, top_idx = torch.topk(acc, k=K)
        parent = top_idx // V
        top_running_idx = _gather(running_idx, parent)
        top_seqs = _gather(running, parent)
        top_seqs[:, :, cur_len] = top_idx % V
        top_running_idx[:, :, cur_len - P] = (parent + batch_offset).to(torch.int32)

        hits = stop(top_seqs[:, :, : cur_len + 1].reshape(B * K, cur_len + 1)).view(B, K)

        # the best num_beams candidates that did not stop keep running
        top_running_lp = top_lp + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(top_running_lp, k=num_beams)[1]
        running = _gather(top_seqs, keep)
        running_scores = _gather(top_running_lp, keep)
        running_idx = _gather(top_running_idx, keep)

        # candidates ranked < num_beams that stopped may enter the finished set
        just_finished = hits & top_num_beam_mask[None, :]
        cand = top_lp / ((cur_len + 1 - P) ** length_penalty)
        full = torch.all(finished, dim=-1, keepdim=True) & (early_stopping is True)
        cand = cand + full.to(torch.float32) * -1.0e9
        cand = cand + (~can_improve).to(torch.float32) * -1.0e9
        cand = cand + (~just_finished) * -1.0e9
        merged_idx = torch.topk(torch.cat([beam_scores, cand], dim=1), k=num_beams)[1]
        sequences = _gather(torch.cat([sequences, top_seqs], dim=1), merged_idx)
        beam_scores = _gather(torch.cat([beam_scores, cand], dim=1), merged_idx)
        beam_idx = _gather(torch.cat([beam_idx, top_running_idx], dim=1), merged_idx)
        finished = _gather(torch.cat([finished, just_finished], dim=1), merged_idx)

        cur_len += 1
        # early-stop heuristic (latches): can the best running beam still beat the worst finished one?
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - P
        else:
            best_len = cur_len - P
        best_possible = running_scores[:, :1] / (best_len**length_penalty)
        worst = torch.where(finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & torch.any(best_possible > worst, dim=-1, keepdim=True)
        open_beams = not (bool(torch.all(finished)) and early_stopping is True)
        if not (bool(torch.any(can_improve)) and open_beams and not bool(torch.all(hits))):
            break
        stepper.reorder(running_idx[..., cur_len - 1 - P].reshape(BN).long())
        logits = stepper.step(running[:, :, cur_len - 1].reshape(BN))

    n = num_return_sequences
    sequences = sequences[:, :n].reshape(B * n, max_length)
    scores = beam_scores[:, :n].reshape(B * n)
    generated = (beam_idx[:, :n].reshape(B * n, -1) + 1).bool().sum(dim=1)
    return BeamResult(sequences[:, : P + int(generated.max())], scores, generated.tolist())
