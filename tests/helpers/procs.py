"""Running commands from tests: a timeout that kills the whole process group, and
the check that a failing CLI reports one clean line.

Owns: ``run`` (never hangs a test: on timeout the process group is killed and the
output so far is in the error) and ``assert_clean_error`` (a user error is one
``rafs: error: ...`` line on stderr, no traceback, non-zero exit).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CommandTimeout", "assert_clean_error", "run"]


class CommandTimeout(AssertionError):
    """A command outlived its timeout; it and its children were killed."""


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing text stdout/stderr, in its own process group.

    ``env`` entries are added to the current environment. On timeout the whole
    group gets SIGKILL and ``CommandTimeout`` carries the output so far. With
    ``check``, a non-zero exit raises ``AssertionError`` showing stderr.
    """
    argv = [os.fspath(c) for c in cmd]
    full_env = {**os.environ, **env} if env is not None else None
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        raise CommandTimeout(
            f"{' '.join(argv)} timed out after {timeout}s\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{out}\nstderr:\n{err}"
        )
    return result


def assert_clean_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert ``result`` failed with exactly one ``rafs: error: ...`` line; return it."""
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode != 0, f"expected a failure, got success\n{shown}"
    assert "Traceback" not in result.stderr, f"traceback on stderr\n{shown}"
    message = result.stderr.strip()
    assert message, f"no error message on stderr\n{shown}"
    assert "\n" not in message, f"error message is more than one line\n{shown}"
    assert message.startswith("rafs: error:"), f"error does not start 'rafs: error:'\n{shown}"
    return message


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
