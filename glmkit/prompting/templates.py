"""Prompt templates as data: YAML files of format strings that lay out an instruction, knowledge snippets with their
citations, few-shot exemplars, a question and the slot where the model's answer starts (Med-PaLM's few-shot and
chain-of-thought layouts, its ensemble-refinement stage-2 prompt, and open questions with a risk note), in English and
Chinese; and the reading of an answer back out of a model's text.

A template file holds these keys (every value but ``name``/``language``/``kind``/``cot`` a format string):

- ``instruction``: the first line; ``knowledge_header``, ``snippet`` (``{id}``, ``{text}``, ``{citation}``) and
  ``snippet_uncited`` (``{id}``, ``{text}``) lay out the snippets, where ``knowledge_position`` says
  (``prefix``: after the instruction, as Med-PaLM's design does; ``before_question``: just above the test question);
- ``context`` (shown only for a question with a context), ``question``, ``option`` (``{letter}``, ``{text}``) joined
  by ``option_sep``;
- ``answer`` holding ``{answer}`` once: an exemplar shows it filled (a letter, or an open question's reference), and
  the test question's prompt stops where ``{answer}`` stands (``...Answer: (``); with ``cot: true``, ``explanation``
  holding ``{explanation}`` comes first and the prompt stops before it (``...Explanation:``);
- ``abstain`` (``letter``, ``text``, ``instruction``, ``phrases``, ``enabled``): the extra option the model may pick,
  e.g. ``(X) I am not sure``, and the line that allows it; ``refinement`` (``instruction``, ``header``, ``item`` with
  ``{n}`` and ``{reasoning}``): Med-PaLM 2's ensemble refinement, the stage-1 reasonings shown before a new answer;
- ``defaults``: values of fields the question may lack (e.g. ``domain``); ``line_sep`` and ``block_sep``.

Other fields (``{subject}``, ``{qtype}``, a key of the question's ``meta``) come from the question; one the question
lacks and ``defaults`` does not give is a ``TemplateError`` naming the field, the template and the question.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .types import ABSTAIN, Exemplar, Question, Snippet

BUILTIN_DIR = "templates"
KINDS = ("multiple_choice", "open")
POSITIONS = ("prefix", "before_question")


class TemplateError(ValueError):
    """A template that cannot be loaded, or cannot be filled for a question (the field, template and question named)."""


@dataclass(frozen=True)
class AbstainRule:
    """The option a model may pick to decline (``(X) I am not sure``), the instruction that allows it, and the phrases
    that read as declining in free text."""

    letter: str = "X"
    text: str = "I am not sure"
    instruction: str = ""
    phrases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refinement:
    """Ensemble refinement's stage 2 (Med-PaLM 2): the stage-1 reasonings listed under ``header``, one ``item`` each."""

    instruction: str
    header: str
    item: str


