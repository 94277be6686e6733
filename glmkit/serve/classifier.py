"""``glm_classify``: a fine-tuned classifier served as a dynamically batched KServe v2 model, the shape of Triton's
"optimising BERT" tutorial: ``TEXT`` in, ``LOGITS`` and the ``LABEL`` out.

Two kinds of model answer it, both views of the served GLM (its weights are shared with ``llm`` and the scoring
models):

- a sequence classifier: a folder whose config.json names ``GLMForSequenceClassification`` (``glmkit.hf``'s
  ``save_pretrained``, or ``glmkit finetune`` with a ``classification`` task). The pooled-[CLS] head
  (``GLMForSequenceClassification.from_glm`` around the served GLM, its head read from the folder) scores
  ``[CLS] text <eos>``, laid out by ``ClassificationTask`` (with the template and ``max_length`` of the folder's
  ``finetune.json`` when it has one); LOGITS are the head's ``num_labels`` logits, LABEL its ``id2label`` name.
- a cloze model: a GLM and a ``cloze`` task (a pattern with one field and one ``[MASK]``, a verbalizer), from the
  folder's ``finetune.json`` (what ``glmkit finetune`` writes) or ``glmkit serve --cloze-task FILE``. LOGITS are
  ``glmkit.finetune.cloze``'s scores of the verbalizer words at the blank (one-token logits at ``<sop>``, or span
  scores with ``multi_token``), LABEL the verbalizer label of the best.

The rows of all the requests the batcher gathered run as one padded batch; both layouts are padding-invariant, so
a row's answer is the one it gets alone. A text is refused (400) when it is empty or longer than the model's context
with the layout's own tokens; a text that fits the context but not the task's ``max_length`` is cut as
``glmkit evaluate`` cuts it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..config import ConfigError, read_json_object
from .served import ModelUnloadedError, OneShotModel, _strings
from .specs import CLASSIFY

Kind = Literal["sequence_classification", "cloze"]
HEAD = "GLMForSequenceClassification"
RUN_FILE = "finetune.json"  # glmkit finetune's description of a run, beside its models (glmkit.finetune.cli)


@dataclass(frozen=True)
class ClassifierDef:
    """What ``glm_classify`` serves: the kind, the task that lays a text out (a finetune config's ``task`` section:
    ``name`` and options, ``glmkit.finetune.registry``), the label names in logit order, the one field of the task's
    template that ``TEXT`` fills, and the folder holding the head's weights (sequence classification)."""

    kind: Kind
    task: dict[str, Any]
    labels: tuple[str, ...]
    field: str
    folder: str = ""

    def to_json(self) -> str:
        """The definition without its folder (an exported repository names its own checkpoint)."""
        d = dataclasses.asdict(self)
        d.pop("folder")
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str, folder: str | Path) -> ClassifierDef:
        d = json.loads(text)
        return cls(d["kind"], d["task"], tuple(d["labels"]), d["field"], str(folder))

    def build_task(self, context: int) -> Any:
        from ..finetune.registry import build_task

        options = {k: v for k, v in self.task.items() if k != "name"}
        return build_task(self.task["name"], options, context)

    def build(self, model: torch.nn.Module, tokenizer: Any) -> TextClassifier:
        """The batch executor over ``model`` (the served GLM, shared)."""
        if self.kind == "cloze":
            return ClozeClassifier(self, model, tokenizer)
        return HeadClassifier(self, model, tokenizer)


def _one_field(template: str, what: str) -> str:
    from ..finetune.template import template_fields

    fields = list(dict.fromkeys(template_fields(template)))
    if len(fields) != 1:
        raise ConfigError(
            f"{what}: {template!r} has the fields {fields}; glm_classify fills exactly one field with its TEXT input"
        )
    return fields[0]


