"""The three ``LanguageModel`` backends: a glmkit model in process, any transformers causal LM, and any
OpenAI-compatible HTTP endpoint (``glmkit serve`` among them).

Every backend lays a prompt out as its model's own generate call would, so a question costs the same tokens
everywhere: glmkit through ``glmkit.prompts`` (GLM: ``[CLS] prompt [gMASK]``, the answer decoded at the blank), the
glmkit transformers classes through their ``generation_inputs``, a plain causal LM as its tokenizer encodes the text.
A log-likelihood is the continuation's summed log-probability after the prompt, each tokenized on its own (as
lm-evaluation-harness's ``loglikelihood`` requests and glmkit's ``glm_score`` model do): in process through
``glmkit.serve.scoring.Scorer``, remotely through the server's ``glm_score`` model, so the two agree to float32
rounding. Completions are cut before the first stop string, as the OpenAI API does.

A prompt longer than the model's context raises ``PromptTooLong`` (a ``BackendError``: the harness marks that
question failed with the message) unless ``truncate="left"``, which keeps the prompt's end (the question and the
answer cue) and drops its start.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from ..serve.text import find_stop
from .types import BackendError

Truncate = Literal["error", "left"]


class PromptTooLong(BackendError):
    """A prompt does not fit the model's context (``truncate="error"``)."""


class CannotScore(ValueError):
    """The endpoint serves no log-likelihood scoring model: a setup error, not a per-question failure."""


def _cut(text: str, stop: Sequence[str]) -> str:
    at = find_stop(text, list(stop))
    return text if at < 0 else text[:at]


def _fit(body: list[int], room: int, truncate: Truncate, what: str) -> list[int]:
    """``body`` cut from the left to ``room`` tokens (``truncate="left"``) or ``PromptTooLong``."""
    if len(body) <= room:
        return body
    if truncate != "left" or room <= 0:
        raise PromptTooLong(f"{what}: {len(body)} tokens do not fit the model's context ({room} tokens for the text)")
    return body[len(body) - room :]


class GlmkitModel:
    """A glmkit model (GLM, ChatGLM) in this process: ``glmkit.generate`` and ``glmkit.serve.scoring.Scorer``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str = "glmkit",
        batch_size: int = 8,
        top_p: float = 1.0,
        truncate: Truncate = "error",
    ) -> None:
        from ..generate.engine import resolve_special_tokens
        from ..prompts import model_layout
        from ..serve.scoring import Scorer

        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.batch_size, self.top_p, self.truncate = batch_size, top_p, truncate
        self.special = resolve_special_tokens(model, None, tokenizer)
        self.prompts = model_layout(model, self.special, tokenizer)
        self.scorer = Scorer(model, self.special)
        self.causal = bool(getattr(model, "causal_lm", False))

    @classmethod
    def load(cls, path: str | Path | None = None, *, prefix: str | Path | None = None, **kwargs: Any) -> GlmkitModel:
        """The checkpoint at ``path`` (``None``: the bundled model), with the soft prompt saved in ``prefix``."""
        from ..bundled import load_model_and_tokenizer, model_path

        model, tok = load_model_and_tokenizer(path)
        if prefix is not None:
            from ..finetune.peft import load_prefix

            model = load_prefix(model, prefix)
        kwargs.setdefault("name", f"glmkit:{model_path(path).name}" + (f"+{Path(prefix).name}" if prefix else ""))
        return cls(model, tok, **kwargs)

    def _prompt(self, text: str, room: int, what: str) -> list[int]:
        """The family's continuation prompt of ``text`` in at most ``room`` positions."""
        extra = len(self.prompts.continuation([]))  # the ids the layout adds around a text
        return self.prompts.continuation(_fit(self.tok.encode(text), room - extra, self.truncate, what))

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        from ..generate import generate

        positions = self.model.config.n_positions - (max_tokens if self.causal else 0)
        rows = [self._prompt(p, positions, f"prompt {i}") for i, p in enumerate(prompts)]
        blanks = set(self.prompts.blank_ids())
        for i, row in enumerate(rows):
            # generate() would fill a blank written in the text instead of continuing the prompt
            if sum(t in blanks for t in row) > 1:
                raise BackendError(f"prompt {i}: holds a blank token ([MASK]/[sMASK]/[gMASK]); prompts are plain text")
        sampling = temperature > 0
        kw: dict[str, Any] = dict(max_new_tokens=max_tokens, stop_strings=list(stop) or None)
        if sampling:
            kw.update(do_sample=True, temperature=temperature, top_p=self.top_p, top_k=None, num_return_sequences=n)
        out: list[list[str]] = []
        # one generator across the chunks: the samples of a call follow from its seed alone
        gen = torch.Generator(device=next(self.model.parameters()).device)
        gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            res = generate(self.model, chunk, tokenizer=self.tok, generator=gen if sampling else None, **kw)
            texts = []
            for tokens, reason in zip(res.new_tokens, res.finish_reasons, strict=True):
                span = tokens[:-1] if reason == "stop" else tokens
                texts.append(_cut(self.tok.decode(span, skip_special_tokens=True), stop))
            per = n if sampling else 1
            out += [texts[i * per : (i + 1) * per] * (n // per) for i in range(len(chunk))]
        return out

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        from ..serve.scoring import ScoreRow

        rows = []
        for i, (context, continuation) in enumerate(requests):
            cont = self.tok.encode(continuation)
            if not cont:
                raise BackendError(f"request {i}: the continuation {continuation!r} has no tokens")
            room = self.model.config.n_positions - (len(cont) if self.causal else 0)
            try:
                rows.append(
                    self.scorer.check(ScoreRow("loglikelihood", self._prompt(context, room, f"request {i}"), cont))
                )
            except ValueError as e:
                raise PromptTooLong(f"request {i}: {e}") from e
        # similar lengths share a forward pass: less padding
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].context) + len(rows[i].continuation))
        results: dict[int, tuple[float, int]] = {}
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, (res,) in zip(idx, self.scorer([[rows[i]] for i in idx]), strict=True):
                results[i] = (res.logprob, len(res.token_logprobs))
        return [results[i] for i in range(len(rows))]


