"""The gRPC face of the snapshotter: containerd's ``Snapshots`` service on a unix socket.

Owns the translation between protobuf messages (stubs generated into
``snapshotter.api`` by ``make protos``) and ``snapshotter.snapshots``, and the
one place that maps errors to gRPC status codes: a ``SnapshotterError``
carries its code (NotFound, AlreadyExists, FailedPrecondition,
InvalidArgument), any other ``RafsError`` is INTERNAL with its
one-line message, anything unexpected is INTERNAL and logged with its
traceback. containerd's proxy client turns the codes back into ``errdefs``
errors, which is how the unpacker learns that a remote layer "already exists".

``claim`` makes this process the only snapshotter of its root and its socket
address for its whole life (flocks on ``ROOT/snapshotter.lock`` and
``ADDRESS.lock``, which the kernel drops when the process dies): a second
``rafs snapshotter`` on the same root or address is refused while the first
lives, and something else answering on the address is never replaced. A socket
file left by a dead snapshotter is replaced; on exit the socket is removed
only if it is still the one this process bound. ``serve`` runs the server
until SIGTERM or SIGINT.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from rafs.errors import RafsError

from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .api.containerd.types import mount_pb2
from .errors import SnapshotterError
from .snapshots import Mount, Snapshotter
from .store import Snapshot

__all__ = ["Claim", "SnapshotsService", "claim", "serve", "start_server"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_LIST_BATCH = 100


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options))
            for m in mounts]


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def _info(snap: Snapshot) -> pb.Info:
    return pb.Info(name=snap.key, parent=snap.parent, kind=int(snap.kind),
                   created_at=_timestamp(snap.created_ns), updated_at=_timestamp(snap.updated_ns),
                   labels=snap.labels)


def _rpc(fn: Callable[..., T]) -> Callable[..., T]:
    """Run one call; turn its error into the status code containerd expects."""

    @functools.wraps(fn)
    def call(self: SnapshotsService, request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(self, request, context)
        except SnapshotterError as e:
            log.debug("%s: %s", fn.__name__, e)
            context.abort(getattr(grpc.StatusCode, e.grpc_code), str(e))
        except RafsError as e:
            log.warning("%s failed: %s", fn.__name__, e)
            context.abort(grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")  # context.abort raises

    return call


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: Snapshotter) -> None:
        self.sn = snapshotter

    @_rpc
    def Prepare(self, request: pb.PrepareSnapshotRequest, context: Any) -> Any:
        log.debug("Prepare key=%s parent=%s labels=%s", request.key, request.parent,
                  dict(request.labels))
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def View(self, request: pb.ViewSnapshotRequest, context: Any) -> Any:
        log.debug("View key=%s parent=%s", request.key, request.parent)
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_rpc
    def Mounts(self, request: pb.MountsRequest, context: Any) -> Any:
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(request.key)))

    @_rpc
    def Commit(self, request: pb.CommitSnapshotRequest, context: Any) -> Any:
        log.debug("Commit key=%s name=%s", request.key, request.name)
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_rpc
    def Remove(self, request: pb.RemoveSnapshotRequest, context: Any) -> Any:
        log.debug("Remove key=%s", request.key)
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_rpc
    def Stat(self, request: pb.StatSnapshotRequest, context: Any) -> Any:
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(request.key)))

    @_rpc
    def Update(self, request: pb.UpdateSnapshotRequest, context: Any) -> Any:
        snap = self.sn.update(request.info.name, dict(request.info.labels),
                              list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=_info(snap))

    @_rpc
    def List(self, request: pb.ListSnapshotsRequest, context: Any) -> Any:
        snaps = self.sn.walk(list(request.filters))

        def batches() -> Iterator[pb.ListSnapshotsResponse]:
            for i in range(0, len(snaps), _LIST_BATCH):
                yield pb.ListSnapshotsResponse(info=[_info(s) for s in snaps[i:i + _LIST_BATCH]])

        return batches()

    @_rpc
    def Usage(self, request: pb.UsageRequest, context: Any) -> Any:
        size, inodes = self.sn.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_rpc
    def Cleanup(self, request: pb.CleanupRequest, context: Any) -> Any:
        self.sn.cleanup()
        return empty_pb2.Empty()


class Claim:
    """Exclusive use of a root and a socket address, held until ``release``."""

    def __init__(self, root: Path, address: Path, fds: list[int]) -> None:
        self.root, self.address = root, address
        self._fds = fds
        self._bound: tuple[int, int] | None = None

    def bound(self) -> None:
        """Remember the socket file this process created (to remove only that one)."""
        st = os.stat(self.address)
        self._bound = (st.st_dev, st.st_ino)

    def release(self) -> None:
        if self._bound is not None:
            try:
                st = os.stat(self.address)
            except FileNotFoundError:
                pass
            else:
                if (st.st_dev, st.st_ino) == self._bound:
                    self.address.unlink()
                else:
                    log.warning("%s is not the socket this snapshotter created; leaving it",
                                self.address)
            self._bound = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _lock(path: Path, what: str, error: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise SnapshotterError(f"{error}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SnapshotterError(f"another rafs snapshotter (pid {holder}) uses {what}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _answers(address: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(5)
        try:
            s.connect(str(address))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return True  # something is there that we cannot judge: do not trample it
    return True


def claim(root: str | Path, address: str | Path) -> Claim:
    """Make this process the snapshotter of ``root`` on ``address``, or SnapshotterError."""
    root, address = Path(root), Path(address)
    fds: list[int] = []
    try:
        try:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotterError(f"cannot use root {root}: {e.strerror}") from None
        fds.append(_lock(root / "snapshotter.lock", f"root {root}", f"cannot use root {root}"))
        try:
            address.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SnapshotterError(f"cannot listen on {address}: {e.strerror}") from None
        fds.append(_lock(address.with_name(address.name + ".lock"), f"address {address}",
                         f"cannot listen on {address}"))
        if address.exists() or address.is_symlink():
            if _answers(address):
                raise SnapshotterError(f"cannot listen on {address}: something else "
                                       "answers there")
            log.info("removing the stale socket %s", address)
            address.unlink()
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Claim(root, address, fds)


def start_server(snapshotter: Snapshotter, address: str | Path, workers: int = 8) -> grpc.Server:
    """Listen on the unix socket ``address``, which must not exist (see ``claim``).

    gRPC binds a private name next to it, which is then linked into place: gRPC
    removes the path it bound when it stops, and must never remove ``address``,
    which by then may be someone else's."""
    path = Path(address)
    private = path.with_name(f".{path.name}.{os.getpid()}")
    private.unlink(missing_ok=True)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshots"))
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    try:
        port = server.add_insecure_port(f"unix:{private}")
    except RuntimeError:  # newer grpcio raises where older ones returned 0
        port = 0
    if not port:
        raise SnapshotterError(f"cannot listen on {path}")
    server.start()
    try:
        os.chmod(private, 0o600)
        os.link(private, path)  # never replaces what is there
    except OSError as e:
        server.stop(grace=None)
        raise SnapshotterError(f"cannot listen on {path}: {e.strerror}") from None
    finally:
        private.unlink(missing_ok=True)
    return server


def serve(snapshotter: Snapshotter, claimed: Claim) -> None:
    """Serve until SIGTERM or SIGINT, then stop (calls in flight get 10 s)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server = start_server(snapshotter, claimed.address)
        claimed.bound()
    except BaseException:
        snapshotter.close()
        raise
    log.info("rafs snapshotter serving on %s (root %s)", claimed.address, snapshotter.root)
    try:
        stop.wait()
    finally:
        server.stop(grace=10).wait()
        claimed.release()
        snapshotter.close()
        log.info("rafs snapshotter stopped")