@dataclass(frozen=True)
class Template:
    name: str
    language: str  # "en" | "zh"
    kind: str  # "multiple_choice" | "open"
    cot: bool
    abstain: AbstainRule | None  # the rule in force (None: off); ``abstain_rule`` is the one the file defines
    instruction: str = ""
    knowledge_header: str = ""
    snippet: str = "[{id}] {text} ({citation})"
    snippet_uncited: str = "[{id}] {text}"
    knowledge_position: str = "prefix"
    context: str = "Context: {context}"
    question: str = "Question: {question}"
    option: str = "({letter}) {text}"
    option_sep: str = " "
    explanation: str = "Explanation: {explanation}"
    answer: str = "Answer: ({answer})"
    refinement: Refinement | None = None
    abstain_rule: AbstainRule | None = None
    defaults: Mapping[str, str] = field(default_factory=dict)
    line_sep: str = "\n"
    block_sep: str = "\n"
    path: str = ""

    # ---- rendering

    def render(self, q: Question, exemplars: Sequence[Exemplar] = (), snippets: Sequence[Snippet] = ()) -> str:
        """The whole prompt for ``q``, ending exactly where the model's answer starts."""
        return self._prompt(q, exemplars, snippets, extra=None)

    def render_refinement(
        self,
        q: Question,
        reasonings: Sequence[str],
        exemplars: Sequence[Exemplar] = (),
        snippets: Sequence[Snippet] = (),
    ) -> str:
        """Ensemble refinement's stage-2 prompt: the stage-1 ``reasonings`` listed after the question, then the same
        answer start as ``render``."""
        if self.refinement is None:
            raise TemplateError(f"template {self.name!r} has no refinement section")
        if not reasonings:
            raise TemplateError(f"template {self.name!r}: refinement needs at least one stage-1 reasoning")
        items = [
            self._fill(self.refinement.item, {"n": str(i), "reasoning": r}, "refinement.item", q)
            for i, r in enumerate(reasonings, 1)
        ]
        return self._prompt(q, exemplars, snippets, extra=self.line_sep.join([self.refinement.header, *items]))

    def continuation_for(self, letter: str) -> str:
        """What log-likelihood scoring appends to a direct (non-CoT) prompt for ``letter``, e.g. ``"B)"``."""
        return letter + self._answer_parts[1]

    @property
    def answer_cue(self) -> str:
        """The text before the answer proper, e.g. ``"Answer: ("``: a CoT prompt continued by its explanation plus this
        cue is scored like a direct one."""
        return self._answer_parts[0]

    @property
    def question_marker(self) -> str:
        """The literal start of a question block (``"Question:"``): a generation that reaches it has moved on."""
        return self.question.split("{", 1)[0].strip()

    @property
    def _answer_parts(self) -> tuple[str, str]:
        before, _, after = self.answer.partition("{answer}")
        return before, after

    def _prompt(
        self, q: Question, exemplars: Sequence[Exemplar], snippets: Sequence[Snippet], extra: str | None
    ) -> str:
        self._check_kind(q)
        head = [self._fill(self.instruction, {}, "instruction", q)] if self.instruction else []
        if extra is not None:
            head.append(self._fill(self.refinement.instruction, {}, "refinement.instruction", q))
        if self.abstain is not None and self.abstain.instruction:
            head.append(self.abstain.instruction)
        knowledge = self._knowledge(q, snippets)
        blocks = [self.line_sep.join(head)] if head else []
        if knowledge and self.knowledge_position == "prefix":
            blocks.append(knowledge)
        blocks += [self._exemplar(ex) for ex in exemplars]
        last = [knowledge] if knowledge and self.knowledge_position == "before_question" else []
        last.append(self._question_block(q))
        if extra is not None:
            last.append(extra)
        cue = self._fill_prefix(self.explanation, "{explanation}") if self.cot else self._answer_parts[0]
        last.append(cue.rstrip(" ") if cue.endswith(" ") else cue)
        blocks.append(self.line_sep.join(last))
        return self.block_sep.join(b for b in blocks if b)

    def _knowledge(self, q: Question, snippets: Sequence[Snippet]) -> str:
        if not snippets:
            return ""
        lines = [self._fill(self.knowledge_header, {}, "knowledge_header", q)] if self.knowledge_header else []
        for s in snippets:
            fmt, key = (self.snippet, "snippet") if s.citation else (self.snippet_uncited, "snippet_uncited")
            lines.append(self._fill(fmt, {"id": s.id, "text": s.text, "citation": s.citation}, key, q))
        return self.line_sep.join(lines)

    def _question_block(self, q: Question) -> str:
        lines = [self._fill(self.context, {}, "context", q)] if q.context else []
        lines.append(self._fill(self.question, {}, "question", q))
        if self.kind == "multiple_choice":
            options = dict(q.options)
            if self.abstain is not None:
                options[self.abstain.letter] = self.abstain.text
            lines.append(
                self.option_sep.join(
                    self._fill(self.option, {"letter": k, "text": v}, "option", q) for k, v in options.items()
                )
            )
        return self.line_sep.join(lines)

    def _exemplar(self, ex: Exemplar) -> str:
        q = ex.question
        self._check_kind(q)
        if self.kind == "open":
            answer = q.reference
        elif q.answer == ABSTAIN and self.abstain is not None:
            answer = self.abstain.letter
        else:
            answer = q.answer if q.answer in q.options else None
        if not answer:
            need = "a reference answer" if self.kind == "open" else "an answer among its options"
            raise TemplateError(f"template {self.name!r}: exemplar {q.id!r} lacks {need}")
        lines = [self._question_block(q)]
        if self.cot:
            if not ex.explanation:
                raise TemplateError(f"template {self.name!r}: field {{explanation}} is missing from exemplar {q.id!r}")
            lines.append(self._fill(self.explanation, {"explanation": ex.explanation}, "explanation", q))
        lines.append(self._fill(self.answer, {"answer": answer}, "answer", q))
        return self.line_sep.join(lines)

    def _check_kind(self, q: Question) -> None:
        if self.kind == "multiple_choice" and not q.options:
            raise TemplateError(f"template {self.name!r} is multiple choice; question {q.id!r} has no options")

    def _fill_prefix(self, fmt: str, slot: str) -> str:
        return fmt.split(slot, 1)[0]

    def _fill(self, fmt: str, given: Mapping[str, str], section: str, q: Question) -> str:
        out = []
        for literal, name, _, _ in string.Formatter().parse(fmt):
            out.append(literal)
            if name is None:
                continue
            value = given[name] if name in given else _question_field(q, name)
            if value is None:
                value = self.defaults.get(name)
            if value is None:
                raise TemplateError(
                    f"template {self.name!r}: field {{{name}}} in its {section} is missing from question {q.id!r}"
                )
            out.append(_clean(str(value)))
        return "".join(out)

    # ---- reading answers

    def extract(self, text: str, q: Question) -> tuple[str | None, list[str]]:
        """The answer in a model's ``text`` (a letter of ``q``, ``ABSTAIN``, or None when it cannot be read; an open
        question's answer text) and the snippet ids it cites (``[2]`` -> ``"2"``). Only the text before the model moves
        on to a new question counts; a letter inside a word never counts."""
        cited = list(dict.fromkeys(m.group(1) for m in _CITED.finditer(text)))
        body = self._own_part(text)
        phrases = self._phrases()
        if self.kind == "open":
            answer = body.strip()
            first = answer.split("\n", 1)[0].lower()
            if any(p in first for p in phrases):
                return ABSTAIN, cited
            return (answer or None), cited
        letters = list(q.options) + ([self.abstain.letter] if self.abstain is not None else [])
        letter = _read_letter(body, letters, direct=not self.cot)
        if letter is None and any(p in body.lower() for p in phrases):
            return ABSTAIN, cited
        if letter is None:
            letter = _read_option_line(body, letters) or _match_option_text(body, q.options, self.language)
        if letter is not None and self.abstain is not None and letter == self.abstain.letter:
            return ABSTAIN, cited
        return letter, cited

    def _own_part(self, text: str) -> str:
        marker = self.question_marker
        if marker:
            cut = re.search(r"(?:^|\n)[ \t]*" + re.escape(marker), text[1:])
            if cut:
                text = text[: cut.start() + 1]
        return text

    def _phrases(self) -> tuple[str, ...]:
        rule = self.abstain or self.abstain_rule
        return tuple(p.lower() for p in rule.phrases) if rule else ()

    def with_abstain(self, enabled: bool = True) -> Template:
        """This template with its file's abstain rule switched on or off."""
        if enabled and self.abstain_rule is None:
            raise TemplateError(f"template {self.name!r} defines no abstain rule")
        return replace(self, abstain=self.abstain_rule if enabled else None)

    def with_defaults(self, **values: str) -> Template:
        """This template with more field defaults, e.g. ``domain="the King James Bible"``."""
        return replace(self, defaults={**self.defaults, **values})


