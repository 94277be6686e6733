"""One-shot requests: the log-likelihood of a continuation, next-token logits, multiple choice and embeddings.

Each is a single forward pass over ``Part A + <sop> + continuation[:-1]`` (collated by ``masks.collate``, the
layout generation uses), so a batch of any mix is one model execution — what the dynamic batcher needs. The
continuation is scored exactly as generation would produce it: its first token is predicted at ``<sop>``, at
(blank position, block 1), after a bidirectional Part A; a prompt without a blank gets [gMASK] (the prompt
layout's ``model_input``), as in ``generate``. Embeddings are the L2-normalised mean of the final hidden states over
Part A. The layout is the model family's (``glmkit.prompts.model_family``): ChatGLM-6B's Part A has no [CLS], and a
causal model (ChatGLM2/3, GLM-4) scores ``[gMASK] sop context + continuation[:-1]`` causally, the continuation's
first token predicted at the context's last token, as ``glmkit.generate.causal`` continues a prompt; its embedding
is the mean over the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import SpecialTokens
from ..generate import causal
from ..generate.fast import cache_dtype, forward_for
from ..kv_cache import PassThroughCache
from ..masks import BlankSample, collate, find_blanks
from ..model import TiedLMHead
from ..prompts import layout, model_family

Kind = Literal["loglikelihood", "logits", "embedding"]


@dataclass
class ScoreRow:
    """One row: ``context`` (Part A ids) and, for ``loglikelihood``, the ``continuation`` ids to score."""

    kind: Kind
    context: list[int]
    continuation: list[int] = field(default_factory=list)


@dataclass
class ScoreResult:
    logprob: float = 0.0
    token_logprobs: list[float] = field(default_factory=list)
    is_greedy: bool = True
    logits: torch.Tensor | None = None  # (V,) at <sop>: the distribution of the first generated token
    embedding: torch.Tensor | None = None  # (n_embd,)


class Scorer:
    """Runs batches of ``ScoreRow`` lists (one list per request) through the model in one forward pass."""

    def __init__(self, model: torch.nn.Module, special: SpecialTokens) -> None:
        self.model, self.special, self.family = model.eval(), special, model_family(model)
        self.prompts = layout(special, self.family)
        self.causal = bool(getattr(model, "causal_lm", False))
        self.device = next(model.parameters()).device
        self.n_positions = model.config.n_positions
        self.max_block = model.config.max_sequence_length
        self.forward = forward_for(model)

    def check(self, row: ScoreRow) -> ScoreRow:
        """Validate one row (``ValueError`` names the problem) and append [gMASK] to a context without a blank."""
        if not row.context:
            raise ValueError("text_input: empty")
        context = self.prompts.model_input(row.context)
        if row.kind == "loglikelihood" and not row.continuation:
            raise ValueError("continuation: empty")
        # GLM's continuation sits in its own blocks; a causal model's follows the context in one position range
        long = len(context) + len(row.continuation) > self.n_positions if self.causal else False
        if long or len(context) > self.n_positions or len(row.continuation) > self.max_block:
            raise ValueError(
                f"text: {len(context)} context tokens and {len(row.continuation)} continuation tokens do not fit "
                f"the model's {self.n_positions} positions"
            )
        return ScoreRow(row.kind, context, list(row.continuation))

    def _sample(self, row: ScoreRow) -> BlankSample:
        s = self.special
        blank = find_blanks(row.context, s.mask_ids())[0]
        part_b = [s.sop] + row.continuation[:-1]
        n, k = len(row.context), len(part_b)
        return BlankSample(
            tokens=row.context + part_b,
            targets=row.context + (row.continuation or [s.pad]),
            loss_mask=[0] * n + [1] * k,
            position_ids=list(range(n)) + [blank] * k,
            block_position_ids=[0] * n + list(range(1, k + 1)),
            sep=n,
        )

    def _hidden(self, rows: list[ScoreRow]) -> tuple[torch.Tensor, list[int]]:
        """Final hidden states ``[B, S, C]`` of every row, and where each row's first scored token is predicted."""
        if self.causal:
            tokens = [r.context + r.continuation[:-1] for r in rows]
            return causal.encode(self.model, tokens, None), [len(r.context) - 1 for r in rows]
        samples = [self._sample(r) for r in rows]
        batch = collate(samples, pad_id=self.special.pad)
        ids = batch["input_ids"].to(self.device)
        # generate's lean forward without input re-checks (fp32 attention for bf16 on CPU); keys and values are
        # rounded as the engine's cache rounds them but not kept
        cache = PassThroughCache(cache_dtype(self.model))
        mask = batch["attention_mask"].to(self.device)
        lengths = batch["lengths"].tolist()
        hidden = self.forward(ids, batch["position_ids"].to(self.device), mask, cache, True, lengths)  # (B, S, C)
        return hidden, [s.sep for s in samples]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The model's own LM head (kernels, quantized embeddings): GLM's is tied to the embeddings."""
        head = self.model.lm_head
        return head(x, self.model.wte) if isinstance(head, TiedLMHead) else head(x)

    @torch.inference_mode()
    def __call__(self, requests: list[list[ScoreRow]]) -> list[list[ScoreResult]]:
        rows = [r for req in requests for r in req]
        hidden, starts = self._hidden(rows)
        # every row's scored positions through the model's own head, log-softmax and gather at once, then plain
        # Python lists: per-row tensor calls would cost more than the head itself
        spans, targets, at = [], [], 0
        for row, start in zip(rows, starts, strict=True):
            scored = {"embedding": [], "logits": [0], "loglikelihood": row.continuation}[row.kind]
            spans.append((start, at, len(scored)))
            targets += scored
            at += len(scored)
        picked = torch.cat([hidden[b, sep : sep + n] for b, (sep, _, n) in enumerate(spans)])
        raw = self._head(picked).float()
        logp = torch.log_softmax(raw, dim=-1)
        target = torch.tensor(targets, dtype=torch.long, device=logp.device)
        token_lp = logp.gather(1, target[:, None])[:, 0].tolist()
        greedy = (logp.argmax(-1) == target).tolist()
        results = []
        for b, (row, (sep, at, n)) in enumerate(zip(rows, spans, strict=True)):
            res = ScoreResult()
            if row.kind == "embedding":
                n_context = len(row.context) if self.causal else sep  # Part A, or the causal prompt
                res.embedding = F.normalize(hidden[b, :n_context].mean(0).float(), dim=0).cpu()
            elif row.kind == "logits":
                res.logits = raw[at].cpu()
            else:
                res.token_logprobs = token_lp[at : at + n]
                res.logprob = float(sum(res.token_logprobs))
                res.is_greedy = all(greedy[at : at + n])
            results.append(res)
        out, i = [], 0
        for req in requests:
            out.append(results[i : i + len(req)])
            i += len(req)
        return out
