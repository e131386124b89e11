"""What every command's ``--json`` prints, in one format.

``print_json`` writes one JSON document to stdout: indented by two, keys
sorted, a newline at the end; paths and dataclasses become strings and
objects. ``add_json_flag`` gives a command its ``--json`` option. ``rafs
inspect``, ``check``, ``convert``, ``optimize``, ``ps`` and ``image ls`` use
them; so should every new command with machine-readable output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

__all__ = ["add_json_flag", "print_json", "to_json"]


def _default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, bytes):
        return os.fsdecode(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def to_json(value: Any) -> str:
    """``value`` as the JSON text ``print_json`` writes (without the newline)."""
    return json.dumps(value, indent=2, sort_keys=True, default=_default)


def print_json(value: Any) -> None:
    """Write ``value`` to stdout as JSON."""
    sys.stdout.write(to_json(value) + "\n")


def add_json_flag(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """The ``--json`` option (``args.json``)."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")