def check_citations(cited: Sequence[str], snippets: Sequence[Snippet]) -> bool:
    """Whether every cited id is the id of a snippet given in the prompt (no citations: True)."""
    given = {s.id for s in snippets}
    return all(c in given for c in cited)


# ---- answer patterns

_CITED = re.compile(r"[\[【]\s*([A-Za-z0-9][\w.:\-]*)\s*[\]】]")
_NOT_WORD = r"(?![A-Za-z0-9])"
# "Answer: (C)", "Final answer: C", "The answer is (C).", "**Answer:** (C)", "答案：C", "答案是 (C)", "答案为C"
_KEYWORD = re.compile(
    r"(?:(?i:answer)(?:\s+(?i:is)|\s*[:：])|答案\s*(?:是|为|為|应为|應為)?\s*[:：]?)"
    r"\s*\**\s*[(（]?\s*([A-Z])\s*[)）]?" + _NOT_WORD
)
_DIRECT = re.compile(r"\s*([A-Z])\s*(?:[)）]|$|\n)")  # a direct prompt ends in "(": "C)" or a lone "C"
_OPTION_LINE = re.compile(r"^\s*[(（]([A-Z])[)）]|^\s*([A-Z])\s*[.．)）](?:\s|$)", re.M)
_OPTION_MARK = re.compile(r"[(（][A-Z][)）]")


