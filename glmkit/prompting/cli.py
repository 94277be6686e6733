"""``glmkit prompt-eval``: evaluate a model on a question file with a prompt template and a prompting method.

``--data`` is MedQA, MedMCQA, PubMedQA or glmkit jsonl (``glmkit.prompting.datasets``; malformed rows are reported
with their line numbers and left out). The model is the bundled one, a glmkit checkpoint (``--model``, with a soft
prompt from ``--prefix``), any transformers causal LM (``--backend transformers``) or any OpenAI-compatible server
(``--backend openai --url``; log-likelihoods only from a glmkit server, through its ``glm_score`` model).
``--exemplars`` is a question file whose rows carry an ``explanation`` (or MedMCQA's ``exp``) for chain-of-thought
shots, picked by similarity to each question, stratified by subject and question type (``--fixed-exemplars``: the
first K); ``--knowledge`` a jsonl of ``{"id", "text", "citation"}`` documents retrieved by BM25. Writes
``report.json``, ``predictions.jsonl``, ``run.json``, ``risk_coverage.png`` and ``reliability.png`` to ``--out`` and
prints the headline figures.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .strategies import METHODS

BACKENDS = ("glmkit", "transformers", "openai")


@dataclass
class PromptEvalOptions:
    """Everything ``glmkit prompt-eval`` takes (the flags of the same names)."""

    data: Path
    out: Path
    backend: Literal["glmkit", "transformers", "openai"] = "glmkit"
    model: str | None = None
    url: str | None = None
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    template: str = "mc-en"
    domain: str | None = None
    method: str = "loglik"
    option_mode: Literal["letter", "text"] = "letter"
    normalise: Literal["none", "token", "char"] = "none"
    shots: int = 0
    exemplars: Path | None = None
    fixed_exemplars: bool = False
    knowledge: Path | None = None
    snippets: int = 0
    samples: int = 5
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 0
    abstain: bool = False
    threshold: float | None = None
    prefix: Path | None = None
    truncate: Literal["error", "left"] = "error"
    layout: str = "auto"
    limit: int | None = None
    seed: int = 0
    resamples: int = 1000
    resume: bool = False
    progress: bool = True


def build_backend(o: PromptEvalOptions) -> Any:
    from .backends import GlmkitModel, OpenAIModel, TransformersModel

    if o.backend not in BACKENDS:
        raise ValueError(f"--backend: expected one of {', '.join(BACKENDS)}, got {o.backend!r}")
    if o.backend == "openai":
        if not o.url:
            raise ValueError("--url: the openai backend needs the server's URL (e.g. http://127.0.0.1:8000)")
        if o.prefix is not None:
            raise ValueError("--prefix: a soft prompt is loaded by the server (glmkit serve --prefix), not here")
        return OpenAIModel(o.url, model=o.model, api_key=o.api_key, timeout=o.timeout, retries=o.retries, top_p=o.top_p)
    if o.url:
        raise ValueError(f"--url: only the openai backend talks to a server (--backend {o.backend} runs in process)")
    if o.backend == "transformers":
        if o.model is None or o.prefix is not None:
            raise ValueError("--backend transformers: give --model (a transformers folder); --prefix is glmkit's")
        return TransformersModel.load(o.model, top_p=o.top_p, truncate=o.truncate)
    return GlmkitModel.load(o.model, prefix=o.prefix, top_p=o.top_p, truncate=o.truncate)


def load_exemplars(path: Path, layout: str = "auto") -> list[Any]:
    """Solved questions for few-shot prompts; an ``explanation`` (or MedMCQA ``exp``) field is the reasoning."""
    from .datasets import load_questions
    from .types import Exemplar

    pool = load_questions(path, layout, on_error="raise")
    out = []
    for q in pool:
        explanation = q.meta.get("explanation") or q.meta.get("exp")
        out.append(Exemplar(q, str(explanation) if explanation else None))
    return out


def prompt_eval(o: PromptEvalOptions) -> dict[str, Any]:
    """Run the evaluation ``o`` describes and return its report (also written to ``o.out``)."""
    from .datasets import load_questions
    from .exemplars import FixedSelector, SimilaritySelector
    from .harness import EvalConfig, run_eval
    from .knowledge import BM25Knowledge
    from .strategies import Strategy, StrategyConfig
    from .templates import load_template

    if o.limit is not None and o.limit < 1:
        raise ValueError(f"--limit: expected an int >= 1, got {o.limit}")
    if o.shots and o.exemplars is None:
        raise ValueError(f"--shots {o.shots}: give the exemplars to choose from with --exemplars FILE")
    if o.snippets and o.knowledge is None:
        raise ValueError(f"--snippets {o.snippets}: give the documents to retrieve from with --knowledge FILE")
    config = StrategyConfig(
        method=o.method,  # type: ignore[arg-type]
        shots=o.shots,
        snippets=o.snippets,
        samples=o.samples,
        temperature=o.temperature,
        max_tokens=o.max_tokens,
        option_mode=o.option_mode,
        normalise=o.normalise,
        threshold=o.threshold,
        seed=o.seed,
    )
    template = load_template(o.template, abstain=True if o.abstain else None)
    if o.domain:
        template = template.with_defaults(domain=o.domain)
    questions = load_questions(o.data, o.layout, on_error="skip")  # type: ignore[arg-type]
    skipped = list(questions.errors)
    questions = list(questions)[: o.limit]
    for q in questions:  # a field the template needs and a question lacks: named before any model is loaded
        template.render(q)
    selector = None
    if o.shots:
        pool = load_exemplars(o.exemplars, "auto")  # type: ignore[arg-type]
        selector = FixedSelector(pool) if o.fixed_exemplars else SimilaritySelector(pool, seed=o.seed)
    knowledge = BM25Knowledge.from_jsonl(o.knowledge) if o.snippets else None
    lm = build_backend(o)
    try:
        strategy = Strategy(lm, template, config, exemplars=selector, knowledge=knowledge)
        settings = {
            k: str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(o).items()
            if k not in ("api_key", "progress", "resume")
        }
        eval_config = EvalConfig(
            Path(o.out),
            resamples=o.resamples,
            seed=o.seed,
            progress=o.progress,
            resume=o.resume,
            settings=settings,
            skipped_rows=skipped,
        )
        report = run_eval(questions, strategy, eval_config)
    finally:
        if hasattr(lm, "close"):
            lm.close()
    return report


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="question file: MedQA/MedMCQA/PubMedQA/glmkit jsonl")
    p.add_argument("--out", required=True, type=Path, help="folder for report.json, predictions.jsonl and the plots")
    p.add_argument("--backend", choices=BACKENDS, default="glmkit")
    p.add_argument(
        "--model", help="glmkit checkpoint (default: the bundled model), transformers folder, or served name"
    )
    p.add_argument("--url", help="OpenAI-compatible server (--backend openai), e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="bearer token for --url")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    p.add_argument("--retries", type=int, default=3, help="retries of a failed HTTP request, with backoff (default 3)")
    p.add_argument("--template", default="mc-en", help="built-in template name or a YAML file (default mc-en)")
    p.add_argument("--domain", help="the template's {domain}, e.g. 'the King James Bible'")
    p.add_argument("--method", choices=METHODS, default="loglik")
    p.add_argument("--option-mode", choices=("letter", "text"), default="letter", help="loglik: score letters or texts")
    p.add_argument(
        "--normalise", choices=("none", "token", "char"), default="none", help="loglik text-mode length norm"
    )
    p.add_argument("--shots", type=int, default=0, help="few-shot exemplars per question")
    p.add_argument("--exemplars", type=Path, help="question file the exemplars come from")
    p.add_argument("--fixed-exemplars", action="store_true", help="the first K exemplars, not the most similar")
    p.add_argument("--knowledge", type=Path, help="jsonl of {id, text, citation} documents (BM25 retrieval)")
    p.add_argument("--snippets", type=int, default=0, help="knowledge snippets per question")
    p.add_argument("--samples", type=int, default=5, help="self-consistency / ensemble samples (default 5)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=0, help="tokens per answer (0: 8 direct, 192 reasoning, 96 open)")
    p.add_argument("--abstain", action="store_true", help="offer the template's 'I am not sure' option")
    p.add_argument("--threshold", type=float, help="abstain when the confidence is below this")
    p.add_argument("--prefix", type=Path, help="soft prompt folder (glmkit.finetune.peft.save_prefix) for --model")
    p.add_argument("--truncate", choices=("error", "left"), default="error", help="a prompt over the context: "
                   "mark the question failed (error) or drop the prompt's start (left)")  # fmt: skip
    p.add_argument("--layout", default="auto", help="data layout: auto, medqa, medmcqa, pubmedqa, glmkit")
    p.add_argument("--limit", type=int, help="the first N questions only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    p.add_argument(
        "--resume", action="store_true", help="keep the answers an interrupted run with these settings wrote"
    )
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    fields = {f.name for f in dataclasses.fields(PromptEvalOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    report = prompt_eval(PromptEvalOptions(progress=not args.no_progress, **values))
    acc = report["accuracy"]
    counts = ", ".join(f"{report[k]} {k}" for k in ("answered", "abstained", "unparsed", "failed"))
    print(f"{report['n']} questions: {counts} ({len(report['skipped_rows'])} malformed rows skipped)")
    if acc["value"] is not None:
        lo, hi = acc["ci95"]
        print(f"accuracy {acc['value']:.1%} (95% CI {lo:.1%}-{hi:.1%})")
        for c, v in report["accuracy_at_coverage"].items():
            if v["value"] is not None:
                print(f"  at coverage {float(c):.0%}: {v['value']:.1%}")
    print(f"report: {Path(args.out) / 'report.json'}")
    return 0
