"""How the ``rafs`` process meets its user: parsing, logging, errors, exit status.

This module owns the promises every command keeps without doing anything:

- ``Parser``: an ``ArgumentParser`` whose complaints are ``UsageError``s (one
  line, exit 2; 125 for ``rafs run``/``optimize``) instead of argparse's usage
  block; every subparser inherits it.
- ``add_verbosity``: ``-v``/``-vv``/``-vvv`` accepted after the subcommand
  too (``rafs inspect -v IMG``), on every subcommand at every depth.
- ``setup_logging``: default: warnings and errors only, as
  ``rafs: warning: ...`` lines, and not the retries of a request (the outcome
  is what counts: a command that fails says so in its one error line); ``-v``
  progress and retries (timestamped log lines);
  ``-vv`` debug and one line per HTTP request (httpx); ``-vvv`` httpcore's
  connection internals too.
- ``run_command``: runs the command and turns what it raises into one line on
  stderr and the exit status of ``runtime.errors.exit_status``: a
  ``RafsError`` is ``rafs: error: MESSAGE``; an ``OSError`` that escaped
  (a path we may not use) is ``rafs: error: PATH: REASON``; a closed stdout
  (``rafs ... | head -1``), also when found by the last flush, ends the
  process quietly with 141, as ``cat``'s on a closed pipe does; SIGINT is
  130. Anything else is a bug: one ``internal error`` line, and with ``-v``
  its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import select
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from rafs.errors import RafsError, UsageError
from rafs.retry import RETRY_RECORD

from .errors import EXIT_CLOSED_STDOUT, exit_status

__all__ = ["Parser", "add_verbosity", "error", "one_line", "run_command", "setup_logging",
           "verbosity"]

_VERBOSE_AFTER = "verbose_after_command"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is a ``UsageError`` (one line, our exit status)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)", self.prog)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(dict.fromkeys(action.choices.values()))  # aliases: once
    return out


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-v`` on ``parser`` and, counted separately, on every subcommand below it."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v progress, -vv debug and each HTTP request, "
                        "-vvv HTTP connection internals")
    todo = _subparsers(parser)
    while todo:
        sub = todo.pop()
        with contextlib.suppress(argparse.ArgumentError):  # a command's own -v wins
            sub.add_argument("-v", "--verbose", dest=_VERBOSE_AFTER, action="count",
                             default=argparse.SUPPRESS, help="more logging (as `rafs -v`)")
        todo.extend(_subparsers(sub))


def verbosity(args: argparse.Namespace) -> int:
    """How many ``-v`` were given, before and after the subcommand."""
    return int(getattr(args, "verbose", 0) or 0) + int(getattr(args, _VERBOSE_AFTER, 0) or 0)


def _not_a_retry(record: logging.LogRecord) -> bool:
    return not hasattr(record, RETRY_RECORD)


class _UserFormatter(logging.Formatter):
    """``rafs: warning: MESSAGE``: what a user sees at the default verbosity."""

    def format(self, record: logging.LogRecord) -> str:
        message = one_line(record.getMessage())
        return f"rafs: {record.levelname.lower()}: {message}"


def setup_logging(verbose: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if verbose == 0:
        handler.setFormatter(_UserFormatter())
        handler.addFilter(_not_a_retry)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG)
    # httpx logs one INFO line per request; httpcore 20+ DEBUG lines of connection work.
    logging.getLogger("httpx").setLevel(logging.INFO if verbose >= 2 else logging.WARNING)
    for noisy in ("httpcore", "hpack"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 3 else logging.WARNING)


def one_line(message: str) -> str:
    """``message`` on one line (a message that quotes a multi-line tail keeps its text)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return " | ".join(lines)


def _stdout_closed() -> bool:
    """Whether nobody reads our stdout any more (a pipe whose reader has gone)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


def _drop_stdout() -> None:
    """Point fd 1 at /dev/null so that the interpreter's last flush cannot fail too."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _describe_os_error(e: OSError) -> str:
    reason = e.strerror or str(e)
    where = e.filename if e.filename is not None else None
    if where is None:
        return reason
    where2 = f" -> {e.filename2}" if e.filename2 is not None else ""
    return f"{os.fsdecode(where)}{where2}: {reason}"


def error(message: str) -> None:
    """Print the one error line."""
    print(f"rafs: error: {one_line(message)}", file=sys.stderr, flush=True)


def run_command(func: Callable[[], int | None], command: str | None, verbose: int) -> int:
    """Run a command; its exit status, every failure reported as one line."""
    try:
        status = int(func() or 0)
        sys.stdout.flush()  # a late write to a closed pipe is found here, not at exit
        return status
    except BrokenPipeError as e:
        if _stdout_closed():
            _drop_stdout()
            return EXIT_CLOSED_STDOUT
        return _failed(e, command, verbose)
    except KeyboardInterrupt as e:
        print("rafs: interrupted", file=sys.stderr)
        return exit_status(e, command)
    except Exception as e:
        return _failed(e, command, verbose)


def _failed(e: Exception, command: str | None, verbose: int) -> int:
    if _stdout_closed():  # e.g. an error met while printing to a closed pipe
        _drop_stdout()
    if isinstance(e, RafsError):
        if verbose >= 2:
            traceback.print_exc()
        error(str(e))
    elif isinstance(e, OSError):
        if verbose:
            traceback.print_exc()
        error(_describe_os_error(e))
    else:
        if verbose:
            traceback.print_exc()
        error(f"internal error: {type(e).__name__}: {e} (a bug in rafs; "
              f"`rafs -v {command or ''} ...` shows where)")
    return exit_status(e, command)
