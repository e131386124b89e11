"""The one parser of a SIZE on the command line and in config files: ``4096``, ``512K``,
``20G``, ``1.5GiB`` (binary units K, M, G, T, P; ``KiB``, ``KB`` and ``K`` alike).

Pure; raises ``ValueError`` with a one-line message that callers wrap in their own
package's error (``fused.cacheconf``); ``size_arg`` is the argparse ``type`` of every
SIZE option (a bad one is a usage error: exit 2, one line).
"""

from __future__ import annotations

import argparse
import re

__all__ = ["SIZE_HINT", "parse_size", "size_arg"]

SIZE_HINT = "say 4096, 512K, 20G or 1.5GiB"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a SIZE; ``ValueError("bad size ...")`` if it does not parse."""
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"bad size {text!r} ({SIZE_HINT})")
    number, unit = m.groups()
    mult = _UNITS[unit.lower()]
    value = float(number) * mult if "." in number else int(number) * mult
    if value != int(value) or value > 1 << 62:
        raise ValueError(f"bad size {text!r} ({SIZE_HINT})")
    return int(value)


def size_arg(text: str) -> int:
    """``parse_size`` as an argparse ``type``."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