def _read_letter(body: str, letters: Sequence[str], direct: bool) -> str | None:
    if direct:
        m = _DIRECT.match(body)
        if m and m.group(1) in letters:
            return m.group(1)
    found = [m.group(1) for m in _KEYWORD.finditer(body) if m.group(1) in letters]
    return found[-1] if found else None


def _read_option_line(body: str, letters: Sequence[str]) -> str | None:
    """A line that is one option, "(C)" or "C. text", and not an echo of several options."""
    found = []
    for m in _OPTION_LINE.finditer(body):
        letter = m.group(1) or m.group(2)
        rest = body[m.end() : body.find("\n", m.end()) if "\n" in body[m.end() :] else len(body)]
        if letter in letters and not _OPTION_MARK.search(rest):
            found.append(letter)
    return found[-1] if found else None


def _match_option_text(body: str, options: Mapping[str, str], language: str) -> str | None:
    """The one option whose text the answer contains (as whole words in English); None when none or several do."""
    low = _clean(body).lower()
    hits = []
    for letter, text in options.items():
        t = _clean(text).lower()
        if not t:
            continue
        if language == "zh" or not re.match(r"\w", t):
            found = t in low
        else:
            found = re.search(r"(?<![\w])" + re.escape(t) + r"(?![\w])", low) is not None
        if found:
            hits.append(letter)
    return hits[0] if len(hits) == 1 else None


# ---- loading


def _question_field(q: Question, name: str) -> Any:
    if name in ("question", "context", "subject", "qtype", "id", "source", "reference"):
        value = getattr(q, name)
        return value if value not in ("", None) else None
    value = q.meta.get(name)
    return value if isinstance(value, (str, int, float)) and value != "" else None


def _clean(text: str) -> str:
    """Field text without stray whitespace: runs of spaces as one, line breaks kept single."""
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r" *\n[\s]*", "\n", text).strip()


_FORMATS = {
    "instruction": None,
    "knowledge_header": None,
    "snippet": {"id", "text", "citation"},
    "snippet_uncited": {"id", "text"},
    "context": None,
    "question": None,
    "option": {"letter", "text"},
    "explanation": None,
    "answer": None,
}
_SCALARS = {"name", "language", "kind", "cot", "knowledge_position", "option_sep", "line_sep", "block_sep"}


