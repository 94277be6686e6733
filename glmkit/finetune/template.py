"""Text templates of task configs: ``"{premise} Question: {hypothesis}"`` fills a row's fields into text, and a cloze
pattern adds its one blank, ``[MASK]``, turning into the parts a ``ClozeTask`` pattern returns."""

from __future__ import annotations

import string
from typing import Any

from .tasks import BLANK, Part, shortenable

BLANK_TEXT = "[MASK]"


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of ``template``; a malformed template or a format spec is a ``ValueError``."""
    if not isinstance(template, str):
        raise ValueError(f"template: expected a string, got {type(template).__name__}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template: {template!r} is malformed ({e})") from e
    names = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name or spec or conv:
            raise ValueError(f"template: {template!r}: write fields as {{name}}, without positions or formats")
        names.append(name)
    return names


def _field(row: dict, name: str) -> str:
    value = row[name]  # a missing field: KeyError, named with the row's line by the caller
    if value is None:
        raise KeyError(name)
    if not isinstance(value, (str, int, float)):
        raise TypeError(f"field {name!r} must be text, got {type(value).__name__}")
    return str(value)


def fill_template(template: str, row: dict) -> str:
    return "".join(lit + (_field(row, name) if name is not None else "") for lit, name, _, _ in _parse(template))


def _parse(template: str):
    template_fields(template)
    return string.Formatter().parse(template)


def check_pattern(pattern: str) -> None:
    """A cloze pattern: a template holding ``[MASK]`` exactly once, outside its fields."""
    template_fields(pattern)
    count = sum(lit.count(BLANK_TEXT) for lit, *_ in string.Formatter().parse(pattern))
    if count != 1:
        raise ValueError(f"pattern: {pattern!r} must hold the blank {BLANK_TEXT} exactly once, found {count}")


def pattern_parts(pattern: str, row: dict[str, Any]) -> list[Part]:
    """The parts of ``pattern`` for ``row``: its literal text, the row's fields as shortenable text (cut first when
    the example does not fit), and ``BLANK`` for ``[MASK]``."""
    parts: list[Part] = []
    for lit, name, _, _ in _parse(pattern):
        before, sep, after = lit.partition(BLANK_TEXT)
        parts += [before] if before else []
        if sep:
            parts += [BLANK] + ([after] if after else [])
        if name is not None:
            parts.append(shortenable(_field(row, name)))
    return parts