def read_task_file(path: str | Path) -> dict[str, Any]:
    """A cloze task from a YAML or JSON file: a finetune config (its ``task`` section) or the section alone
    (``name`` defaults to ``cloze``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--cloze-task: {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"--cloze-task: {path} is not valid YAML or JSON: {e}") from e
    if isinstance(raw, dict) and isinstance(raw.get("task"), dict):
        raw = raw["task"]
    if not isinstance(raw, dict):
        raise ConfigError(f"--cloze-task: {path} holds no task (a mapping with pattern and verbalizer)")
    return {"name": "cloze", **raw}


def find_classifier(folder: str | Path, context: int, cloze_task: str | Path | None = None) -> ClassifierDef | None:
    """What ``glm_classify`` serves for the checkpoint ``folder`` (``None``: nothing), checked whole now so a bad
    definition stops ``glmkit serve`` / ``export-triton`` before they start. ``context``: the model's positions.

    A folder with a sequence-classification head is served as one; otherwise a cloze task from ``cloze_task`` (a
    file, ``read_task_file``) or, failing that, from a ``cloze`` task in the folder's ``finetune.json``."""
    folder = Path(folder)
    config = read_json_object(folder / "config.json") if (folder / "config.json").is_file() else {}
    run = read_json_object(folder / RUN_FILE).get("task") if (folder / RUN_FILE).is_file() else None
    run = run if isinstance(run, dict) else {}
    if HEAD in (config.get("architectures") or []):
        if cloze_task is not None:
            raise ConfigError(f"--cloze-task: {folder} is a sequence classifier ({HEAD}); it serves its own head")
        return _head_definition(folder, config, run, context)
    if cloze_task is not None:
        task = read_task_file(cloze_task)
        where = f"--cloze-task {cloze_task}"
    elif run.get("name") == "cloze":
        task, where = run, str(folder / RUN_FILE)
    else:
        return None
    if config.get("model_type") == "chatglm":
        raise ConfigError(f"{where}: cloze scoring lays a text out for GLM's blank infilling; {folder} is a ChatGLM")
    if task["name"] != "cloze":
        raise ConfigError(f"{where}: task {task['name']!r}; glm_classify serves a cloze task (pattern + verbalizer)")
    pattern = task.get("pattern")
    field = _one_field(pattern, f"{where}: pattern") if isinstance(pattern, str) else ""
    verbalizer = task.get("verbalizer") if isinstance(task.get("verbalizer"), dict) else {}
    definition = ClassifierDef("cloze", dict(task), tuple(str(k) for k in verbalizer), field, str(folder))
    _check(definition, context, where)
    return definition


def _head_definition(folder: Path, config: dict[str, Any], run: dict[str, Any], context: int) -> ClassifierDef:
    id2label = config.get("id2label") or {}
    try:
        labels = tuple(str(label) for _, label in sorted(id2label.items(), key=lambda kv: int(kv[0])))
    except (TypeError, ValueError, AttributeError):
        raise ConfigError(f"{folder / 'config.json'}: id2label must map class ids to names, got {id2label!r}") from None
    if len(labels) < 2:
        raise ConfigError(
            f"{folder / 'config.json'}: a head of {len(labels)} label(s) (a regression) has no label for glm_classify"
        )
    task: dict[str, Any] = {"name": "classification", "labels": list(labels), "template": "{text}"}
    if run.get("name") == "classification":  # as it was trained: the run's template and truncation
        task |= {k: run[k] for k in ("template", "max_length") if k in run}
    field = _one_field(task["template"], f"{folder / RUN_FILE}: template")
    definition = ClassifierDef("sequence_classification", task, labels, field, str(folder))
    _check(definition, context, str(folder))
    return definition


def _check(definition: ClassifierDef, context: int, where: str) -> None:
    try:
        definition.build_task(context)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from e


class TextClassifier:
    """The batch executor of ``glm_classify``: ``prepare`` lays one request's texts out (``ValueError`` naming the
    row), ``__call__`` scores the rows of several requests in one forward pass (the dynamic batcher's ``execute``)
    and returns each request's logits rows."""

    overhead: int  # the layout's Part-A tokens besides the text's

    def __init__(self, definition: ClassifierDef, model: torch.nn.Module, tokenizer: Any) -> None:
        self.definition, self.model, self.tok = definition, model, tokenizer
        self.labels = definition.labels
        self.context = model.config.n_positions
        self.task = definition.build_task(self.context)
        self.device = next(model.parameters()).device

    def prepare(self, texts: list[str]) -> list[Any]:
        items = []
        for i, text in enumerate(texts, start=1):
            n = len(self.tok.encode(text)) if text else 0
            if n == 0:
                raise ValueError(f"TEXT row {i}: empty")
            if n + self.overhead > self.context:
                raise ValueError(
                    f"TEXT row {i}: {n} tokens, with the layout's {self.overhead} more, exceed the model's context "
                    f"of {self.context} positions"
                )
            items.append(self.lay_out(text, f"TEXT row {i}"))
        return items

    def lay_out(self, text: str, where: str) -> Any:
        """The task's item for ``text`` (its layout and truncation), unchecked."""
        from ..finetune.data import Record

        return self.task.prepare(self.tok, [Record({self.definition.field: text}, 0, where)], train=False)[0]

    def logits(self, items: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, requests: list[list[Any]]) -> list[list[np.ndarray]]:
        rows = self.logits([it for req in requests for it in req]).float().cpu().numpy()
        out, at = [], 0
        for req in requests:
            out.append(list(rows[at : at + len(req)]))
            at += len(req)
        return out