class TransformersModel:
    """Any transformers ``AutoModelForCausalLM`` with its tokenizer; glmkit's own classes (``glmkit.hf``) get the GLM
    layout through their ``generation_inputs``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str = "transformers",
        batch_size: int = 8,
        top_p: float = 1.0,
        truncate: Truncate = "error",
    ) -> None:
        self.model, self.tok, self.name = model.eval(), tokenizer, name
        self.batch_size, self.top_p, self.truncate = batch_size, top_p, truncate
        self.blocks = hasattr(model, "generation_inputs")  # GLM: the answer is a Part-B span, not more positions
        config = model.config
        inner = getattr(model, "glm", None)
        self.limit = (
            inner.config.n_positions
            if inner is not None and hasattr(inner.config, "n_positions")
            else getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        )
        if self.limit is None:
            raise ValueError(f"{name}: the model config names no context length (n_positions/max_position_embeddings)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = pad if pad is not None else 0
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, **kwargs: Any) -> TransformersModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        kwargs.setdefault("name", f"transformers:{Path(path).name}")
        return cls(model, AutoTokenizer.from_pretrained(path), **kwargs)

    def _prompt(self, text: str, room: int, what: str) -> list[int]:
        """The ids the model conditions on for ``text``: the tokenizer's (special tokens kept at both ends when the
        left of the text is cut), completed by the GLM classes' ``generation_inputs`` (``[gMASK] <sop>``)."""
        ids = self.tok(text)["input_ids"]
        if len(ids) > room:
            _fit(ids, room, self.truncate, what)  # raises unless truncating
            side, self.tok.truncation_side = self.tok.truncation_side, "left"
            try:
                ids = self.tok(text, truncation=True, max_length=room)["input_ids"]
            finally:
                self.tok.truncation_side = side
        if self.blocks:
            ids = self.model.generation_inputs(torch.tensor([ids]), None)[0][0].tolist()
        return ids

    def _padded(self, rows: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pads = [[self.pad] * (width - len(r)) for r in rows]
        ids = [p + r if left else r + p for r, p in zip(rows, pads, strict=True)]
        mask = [
            [0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p)
            for r, p in zip(rows, pads, strict=True)
        ]
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        room = self.limit - (0 if self.blocks else max_tokens)
        rows = [self._prompt(p, room, f"prompt {i}") for i, p in enumerate(prompts)]
        sampling = temperature > 0
        kw: dict[str, Any] = dict(max_new_tokens=max_tokens, pad_token_id=self.pad, do_sample=sampling)
        if sampling:
            kw.update(temperature=temperature, top_p=self.top_p, top_k=None, num_return_sequences=n)
        if stop:
            kw.update(stop_strings=list(stop), tokenizer=self.tok)
        out: list[list[str]] = []
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
            if seed is not None:  # transformers samples from the global RNG: seeded here, restored after
                torch.manual_seed(seed)
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                ids, mask = self._padded(chunk, left=True)
                seqs = self.model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
                texts = [_cut(self.tok.decode(s, skip_special_tokens=True), stop) for s in seqs.tolist()]
                per = n if sampling else 1
                out += [texts[i * per : (i + 1) * per] * (n // per) for i in range(len(chunk))]
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        rows, starts = [], []
        for i, (context, continuation) in enumerate(requests):
            cont = self.tok(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                raise BackendError(f"request {i}: the continuation {continuation!r} has no tokens")
            room = self.limit - (0 if self.blocks else len(cont))
            prompt = self._prompt(context, room, f"request {i}")
            rows.append(prompt + cont)
            starts.append(len(prompt))
        out: list[tuple[float, int]] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids, mask = self._padded([r[:-1] for r in chunk], left=False)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for b, row in enumerate(chunk):
                s = starts[start + b]
                target = torch.tensor(row[s:], device=self.device)
                lp = logp[b, s - 1 : len(row) - 1].gather(1, target[:, None])
                out.append((float(lp.sum()), len(target)))
        return out


class OpenAIModel:
    """An OpenAI-compatible server: ``/v1/completions`` for text; log-likelihoods through glmkit's KServe v2
    ``glm_score`` model (``POST /v2/models/glm_score/infer``), which only a glmkit server has.

    Transport errors, timeouts, 429 and 5xx answers are retried ``retries`` times with exponential backoff
    (``backoff`` · 2^attempt seconds, or the server's Retry-After when shorter than 30 s), then ``BackendError``; any
    other 4xx is ``BackendError`` at once with the server's message. ``n`` above the server's ``max_n`` is split
    into several requests whose seeds continue where the last left off (choice i of n uses seed + i, vLLM's rule).
    """

    SCORE_MODEL = "glm_score"

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        top_p: float = 1.0,
        max_n: int = 8,
        name: str | None = None,
    ) -> None:
        try:
            import httpx
        except ImportError as e:  # the serve extra
            raise ImportError("the openai backend needs httpx: pip install 'glmkit[serve]'") from e
        base = url.rstrip("/")
        self.url = base if "://" in base else f"http://{base}"
        self.model, self.retries, self.backoff, self.top_p, self.max_n = model, retries, backoff, top_p, max_n
        self.name = name or f"openai:{self.url}"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)
        self._score_batch: int | None = None
        self.attempts = 0  # HTTP requests sent, retries included

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        reason, wait = "", 0.0
        for attempt in range(self.retries + 1):
            time.sleep(wait)
            wait = self.backoff * 2**attempt
            self.attempts += 1
            try:
                r = self.client.request(method, path, json=body)
            except httpx.TimeoutException as e:
                reason = f"timed out ({type(e).__name__})"
                continue
            except httpx.TransportError as e:
                reason = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                reason = f"HTTP {r.status_code}: {r.text[:200]}"
                after = r.headers.get("retry-after", "")
                if after.replace(".", "", 1).isdigit() and float(after) < 30:
                    wait = float(after)
                continue
            if r.status_code == 404 and path.startswith("/v2/"):
                return None
            if r.status_code >= 400:
                raise BackendError(f"{self.url}{path}: HTTP {r.status_code}: {r.text[:300]}")
            try:
                return r.json()
            except ValueError as e:
                raise BackendError(f"{self.url}{path}: the answer is not JSON: {r.text[:200]!r}") from e
        raise BackendError(f"{self.url}{path}: {reason} (after {self.retries + 1} attempts)")

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        n: int = 1,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[list[str]]:
        out = []
        for prompt in prompts:
            texts: list[str] = []
            while len(texts) < n:
                body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
                body["n"] = min(self.max_n, n - len(texts)) if temperature > 0 else 1
                body |= {"top_p": self.top_p} if temperature > 0 else {}
                body |= {"stop": list(stop)} if stop else {}
                body |= {"seed": seed + len(texts)} if seed is not None else {}
                body |= {"model": self.model} if self.model else {}
                answer = self._request("POST", "/v1/completions", body)
                choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
                if not choices or not all(isinstance(c.get("text"), str) for c in choices):
                    raise BackendError(f"{self.url}/v1/completions: an answer without choices: {str(answer)[:200]}")
                got = [_cut(c["text"], stop) for c in choices]
                texts += got if temperature > 0 else got * n
            out.append(texts[:n])
        return out

    def _score_batch_size(self) -> int:
        if self._score_batch is None:
            config = self._request("GET", f"/v2/models/{self.SCORE_MODEL}/config")
            if config is None:
                raise CannotScore(
                    f"{self.url} serves no '{self.SCORE_MODEL}' model: log-likelihood scoring needs a glmkit server "
                    "(glmkit serve); use a generation method (--method generate, cot, self-consistency) instead"
                )
            self._score_batch = max(1, int(config.get("max_batch_size") or 1))
        return self._score_batch

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        size, out = self._score_batch_size(), []
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]

            def tensor(name: str, values: list[str]) -> dict[str, Any]:
                return {"name": name, "datatype": "BYTES", "shape": [len(values), 1], "data": values}

            body = {
                "inputs": [tensor("text_input", [c for c, _ in chunk]), tensor("continuation", [x for _, x in chunk])]
            }
            answer = self._request("POST", f"/v2/models/{self.SCORE_MODEL}/infer", body)
            if answer is None:
                raise CannotScore(f"{self.url}: the '{self.SCORE_MODEL}' model is gone (unloaded?)")
            outputs = {o.get("name"): o.get("data") for o in answer.get("outputs") or []}
            logprob, count = outputs.get("logprob"), outputs.get("num_tokens")
            if not isinstance(logprob, list) or not isinstance(count, list) or len(logprob) != len(chunk):
                raise BackendError(f"{self.url}: a '{self.SCORE_MODEL}' answer without logprob/num_tokens")
            out += [(float(lp), int(k)) for lp, k in zip(logprob, count, strict=True)]
        return out