def builtin_templates() -> list[str]:
    """The names of the templates glmkit ships (``mc-en``, ``mc-cot-zh``, ``open-en``, ...)."""
    folder = resources.files(__package__) / BUILTIN_DIR
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_template(name_or_path: str | Path, *, abstain: bool | None = None) -> Template:
    """A built-in template by name or a YAML file by path; ``abstain`` switches its abstain rule on or off (None: as the
    file's ``abstain.enabled`` says)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise TemplateError(f"template file {path} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    else:
        names = builtin_templates()
        if str(name_or_path) not in names:
            raise TemplateError(f"no template {str(name_or_path)!r}: give a YAML path or one of {', '.join(names)}")
        res = resources.files(__package__) / BUILTIN_DIR / f"{name_or_path}.yaml"
        text, where = res.read_text(encoding="utf-8"), f"built-in {name_or_path}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TemplateError(f"template {where}: not valid YAML ({e})") from e
    return _from_mapping(raw, where, abstain)


def _from_mapping(raw: Any, where: str, abstain: bool | None) -> Template:
    if not isinstance(raw, dict):
        raise TemplateError(f"template {where}: expected a mapping of keys, got {type(raw).__name__}")
    known = {f.name for f in fields(Template)} - {"abstain_rule", "path"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TemplateError(f"template {where}: unknown keys {unknown}")
    for key in ("name", "language", "kind"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise TemplateError(f"template {where}: {key!r} must be a non-empty string")
    kind = raw["kind"]
    if kind not in KINDS:
        raise TemplateError(f"template {where}: kind must be one of {KINDS}, got {kind!r}")
    if raw.get("knowledge_position", "prefix") not in POSITIONS:
        raise TemplateError(f"template {where}: knowledge_position must be one of {POSITIONS}")
    values: dict[str, Any] = {k: v for k, v in raw.items() if k in _SCALARS}
    values["cot"] = bool(raw.get("cot", False))
    for key, allowed in _FORMATS.items():
        if key in raw:
            values[key] = _format(raw[key], f"{where}: {key}", allowed)
    answer = values.get("answer", Template.answer)
    if answer.count("{answer}") != 1:
        raise TemplateError(f"template {where}: answer must hold {{answer}} exactly once, got {answer!r}")
    if values["cot"] and "{explanation}" not in values.get("explanation", Template.explanation):
        raise TemplateError(f"template {where}: a cot template's explanation must hold {{explanation}}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or not all(isinstance(v, (str, int, float)) for v in defaults.values()):
        raise TemplateError(f"template {where}: defaults must map field names to text")
    values["defaults"] = {str(k): str(v) for k, v in defaults.items()}
    values["refinement"] = _refinement(raw.get("refinement"), where)
    rule, enabled = _abstain(raw.get("abstain"), where)
    if kind == "multiple_choice" and rule is not None and not rule.letter:
        raise TemplateError(f"template {where}: a multiple-choice abstain rule needs its option letter")
    on = enabled if abstain is None else abstain
    if on and rule is None:
        raise TemplateError(f"template {where}: abstain asked for, but the template defines no abstain rule")
    return Template(abstain=rule if on else None, abstain_rule=rule, path=where, **values)


def _format(value: Any, where: str, allowed: set[str] | None) -> str:
    if not isinstance(value, str):
        raise TemplateError(f"template {where}: expected a format string, got {type(value).__name__}")
    try:
        names = [n for _, n, spec, conv in string.Formatter().parse(value) if n is not None and not (spec or conv)]
        bad = [n for _, n, spec, conv in string.Formatter().parse(value) if n is not None and (spec or conv or not n)]
    except ValueError as e:
        raise TemplateError(f"template {where}: malformed format string {value!r} ({e})") from e
    if bad:
        raise TemplateError(f"template {where}: write fields as {{name}}, without positions or formats")
    if allowed is not None and not set(names) <= allowed:
        raise TemplateError(f"template {where}: fields {sorted(set(names) - allowed)} not among {sorted(allowed)}")
    return value


def _refinement(raw: Any, where: str) -> Refinement | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"instruction", "header", "item"}:
        raise TemplateError(f"template {where}: refinement needs exactly instruction, header and item")
    item = _format(raw["item"], f"{where}: refinement.item", {"n", "reasoning"})
    if "{reasoning}" not in item:
        raise TemplateError(f"template {where}: refinement.item must hold {{reasoning}}")
    return Refinement(_format(raw["instruction"], f"{where}: refinement.instruction", None), raw["header"], item)


def _abstain(raw: Any, where: str) -> tuple[AbstainRule | None, bool]:
    if raw is None:
        return None, False
    keys = {"letter", "text", "instruction", "phrases", "enabled"}
    if not isinstance(raw, dict) or not set(raw) <= keys:
        raise TemplateError(f"template {where}: abstain takes the keys {sorted(keys)}")
    letter = str(raw.get("letter", "X"))
    if not re.fullmatch(r"[A-Z]?", letter):
        raise TemplateError(f"template {where}: abstain.letter must be one capital letter (or empty), got {letter!r}")
    phrases = raw.get("phrases", [])
    if not isinstance(phrases, list) or not all(isinstance(p, str) and p for p in phrases):
        raise TemplateError(f"template {where}: abstain.phrases must be a list of strings")
    rule = AbstainRule(letter, str(raw.get("text", "")), str(raw.get("instruction", "")), tuple(phrases))
    return rule, bool(raw.get("enabled", False))
