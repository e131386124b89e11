"""How the runtime drives runc: find it, and the few commands it needs.

The binary is ``$RAFS_RUNC`` if set, else ``runc`` on PATH (Debian's package).
Every call uses a private state root (``paths.runc_root()``), so containers
of rafs never mix with other users of runc on the host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from typing import Any

from .errors import RuncMissingError, RunError
from .paths import runc_root

__all__ = ["Runc"]

log = logging.getLogger(__name__)


class Runc:
    def __init__(self) -> None:
        name = os.environ.get("RAFS_RUNC", "runc")
        path = shutil.which(name)
        if path is None:
            raise RuncMissingError(f"{name} is not installed or not executable (install the "
                                   "Debian package runc, or point RAFS_RUNC at an OCI runtime)")
        self.path = path
        self.root = str(runc_root())

    def argv(self, *args: str) -> list[str]:
        return [self.path, "--root", self.root, *args]

    def run_argv(self, bundle: str, container_id: str) -> list[str]:
        return self.argv("run", "--bundle", bundle, container_id)

    def _call(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(self.argv(*args), capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RunError(f"runc {args[0]} timed out") from None

    def may_know(self, container_id: str) -> bool:
        """False when runc surely has no state of the container: runc keeps it in
        ``ROOT/ID/``, which ``runc run`` removes as the container exits. Cheaper than
        ``state`` (no process), so the common end of a run costs no runc call."""
        return os.path.lexists(os.path.join(self.root, container_id))

    def state(self, container_id: str) -> dict[str, Any] | None:
        """runc's state of the container, None if runc does not know it."""
        res = self._call("state", container_id)
        if res.returncode != 0:
            return None
        try:
            value = json.loads(res.stdout)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def kill(self, container_id: str, signal: str = "KILL") -> bool:
        res = self._call("kill", container_id, signal)
        if res.returncode != 0:
            log.debug("runc kill %s %s: %s", container_id, signal, res.stderr.strip())
        return res.returncode == 0

    def delete(self, container_id: str) -> None:
        res = self._call("delete", "--force", container_id)
        if res.returncode != 0 and self.state(container_id) is not None:
            raise RunError(f"runc delete {container_id}: {res.stderr.strip()}")
