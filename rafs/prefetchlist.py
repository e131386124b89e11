"""The prefetch list: what a start-up reads, in the order it first reads it.

Pure format code, no I/O. ``rafs trace`` writes it, ``rafs convert
--prefetch-list`` reads it; both ends use this module. An entry is a path in
the image, absolute, with an optional byte range of that file:

- ``/usr/bin/python3.11`` — the whole file (a directory: every file below it);
- ``OFFSET LENGTH /usr/lib/libc.so.6`` — ``LENGTH`` bytes of the file from
  ``OFFSET`` (decimal; the path is the rest of the line, so it may hold blanks).

One entry per line, in first-access order; blank lines and lines starting with
``#`` are ignored. Paths are absolute and have no ``..`` component (a relative
or escaping path is an error naming its line). Hand-written lists are usually
paths only; ``rafs trace --ranges`` prints ranges. ``rafs trace --json`` prints the same as one JSON
object, which ``parse`` also takes::

    {"chunk_size": 1048576, "truncated": false,
     "paths": ["/usr/bin/python3.11", ...],
     "ranges": [{"path": "/usr/bin/python3.11", "offset": 0, "length": 1048576}, ...]}

A JSON list with ``ranges`` means those ranges; without, its ``paths``. Paths
are bytes: JSON carries them as strings with ``os.fsdecode``'s escapes for
non-UTF-8 names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = ["Entry", "PrefetchListError", "format_paths", "format_ranges", "parse"]


class PrefetchListError(ValueError):
    """A prefetch list that does not parse; the message names the line."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry: a path, and a byte range of it (``length`` None: all of it)."""

    path: bytes
    offset: int = 0
    length: int | None = None

    @property
    def whole(self) -> bool:
        return self.length is None


def _check_path(path: bytes, where: str) -> bytes:
    """``path`` if it is an absolute path inside the image, else PrefetchListError."""
    shown = os.fsdecode(path)
    if not path.startswith(b"/"):
        raise PrefetchListError(f"{where}: {shown!r} is not an absolute path (a prefetch list "
                                "names paths in the image: /usr/bin/python3)")
    if b"/../" in path + b"/" or b"\0" in path:
        raise PrefetchListError(f"{where}: {shown!r}: '..' has no place in a prefetch list "
                                "path")
    return path


def parse(data: bytes, what: str = "prefetch list") -> list[Entry]:
    """The entries of a prefetch list in any of its forms (text or ``--json``); a bad
    entry is a PrefetchListError naming ``what`` and the line (``what:LINE: ...``)."""
    if data.lstrip()[:1] == b"{":
        return _parse_json(data, what)
    entries = []
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        where = f"{what}:{number}"
        if line[:1].isdigit():
            fields = line.split(None, 2)
            if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit():
                raise PrefetchListError(f"{where}: expected a path or 'OFFSET LENGTH PATH', "
                                        f"got {os.fsdecode(line[:80])!r}")
            entries.append(Entry(_check_path(fields[2], where), int(fields[0]),
                                 int(fields[1])))
        else:
            entries.append(Entry(_check_path(line, where)))
    return entries


def _parse_json(data: bytes, what: str) -> list[Entry]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise PrefetchListError(f"{what}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PrefetchListError(f"{what}: a JSON prefetch list is an object")
    ranges, paths = doc.get("ranges"), doc.get("paths")
    entries = []
    if ranges is not None:
        if not isinstance(ranges, list):
            raise PrefetchListError(f"{what}: 'ranges' is not a list")
        for n, r in enumerate(ranges):
            if not (isinstance(r, dict) and isinstance(r.get("path"), str)
                    and _natural(r.get("offset")) and _natural(r.get("length"))):
                raise PrefetchListError(f"{what}: ranges[{n}] is not "
                                        "{path: str, offset: int, length: int}")
            path = _check_path(os.fsencode(r["path"]), f"{what}: ranges[{n}]")
            entries.append(Entry(path, r["offset"], r["length"]))
        return entries
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise PrefetchListError(f"{what}: a JSON prefetch list needs 'ranges' or 'paths' "
                                "(a list of strings)")
    return [Entry(_check_path(os.fsencode(p), f"{what}: paths[{n}]"))
            for n, p in enumerate(paths)]


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def format_paths(paths: list[bytes]) -> bytes:
    """The path-list form: one path per line."""
    return b"".join(p + b"\n" for p in paths)


def format_ranges(ranges: list[tuple[bytes, int, int]]) -> bytes:
    """The range form: ``OFFSET LENGTH PATH`` per line."""
    return b"".join(b"%d %d %s\n" % (offset, length, path) for path, offset, length in ranges)
