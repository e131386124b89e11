"""``python -m fused.worker``: the daemon, started by a supervisor on a connection it mounted.

Takes the daemon's own arguments (``--config-fd``, ``--ready-fd``, see
``fused.daemon``) plus what the supervisor passes (``fused.takeover.Attachment``)::

    --session-fd N      pipe holding the replayed FUSE_INIT (becomes the device)
    --device-fd M       the /dev/fuse device of the connection
    --first             the mount's first worker (kernel mode: it mounts EROFS)
    --control-socket P  this worker's private control socket
    --fuse-dev MAJ:MIN  the connection's device number (read-ahead tuning)
    --standby           the INIT comes later, when the supervisor needs this worker

Stopping: SIGTERM ends the main loop after the requests in progress are
answered, and the worker exits without unmounting anything (the mounts are the
supervisor's).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from . import takeover

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused.worker", add_help=False)
    parser.add_argument("--session-fd", type=int, required=True)
    parser.add_argument("--device-fd", type=int, required=True)
    parser.add_argument("--first", action="store_true")
    parser.add_argument("--control-socket", required=True)
    parser.add_argument("--fuse-dev")
    parser.add_argument("--standby", action="store_true")
    args, rest = parser.parse_known_args(argv)
    with contextlib.suppress(OSError):  # the supervisor lowered its own; a worker goes first
        Path("/proc/self/oom_score_adj").write_text("0\n")
    takeover.attach(takeover.Attachment(args.session_fd, args.device_fd, args.first,
                                        args.control_socket, args.fuse_dev, args.standby))
    from .daemon import main as daemon_main

    return daemon_main(rest)


if __name__ == "__main__":
    sys.exit(main())
