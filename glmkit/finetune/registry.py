"""Task names → task builders, for ``glmkit finetune`` and ``glmkit evaluate``.

A task is a name and its options (the ``task:`` section of a config). Every option is checked: an unknown one, or a
value of the wrong kind, is a ``ConfigError`` naming ``task.<option>``.

- ``boolq``, ``cb``, ``copa``, ``rte``, ``wic``, ``wsc``, ``multirc``, ``record``: the SuperGLUE tasks with GLM's
  patterns (``superglue_task``; options ``pattern_id``, ``max_length``, ``multi_token``, ``length_penalty``).
- ``cloze``: a pattern (``"{text} It is about[MASK]."``: fields in braces, one ``[MASK]``) and a verbalizer (label →
  answer word); one-token words are scored at the blank, ``multi_token: true`` scores words of any length by span.
- ``seq2seq``: source → target text (``Seq2SeqTask``); ``glmkit evaluate`` generates (greedy or beam) and scores
  ROUGE-1/2/L, exact match and token F1.
- ``classification`` / ``multiple_choice``: the pooled-[CLS] head (``ClassificationTask``, ``MultipleChoiceTask``).
- ``lm``: perplexity and the sliding-window loss of text (``LMTask``).
- ``heldout-cloze``: ``glmkit eval-cloze`` (zero-shot one-word blanks of held-out documents of a prepared data
  folder, against unigram baselines); evaluation only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from .classify import ClassificationTask, MultipleChoiceTask
from .cloze import ClozeTask
from .lm import LMTask
from .seq2seq import Seq2SeqTask
from .superglue import TASKS as SUPERGLUE
from .superglue import superglue_task
from .tasks import accuracy_and_f1_macro
from .template import check_pattern, pattern_parts


@dataclass(frozen=True)
class HeldOutCloze:
    """``glmkit eval-cloze`` as a task: its data is a prepared data folder (items from ``val``, baselines from
    ``train``)."""

    name: str = "heldout-cloze"
    items: int = 500
    seed: int = 0
    n_choices: int = 5
    max_new_tokens: int = 6
    metric_names: tuple[str, ...] = ("open_accuracy", "choice_accuracy")


@dataclass(frozen=True)
class Seq2SeqGeneration:
    """How ``glmkit evaluate`` generates a seq2seq task's outputs (``glmkit.generate``)."""

    num_beams: int = 1
    max_new_tokens: int = 32
    length_penalty: float = 1.0


@dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable[[dict[str, Any], int | None], Any]
    options: tuple[str, ...]
    cls: type
    """The class the options become fields of: a value must have the kind of the field's default."""
    trains: bool = True


def _check_kinds(cls: type, opts: Mapping[str, Any]) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    for key, value in opts.items():
        want = defaults.get(key)
        if want is None or isinstance(want, str) and isinstance(value, str):
            continue
        kind = float if type(want) is float else type(want)
        ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"task.{key}: expected {kind.__name__}, got {value!r}")


def _cloze(o: dict[str, Any], context: int | None) -> ClozeTask:
    pattern, verbalizer = o.pop("pattern", None), o.pop("verbalizer", None)
    if not isinstance(pattern, str):
        raise ConfigError(f"task.pattern: a cloze task needs a pattern with one [MASK], got {pattern!r}")
    try:
        check_pattern(pattern)
    except ValueError as e:
        raise ConfigError(f"task.{e}") from e
    if not isinstance(verbalizer, Mapping) or not verbalizer:
        raise ConfigError(f"task.verbalizer: expected a mapping label -> answer word, got {verbalizer!r}")
    bad = [w for w in verbalizer.values() if not isinstance(w, str) or not w.strip()]
    if bad:
        raise ConfigError(f"task.verbalizer: answers must be non-empty text, got {bad[0]!r}")
    label_field = o.pop("label_field", "label")
    _default_length(o, context)
    return ClozeTask(
        name="cloze",
        pattern=lambda row: pattern_parts(pattern, row),
        verbalizer=dict(verbalizer),
        label=lambda row: row.get(label_field),
        metric=accuracy_and_f1_macro,
        metric_names=("accuracy", "f1_macro"),
        **o,
    )


