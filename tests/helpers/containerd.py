"""The containerd test fixture's parts: a private containerd and the rafs snapshotter.

The implementation lives in ``bench.containerd_env`` (the containerd benchmark
uses it too); see there for what is started and how it is always stopped.
"""

from bench.containerd_env import (
    RAFS_FSTYPES,
    Containerd,
    CriSettings,
    SnapshotterProcess,
    containerd_daemon,
    mounts_under,
    snapshotter_process,
    unmount_under,
)

__all__ = [
    "RAFS_FSTYPES",
    "Containerd",
    "CriSettings",
    "SnapshotterProcess",
    "containerd_daemon",
    "mounts_under",
    "snapshotter_process",
    "unmount_under",
]