class HeadClassifier(TextClassifier):
    """``GLMForSequenceClassification`` over the served GLM with the folder's head: the in-process model's forward."""

    overhead = 2  # [CLS] and <eos>

    def __init__(self, definition: ClassifierDef, model: torch.nn.Module, tokenizer: Any) -> None:
        from ..hf.heads import GLMForSequenceClassification

        super().__init__(definition, model, tokenizer)
        folder = Path(definition.folder)
        config = read_json_object(folder / "config.json")
        names = dict(enumerate(self.labels))
        wrapper = GLMForSequenceClassification.from_glm(
            model,
            tokenizer.special,
            num_labels=len(self.labels),
            id2label=names,
            label2id={v: k for k, v in names.items()},
            classifier_dropout=config.get("classifier_dropout"),
        )
        dtype = next(model.parameters()).dtype
        wrapper.classifier.load_state_dict(head_weights(folder))
        wrapper.classifier.to(dtype)  # the in-process model's dtype: hidden states meet the head in it
        self.wrapper = wrapper.eval()

    @torch.inference_mode()
    def logits(self, items: list[Any]) -> torch.Tensor:
        batch = self.task.collate(items)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        return self.wrapper(ids, mask).logits


class ClozeClassifier(TextClassifier):
    """A cloze task's verbalizer scores, by ``glmkit.finetune.cloze.predict`` (the scorer fine-tuning and
    ``glmkit evaluate`` use)."""

    def __init__(self, definition: ClassifierDef, model: torch.nn.Module, tokenizer: Any) -> None:
        super().__init__(definition, model, tokenizer)
        # [CLS], the pattern, [MASK] and <eos>: Part A without the text (the parts are encoded one by one)
        self.overhead = self.lay_out("", "TEXT").samples[0].sep

    @torch.inference_mode()
    def logits(self, items: list[Any]) -> torch.Tensor:
        from ..finetune.cloze import predict

        scores = [s for s, _, _ in predict(self.model, items, self.task.length_penalty, batch_size=len(items))]
        return torch.tensor(scores)


def head_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The ``classifier.*`` tensors of a checkpoint folder, named as in ``ClassificationHead``."""
    from safetensors import safe_open

    from ..checkpoint import find_weights, load_state_dict

    prefix = "classifier."
    files = find_weights(folder)
    if all(f.suffix == ".safetensors" for f in files):  # read the head alone, not the whole model again
        state = {}
        for f in files:
            with safe_open(str(f), "pt") as s:
                state |= {k: s.get_tensor(k) for k in s.keys() if k.startswith(prefix)}
    else:
        state = {k: v for k, v in load_state_dict(folder).items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{folder}: config.json names {HEAD}, but the weights hold no classifier.* head")
    return {k[len(prefix) :]: v for k, v in state.items()}


class ClassifierModel(OneShotModel):
    """``glm_classify`` as the HTTP front end and the Triton backend see it: the texts of a request are laid out
    on the event loop (bad rows are a 400 before anything is queued) and go through the dynamic batcher together."""

    KINDS = {CLASSIFY: "logits"}  # OneShotModel's kind; the rows here are the executor's, not ScoreRows

    def __init__(self, spec: Any, definition: ClassifierDef, tokenizer: Any, stats: Any = None) -> None:
        super().__init__(spec, None, tokenizer, stats=stats)
        self.definition = definition

    def rows(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        if self.scorer is None:
            raise ModelUnloadedError(self.spec.name)
        return self.scorer.prepare(_strings("TEXT", inputs["TEXT"]))

    def outputs(self, results: list[np.ndarray]) -> dict[str, np.ndarray]:
        logits = np.stack(results).astype(np.float32)
        labels = [[self.definition.labels[int(i)].encode("utf-8")] for i in logits.argmax(-1)]
        return {"LOGITS": logits, "LABEL": np.array(labels, dtype=np.object_)}
