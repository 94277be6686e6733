"""EleutherAI lm-evaluation-harness over glmkit: a model adapter (``--model glmkit``) and multiple-choice task import.

The adapter answers lm-eval's three request types with glmkit's own machinery: ``loglikelihood`` with serve's
``Scorer`` (the continuation scored as GLM generates it, Part B after a ``[gMASK]`` blank: what ``glm_score``
answers), ``loglikelihood_rolling`` in the windows ``glmkit evaluate``'s language-modelling task scores
(``finetune.lm.windows``: every token once, each window after the first with ``rolling_overlap`` tokens of
context), and ``generate_until`` with ``generate.cli.generate_text``. ``pretrained`` is a checkpoint folder (default:
the bundled model); ``prefix`` a soft prompt / P-tuning v2 folder put in front of every request.

lm-eval 0.4 discovers models only in its own registry (its ``MODEL_MAPPING``; no entry points are scanned), so
importing this module registers ``glmkit`` there (``glmkit lm-eval run --model glmkit --model_args pretrained=PATH
--tasks T [--include_path DIR]`` imports it and hands the rest of the command line to lm-eval's own CLI); from
Python, import this module and call ``lm_eval.simple_evaluate(model="glmkit", ...)``.

``load_lm_eval_task`` reads a multiple-choice task YAML (``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``,
Jinja or field names, ``!function``, ``include``) through lm-eval's own ``TaskManager``, so the prompts are exactly
the ones lm-eval builds, and gives back ``Question`` items for glmkit's harness. Data come from the YAML's
``dataset_path`` / ``dataset_kwargs`` as lm-eval reads them (``dataset_path: json`` with local ``data_files`` needs
no hub; relative paths are relative to the working directory, as in lm-eval).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..finetune.lm import windows
from ..generate.cli import generate_text, with_prefix
from ..generate.engine import resolve_special_tokens
from ..generate.fast import optimize_for_decode
from ..prompts import layout, model_family
from ..serve.scoring import Scorer, ScoreRow
from .types import Question

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@register_model("glmkit")
class GlmkitLM(LM):
    """lm-eval's ``LM`` over a glmkit model (``--model_args pretrained=PATH,prefix=DIR,dtype=float32``)."""

    def __init__(
        self,
        pretrained: str | None = None,
        prefix: str | None = None,
        dtype: str = "float32",
        batch_size: int | str | None = 16,
        max_gen_toks: int = 256,
        rolling_overlap: int = 32,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        **unused: Any,  # lm-eval's additional_config (device, max_batch_size): glmkit runs on the CPU it loads on
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
        if model is None:
            from ..bundled import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(pretrained, dtype=DTYPES[dtype])
        elif tokenizer is None:
            raise ValueError("tokenizer: give the tokenizer of the model passed in")
        self.model = optimize_for_decode(with_prefix(model, Path(prefix) if prefix else None))
        self.tok = tokenizer
        self.scorer = Scorer(self.model, resolve_special_tokens(self.model, None, tokenizer))
        self.layout = layout(self.scorer.special, model_family(self.model))
        self.batch_size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks, self.rolling_overlap = int(max_gen_toks), int(rolling_overlap)
        if self.batch_size <= 0 or self.max_gen_toks <= 0:
            raise ValueError(f"batch_size / max_gen_toks: must be positive, got {batch_size} / {max_gen_toks}")

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def _context(self, text: str) -> list[int]:
        """``text`` laid out as a prompt to continue; the oldest tokens go when it is longer than the context (as
        lm-eval's HF model truncates from the left)."""
        body = self.tok.encode(text)
        ids = self.layout.continuation(body)
        extra = len(ids) - self.scorer.n_positions
        return self.layout.continuation(body[extra:]) if extra > 0 else ids

    def _score(self, rows: list[ScoreRow]) -> list[tuple[float, bool]]:
        out = []
        for i in range(0, len(rows), self.batch_size):
            results = self.scorer([[self.scorer.check(r)] for r in rows[i : i + self.batch_size]])
            out += [(res[0].logprob, res[0].is_greedy) for res in results]
        return out

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = []
        for req in requests:
            context, continuation = req.args
            ids = self.tok.encode(continuation)
            if not ids:
                raise ValueError(f"continuation: {continuation!r} has no tokens")
            rows.append(ScoreRow("loglikelihood", self._context(context), ids[: self.scorer.max_block]))
        return self._score(rows)

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            spans = windows(self.tok.encode(text), self.scorer.n_positions, self.rolling_overlap)
            rows = [ScoreRow("loglikelihood", self.layout.continuation(ctx), scored) for ctx, scored in spans]
            out.append(sum(lp for lp, _ in self._score(rows)))
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs)
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            settings: dict[str, Any] = {"max_new_tokens": int(kw.pop("max_gen_toks", self.max_gen_toks))}
            temperature = float(kw.pop("temperature", 0.0))
            if kw.pop("do_sample", False) or temperature > 0:
                settings.update(do_sample=True, temperature=temperature or 1.0)
                settings.update({k: kw[k] for k in ("top_p", "top_k") if k in kw})
            if until:
                settings["stop_strings"] = until
            text = generate_text(self.model, self.tok, context, truncate=True, **settings)[0].spans[0]
            for stop in until:  # lm-eval's contract: the text before the first stop string
                text = text.split(stop)[0]
            out.append(text)
        return out


