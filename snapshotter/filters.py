"""containerd's filter expressions, the subset the snapshots List call needs.

A filter is selectors joined by ``,`` (all must match); a list of filters
matches when any filter does. A selector is a field path, optionally followed
by an operator and a value: ``name==sha256:...``, ``kind!=view``,
``labels."containerd.io/gc.root"``, ``labels.app~=^web``. Path components and
values may be double-quoted (with ``\\"`` and ``\\\\`` escapes). Fields of a
snapshot: ``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``)
and ``labels.KEY``. A selector without an operator tests presence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidArgumentError

__all__ = ["Selector", "matcher", "parse"]

_OPS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    path: tuple[str, ...]
    op: str | None = None
    value: str = ""

    def matches(self, fields: Callable[[tuple[str, ...]], str | None]) -> bool:
        actual = fields(self.path)
        if self.op is None:
            return actual is not None
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        return actual is not None and re.search(self.value, actual) is not None


def _quoted(text: str, i: int) -> tuple[str, int]:
    out = []
    i += 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        out.append(c)
        i += 1
    raise InvalidArgumentError(f"filter {text!r}: unterminated quote")


def _selector(text: str, i: int, whole: str) -> tuple[Selector, int]:
    path: list[str] = []
    while True:
        if i < len(text) and text[i] == '"':
            part, i = _quoted(text, i)
        else:
            m = re.compile(r"[A-Za-z0-9_/\-]+").match(text, i)
            if not m:
                raise InvalidArgumentError(f"filter {whole!r}: expected a field name at {i}")
            part, i = m.group(), m.end()
        path.append(part)
        if i < len(text) and text[i] == ".":
            i += 1
            continue
        break
    op = next((o for o in _OPS if text.startswith(o, i)), None)
    if op is None:
        return Selector(tuple(path)), i
    i += 2
    if i < len(text) and text[i] == '"':
        value, i = _quoted(text, i)
    else:
        end = text.find(",", i)
        end = len(text) if end < 0 else end
        value, i = text[i:end], end
    if op == "~=":
        try:
            re.compile(value)
        except re.error as e:
            raise InvalidArgumentError(f"filter {whole!r}: bad regular expression: {e}") from None
    return Selector(tuple(path), op, value), i


def parse(text: str) -> list[Selector]:
    """The selectors of one filter (all of which must match)."""
    out: list[Selector] = []
    i = 0
    stripped = text.strip()
    while i < len(stripped):
        sel, i = _selector(stripped, i, text)
        out.append(sel)
        if i < len(stripped):
            if stripped[i] != ",":
                raise InvalidArgumentError(f"filter {text!r}: expected ',' at {i}")
            i += 1
    if not out:
        raise InvalidArgumentError("empty filter")
    return out


def matcher(
    filters: Sequence[str],
) -> Callable[[Callable[[tuple[str, ...]], str | None]], bool]:
    """A predicate over a field getter: any filter whose selectors all match."""
    parsed = [parse(f) for f in filters]

    def match(fields: Callable[[tuple[str, ...]], str | None]) -> bool:
        if not parsed:
            return True
        return any(all(s.matches(fields) for s in sels) for sels in parsed)

    return match


def snapshot_fields(
    name: str, parent: str, kind: str, labels: Mapping[str, str]
) -> Callable[[tuple[str, ...]], str | None]:
    """The field getter of one snapshot."""

    def get(path: tuple[str, ...]) -> str | None:
        if path == ("name",):
            return name
        if path == ("parent",):
            return parent
        if path == ("kind",):
            return kind
        if path[0] == "labels" and len(path) >= 2:
            return labels.get(".".join(path[1:]))
        return None

    return get