def _default_length(o: dict[str, Any], context: int | None, key: str = "max_length") -> None:
    if context is not None:
        o.setdefault(key, context)


def _superglue(name: str) -> Callable[[dict[str, Any], int | None], ClozeTask]:
    def build(o: dict[str, Any], context: int | None) -> ClozeTask:
        _default_length(o, context)
        return superglue_task(name, o.pop("pattern_id", None), **o)

    return build


def _seq2seq(o: dict[str, Any], context: int | None) -> Seq2SeqTask:
    return Seq2SeqTask(**o)


def _classification(o: dict[str, Any], context: int | None) -> ClassificationTask:
    labels = o.pop("labels", None)
    if not isinstance(labels, list) or not labels:
        raise ConfigError(f"task.labels: a classification task needs its list of labels, got {labels!r}")
    _default_length(o, context)
    return ClassificationTask(labels=tuple(labels), **o)


def _multiple_choice(o: dict[str, Any], context: int | None) -> MultipleChoiceTask:
    _default_length(o, context)
    return MultipleChoiceTask(**o)


def _lm(o: dict[str, Any], context: int | None) -> LMTask:
    _default_length(o, context)
    return LMTask(**o)


def _heldout(o: dict[str, Any], context: int | None) -> HeldOutCloze:
    return HeldOutCloze(**o)


_CLOZE_OPTIONS = ("max_length", "multi_token", "length_penalty")
GENERATION_OPTIONS = tuple(f.name for f in dataclasses.fields(Seq2SeqGeneration))
REGISTRY: dict[str, TaskSpec] = {
    **{n: TaskSpec(n, _superglue(n), ("pattern_id", *_CLOZE_OPTIONS), ClozeTask) for n in SUPERGLUE},
    "cloze": TaskSpec("cloze", _cloze, ("pattern", "verbalizer", "label_field", *_CLOZE_OPTIONS), ClozeTask),
    "seq2seq": TaskSpec(
        "seq2seq",
        _seq2seq,
        ("source_key", "target_key", "template", "max_source_length", "max_target_length", "label_smoothing"),
        Seq2SeqTask,
    ),
    "classification": TaskSpec(
        "classification", _classification, ("labels", "template", "label_field", "max_length"), ClassificationTask
    ),
    "multiple_choice": TaskSpec(
        "multiple_choice",
        _multiple_choice,
        ("template", "choices_field", "label_field", "max_length"),
        MultipleChoiceTask,
    ),
    "lm": TaskSpec("lm", _lm, ("text_field", "max_length", "overlap"), LMTask),
    "heldout-cloze": TaskSpec(
        "heldout-cloze", _heldout, ("items", "seed", "n_choices", "max_new_tokens"), HeldOutCloze, trains=False
    ),
}


def build_task(name: Any, options: Mapping[str, Any] | None = None, context: int | None = None) -> Any:
    """The task ``name`` with ``options``; ``context``: the model's positions, the default length of a task's rows
    (``max_length``). A seq2seq task's generation options are read by ``generation_options``."""
    spec = REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ConfigError(f"task.name: unknown task {name!r}; known: {', '.join(REGISTRY)}")
    opts = dict(options or {})
    known = spec.options + (GENERATION_OPTIONS if name == "seq2seq" else ())
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigError(f"task.{unknown[0]}: unknown option of task {name}; its options: {', '.join(known)}")
    generation = {k: opts.pop(k) for k in GENERATION_OPTIONS if k in opts}
    _check_kinds(Seq2SeqGeneration, generation)
    _check_kinds(spec.cls, opts)
    try:
        return spec.build(opts, context)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the task classes name the field in their messages
        raise ConfigError(f"task ({name}): {e}") from e


def generation_options(name: str, options: Mapping[str, Any] | None) -> Seq2SeqGeneration:
    """The generation settings in a seq2seq task's options (defaults for other tasks)."""
    opts = {k: v for k, v in (options or {}).items() if k in GENERATION_OPTIONS}
    _check_kinds(Seq2SeqGeneration, opts)
    return Seq2SeqGeneration(**opts)
