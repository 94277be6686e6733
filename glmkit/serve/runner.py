"""Runs one scheduled step on the model: prefill new requests into their slots, decode one token for every row.

The KV cache is one ``KVCache`` with a row ("slot") per running sequence; each step runs on the rows that take
part (``KVCache.rows``), whose lengths differ — the cache and ``mask_with_cache`` handle ragged rows, so a row
computes what it would alone. Positions come from masks.py and the prefill is ``glmkit.generate``'s, so serving
and ``generate`` share one definition of GLM's Part A / Part B layout (ChatGLM-6B's is the same, without [CLS]). A
causal model (ChatGLM2/3, GLM-4) is prefilled as ``glmkit.generate.causal`` does, its first token chosen from the
prefill's last logits (the rows just prefilled feed nothing that step), then fed at 1-D positions ``[N, 1]``.
Token choice applies each request's own processors (transformers' order) and its own generator, as ``SampleRun``
does for a single request. A row whose token cannot be chosen (probabilities that are not finite) fails alone:
``execute`` reports it in ``Failures``.
"""

from __future__ import annotations

import torch

from ..generate import causal
from ..generate.engine import prefill
from ..generate.fast import DecodeStep, cache_dtype, optimize_for_decode
from ..generate.processors import apply_processors
from ..kv_cache import KVCache
from .request import Request, TokenLogprob
from .scheduler import RunnerOutput, SchedulerOutput

Failures = dict[str, str]  # request id -> why its row failed


class ModelRunner:
    """Owns the model and the slot cache (``num_slots`` rows of ``max_model_len`` tokens)."""

    def __init__(self, model: torch.nn.Module, num_slots: int, max_model_len: int) -> None:
        self.model = optimize_for_decode(model)  # eval; bf16 on CPU: the kernels' linears and LM head, in place
        self.device = next(model.parameters()).device
        self.cache = KVCache.for_model(model, num_slots, max_model_len, dtype=cache_dtype(model))
        self.decode = DecodeStep(model)  # the one-token step generation uses
        self.causal = bool(getattr(model, "causal_lm", False))

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> tuple[RunnerOutput, Failures]:
        first = None  # a causal model's first-token logits of the rows prefilled now
        if scheduled.prefill:
            rows = [r.prompt_ids for r in scheduled.prefill]
            view = self.cache.rows([r.slot for r in scheduled.prefill])
            view.set_lengths([0] * len(rows))  # a reused slot still counts its previous sequence
            if self.causal:
                hidden = causal.encode(self.model, rows, view)
                last = torch.tensor([len(r) - 1 for r in rows], device=self.device)
                first = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), last]).float()
            else:
                prefill(self.model, rows, view)
        if not scheduled.decode:
            return {}, {}
        requests = scheduled.decode
        if first is None:
            return self.sample(requests, self._step(requests))
        new = {id(r): i for i, r in enumerate(scheduled.prefill)}
        logits = first.new_empty(len(requests), first.shape[1])
        fed = []
        for i, r in enumerate(requests):
            if id(r) in new:
                logits[i] = first[new[id(r)]]
            else:
                fed.append(i)
        if fed:
            logits[fed] = self._step([requests[i] for i in fed])
        return self.sample(requests, logits)

    def _step(self, requests: list[Request]) -> torch.Tensor:
        """Feed each request's next input in its slot; the next-token logits ``[N, V]`` in fp32."""
        inputs = [r.next_input() for r in requests]
        tokens = torch.tensor([[t] for t, _, _ in inputs], device=self.device)  # (N, 1)
        if self.causal:
            positions = torch.tensor([[p] for _, p, _ in inputs], device=self.device)  # (N, 1)
        else:
            positions = torch.tensor([[[p], [b]] for _, p, b in inputs], device=self.device)  # (N, 2, 1)
        view = self.cache.rows([r.slot for r in requests])
        return self.decode(tokens, positions, view).float()  # (N, V)

    def sample(self, requests: list[Request], logits: torch.Tensor) -> tuple[RunnerOutput, Failures]:
        """Choose each sampling request's token from its row of ``logits [N, V]``; a row that fails fails alone."""
        out: RunnerOutput = {}
        failed: Failures = {}
        plain = [
            i for i, r in enumerate(requests) if r.samples_this_step() and not r.processors and not r.config.do_sample
        ]
        greedy = logits[plain].argmax(-1).tolist() if plain else []  # one batched argmax for the common case
        chosen = dict(zip(plain, greedy, strict=True))
        logprobs = None
        if any(r.logprobs is not None for r in requests):
            logprobs = torch.log_softmax(logits, dim=-1)
        for i, r in enumerate(requests):
            if not r.samples_this_step():
                continue
            try:  # nothing here may raise past a row: a retried step would draw from the generators again
                token = chosen[i] if i in chosen else _choose(r, logits[i : i + 1])
                lp = None
                if r.logprobs is not None and logprobs is not None:
                    row = logprobs[i]
                    pairs = []
                    if r.logprobs:
                        top = torch.topk(row, r.logprobs)
                        pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                    lp = TokenLogprob(token, float(row[token]), pairs)
            except Exception as e:
                failed[r.request_id] = f"sampling failed: {type(e).__name__}: {e}"
                continue
            out[r.request_id] = (token, lp)
        return out, failed


def _choose(r: Request, logits: torch.Tensor) -> int:
    """The token of one row: its processors, then argmax or a draw from its own generator."""
    scores = apply_processors(r.processors, r.ids, logits)
    if not r.config.do_sample:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    # checked here rather than left to multinomial, whose error names neither the cause nor the request
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise ValueError(
            "the token probabilities are not finite (an extreme temperature, top_p, min_p or repetition_penalty?)"
        )
    return int(torch.multinomial(probs, 1, generator=r.generator))