def load_lm_eval_task(yaml_path: str | Path, task: str | None = None) -> list[Question]:
    """The documents of a multiple-choice lm-eval task YAML as ``Question`` items: ``question`` is the prompt lm-eval
    builds (``description`` + ``doc_to_text``), ``options`` the choices under letters A, B, ..., ``answer`` the
    target's letter; ``meta`` keeps the task, the document, its choices and ``target_delimiter`` (lm-eval scores
    ``target_delimiter + choice`` after the prompt). ``task``: which task of the YAML's folder (default: the one the
    file defines)."""
    from lm_eval.tasks import TaskManager

    path = Path(yaml_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval task {yaml_path} does not exist")
    manager = TaskManager(include_path=str(path.parent), include_defaults=False)
    if task is None:
        names = [n for n, e in manager.task_index.items() if e.yaml_path == path and e.kind.name == "TASK"]
        if len(names) != 1:
            raise ValueError(f"{yaml_path}: defines {len(names)} tasks ({names}); name the one to read with task=")
        task = names[0]
    if task not in manager.task_index:
        raise ValueError(f"task: {task!r} is not defined in {path.parent}; there: {sorted(manager.task_index)}")
    loaded = manager.load([task])["tasks"][task]
    config = loaded.config
    if config.output_type != "multiple_choice":
        raise ValueError(f"{yaml_path}: output_type is {config.output_type!r}; only multiple_choice tasks are read")
    description = config.description or ""
    questions = []
    for i, doc in enumerate(loaded.eval_docs):
        choices = [str(c) for c in loaded.doc_to_choice(doc)]
        if len(choices) > len(string.ascii_uppercase):
            raise ValueError(f"{yaml_path}: document {i} has {len(choices)} choices, more than letters A-Z")
        letters = string.ascii_uppercase[: len(choices)]
        target = loaded.doc_to_target(doc)
        index = choices.index(target) if isinstance(target, str) and target in choices else target
        if isinstance(index, list) or not isinstance(index, int) or not 0 <= index < len(choices):
            raise ValueError(f"{yaml_path}: document {i}: target {target!r} is not one of its {len(choices)} choices")
        questions.append(
            Question(
                id=f"{task}-{i}",
                question=description + loaded.doc_to_text(doc),
                options=dict(zip(letters, choices, strict=True)),
                answer=letters[index],
                source=f"lm-eval:{task}",
                meta={"lm_eval_task": task, "doc": dict(doc), "target_delimiter": config.target_delimiter},
                line=i + 1,
            )
        )
    return questions
