"""Every FUSE request gets an answer, in bounded time, whatever lies below the adapter.

Recorded scenarios first, in process (the real bootstrap reader, cache,
fetcher and adapters; a bootstrap the validator would refuse is loaded with
``validate=False`` to show the layers below it hold on their own):

- the issue's hang: a chunk record that breaks when read ("chunk N record is
  inconsistent") next to good ones made the first reader EIO and left claims
  nobody finished, so the kernel's retry waited forever in D state;
- a probe that fails after earlier chunks of the same read were claimed;
- a backend raising something that is not a RafsError, one that trickles
  bytes forever (only ``fetch_deadline`` ends it), one stuck in a worker
  thread that cancellation cannot reach (only ``answer_bound`` ends it), a
  claim nobody owns, a prefetch stopped half way;
- every adapter handler turning any exception into an errno, and the two
  adapters answering the same way.

Then mounted, in both modes: a registry that stops answering gives EIO and a
clean unmount, and the recorded image is refused by ``rafs mount`` and
``rafs check`` with one line naming the offset and the rule.
"""

from __future__ import annotations

import errno
import inspect
import os
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
import trio

from fused.adapter import BaseOperations
from fused.backend import Backend, LocalBackend
from fused.blobfs import BlobFs
from fused.blobops import BlobOperations
from fused.errors import ChunkError
from fused.fetcher import _Pending
from fused.fuseops import Operations
from fused.stats import Stats
from fused.vfs import Attr, StatFs
from rafs import section
from rafs.errors import FormatError, RafsError
from rafs.model import Node
from rafs.retry import RetryPolicy
from tests.fused_support import WrittenImage, open_stack, write_rafs_image
from tests.helpers.faultproxy import Fault, FaultProxy, Request
from tests.helpers.images import ImageParts
from tests.helpers.mounts import mounted, rafs_cmd, rafs_mounts
from tests.helpers.ocibuild import build_oci_image, file_entry
from tests.helpers.procs import assert_clean_error, run

CS = 64 << 10
# fetch_deadline 0.7 s: two attempts of 0.3 s, one backoff of at most 0.1 s
FAST = {"timeout": 0.3, "retries": 1, "retry": RetryPolicy(cap=0.1, retry_after_cap=0.1)}


@pytest.fixture
def image(tmp_path) -> WrittenImage:
    parts = ImageParts(Node.directory(), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    files = {b"a": os.urandom(3 * CS + 100), b"b": os.urandom(2 * CS)}  # chunks 0-3, 4-5
    for name, data in files.items():
        parts.root.children[name] = parts.file(data)
    img = write_rafs_image(parts, tmp_path / "img")
    img.files = files  # type: ignore[attr-defined]
    return img


def with_record(img: WrittenImage, index: int, field: int, fmt: str, value: int) -> WrittenImage:
    """``img`` with one field of chunk record ``index`` changed (the bootstrap only)."""
    boot = bytearray(img.bootstrap)
    hdr = section.Header.unpack(boot)
    struct.pack_into(fmt, boot, hdr.chunk_off + index * section.CHUNK_RECORD.size + field, value)
    return WrittenImage(img.ref, img.layout, bytes(boot), img.blob_digests)


async def read_all(s, name: bytes) -> bytes:  # type: ignore[no-untyped-def]
    attr = s.vfs.lookup(1, name)
    return bytes(await s.vfs.read(attr.ino, 0, attr.size))


# -- recorded scenarios ------------------------------------------------------------------


def test_a_broken_neighbour_record_fails_its_own_readers_only_and_never_hangs(image, tmp_path):
    bad = with_record(image, 5, 28, "<I", 1 << 30)  # uncompressed size > chunk size
    with pytest.raises(FormatError, match="chunk 5"):
        from rafs.bootstrap import Bootstrap

        Bootstrap.from_bytes(bad.bootstrap)  # the validator refuses it at load

    async def main() -> None:
        async with open_stack(bad, tmp_path / "cache", validate=False, amplify=True,
                              **FAST) as s:
            for _ in range(3):  # a reader, then the kernel's retries
                with trio.fail_after(30):
                    with pytest.raises(RafsError):
                        await read_all(s, b"b")
            with trio.fail_after(30):
                assert len(await read_all(s, b"a")) == 3 * CS + 100
            assert not s.fetcher._inflight

    trio.run(main)


def test_a_probe_failing_after_earlier_claims_releases_them(image, tmp_path):
    bad = with_record(image, 2, 0, "<I", 7)  # chunk 2 names blob 7 of 1

    async def main() -> None:
        async with open_stack(bad, tmp_path / "cache", validate=False, **FAST) as s:
            attr = s.vfs.lookup(1, b"a")
            for _ in range(3):
                with trio.fail_after(30), pytest.raises(RafsError):
                    await s.vfs.read(attr.ino, 0, 3 * CS)  # chunks 0, 1, then 2 breaks
                assert not s.fetcher._inflight
            with trio.fail_after(30):
                assert len(await s.vfs.read(attr.ino, 0, CS)) == CS  # chunk 0 alone is fine

    trio.run(main)


@dataclass
class Faulty(Backend):
    """A real local backend whose streams misbehave on demand (fault injection)."""

    inner: LocalBackend
    mode: str = "ok"  # ok | raise | trickle | stuck | slow | gated
    release: threading.Event | None = None
    delay: float = 0.0  # slow: seconds before the bytes
    gate: trio.Event | None = None  # gated: the bytes once it is set

    async def read(self, blob_digest: str, offset: int, length: int) -> bytes:
        return await self.inner.read(blob_digest, offset, length)

    async def stream(self, blob_digest: str, offset: int, length: int) -> AsyncIterator[bytes]:
        if self.mode == "raise":
            raise ValueError("a bug below the fetcher")
        if self.mode == "trickle":
            while True:  # one byte well within the idle timeout, forever
                await trio.sleep(0.05)
                yield b"\0"
        if self.mode == "stuck":  # a worker thread that cancellation cannot reach
            assert self.release is not None
            await trio.to_thread.run_sync(self.release.wait)
        if self.mode == "slow":
            await trio.sleep(self.delay)
        if self.mode == "gated":
            assert self.gate is not None
            await self.gate.wait()
        yield await self.inner.read(blob_digest, offset, length)


def test_an_unexpected_exception_below_the_fetcher_is_eio_and_the_daemon_stays(image,
                                                                               tmp_path):
    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "raise")
        async with open_stack(image, tmp_path / "cache", backend, **FAST) as s:
            with trio.fail_after(30), pytest.raises(ChunkError, match="internal error"):
                await read_all(s, b"a")
            assert s.stats.internal_errors == 1
            backend.mode = "ok"
            with trio.fail_after(30):
                assert len(await read_all(s, b"a")) == 3 * CS + 100  # still serving

    trio.run(main)


def test_a_fetch_that_never_completes_is_eio_within_the_fetch_deadline(image, tmp_path):
    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "trickle")
        async with open_stack(image, tmp_path / "cache", backend, **FAST) as s:
            assert s.fetcher.fetch_deadline == pytest.approx(0.3 * 2 + 0.1)
            with trio.fail_after(30), pytest.raises(ChunkError, match="within"):
                await read_all(s, b"a")
            assert s.stats.error_classes["deadline"] >= 1
            assert not s.fetcher._inflight

    trio.run(main)


def test_a_wait_nobody_can_end_is_answered_at_the_answer_bound(image, tmp_path, monkeypatch):
    monkeypatch.setattr("fused.fetcher.ANSWER_GRACE", 0.5)
    release = threading.Event()

    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "stuck", release)
        async with open_stack(image, tmp_path / "cache", backend, **FAST) as s:
            try:
                with trio.fail_after(30), pytest.raises(ChunkError, match="no answer"):
                    await read_all(s, b"a")
                assert s.stats.internal_errors == 1
            finally:
                release.set()  # let the worker thread go so the fetcher can end

    trio.run(main)


def test_a_read_whose_chunk_keeps_being_lost_shares_one_answer_bound(image, tmp_path,
                                                                     monkeypatch):
    """The read path fetches a chunk lost from the cache under the reader again, up to
    READ_ATTEMPTS times: the attempts share the request's deadline, they do not each
    get one."""
    monkeypatch.setattr("fused.fetcher.ANSWER_GRACE", 0.2)

    async def never(index: int) -> bool:
        return False

    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "slow", delay=0.6)
        async with open_stack(image, tmp_path / "cache", backend, timeout=1.0,
                              retries=0) as s:
            assert s.fetcher.answer_bound == pytest.approx(1.2)  # under two fetches
            # A cache that loses every chunk at once: each attempt fetches again.
            monkeypatch.setattr(s.cache, "read", lambda *_a: None)
            monkeypatch.setattr(s.cache, "is_ready", lambda _i: False)
            monkeypatch.setattr(s.cache, "probe", never)
            attr = s.vfs.lookup(1, b"a")
            with trio.fail_after(30), pytest.raises(ChunkError, match="no answer within"):
                await s.vfs.read(attr.ino, 0, CS)  # not "lost from the cache 4 times"
            assert len(s.backend.reads) <= 2
            assert s.stats.internal_errors == 1

    trio.run(main)


def test_a_retired_fetch_that_fails_later_leaves_the_next_fetch_alone(image, tmp_path,
                                                                      monkeypatch):
    """A fetch stuck past answer_bound has its claim retired and a reader starts a new
    one; when the stuck fetch finally fails it finishes only its own claim."""
    monkeypatch.setattr("fused.fetcher.ANSWER_GRACE", 0.5)
    release = threading.Event()

    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "stuck", release, gate=trio.Event())
        async with open_stack(image, tmp_path / "cache", backend, timeout=3.0,
                              retries=0) as s:
            attr = s.vfs.lookup(1, b"a")
            try:
                with trio.fail_after(30), pytest.raises(ChunkError, match="no answer"):
                    await s.vfs.read(attr.ino, 0, CS)  # chunk 0, retired at the bound
                backend.mode = "gated"
                got: list[bytes] = []

                async def second_reader() -> None:
                    got.append(bytes(await s.vfs.read(attr.ino, 0, CS)))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(second_reader)
                    with trio.fail_after(30):
                        while 0 not in s.fetcher._inflight:
                            await trio.sleep(0.01)
                    successor = s.fetcher._inflight[0]
                    release.set()  # the stuck fetch returns and fails (its deadline passed)
                    with trio.fail_after(30):
                        while not s.stats.error_classes["deadline"]:
                            await trio.sleep(0.01)
                    assert not successor.done.is_set()  # the old fetch left it alone
                    assert backend.gate is not None
                    backend.gate.set()
                assert got == [image.files[b"a"][:CS]]
            finally:
                release.set()

    trio.run(main)


def test_a_claim_without_an_owner_is_answered_and_retired(image, tmp_path, monkeypatch):
    monkeypatch.setattr("fused.fetcher.ANSWER_GRACE", 0.5)

    async def main() -> None:
        async with open_stack(image, tmp_path / "cache", **FAST) as s:
            s.fetcher._inflight[0] = _Pending()  # what the old leak left behind
            with trio.fail_after(30), pytest.raises(ChunkError, match="no answer"):
                await read_all(s, b"a")
            assert 0 not in s.fetcher._inflight
            with trio.fail_after(30):
                assert len(await read_all(s, b"a")) == 3 * CS + 100

    trio.run(main)


def test_a_prefetch_stopped_half_way_leaves_no_claims(image, tmp_path):
    async def main() -> None:
        backend = Faulty(LocalBackend(image.layout), "trickle")
        async with open_stack(image, tmp_path / "cache", backend, prefetch_merge=CS,
                              **FAST) as s:
            with trio.move_on_after(0.2):
                await s.fetcher.prefetch(range(6))
            assert not s.fetcher._inflight
            backend.mode = "ok"
            with trio.fail_after(30):
                assert len(await read_all(s, b"b")) == 2 * CS

    trio.run(main)


# -- the adapters ------------------------------------------------------------------------


class Exploding:
    """A filesystem model whose every method raises something no one expected."""

    def __init__(self) -> None:
        self.stats = Stats()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        def boom(*_a: object, **_k: object) -> None:
            raise RuntimeError(f"{name} exploded")

        return boom

    async def read(self, ino: int, offset: int, size: int) -> bytes:
        raise KeyError("read exploded")


HANDLERS = {
    "lookup": (1, b"x", None), "getattr": (1, None), "opendir": (1, None),
    "readdir": (1, 0, None), "statfs": (None,), "getxattr": (1, b"user.x", None),
    "listxattr": (1, None), "open": (1, os.O_RDONLY, None), "read": (1, 0, 10),
    "releasedir": (1,), "release": (1,), "flush": (1,), "fsync": (1, False),
}


@pytest.mark.parametrize("cls", [Operations, BlobOperations])
def test_every_handler_answers_an_unexpected_exception_with_eio(cls):
    model = Exploding()
    ops = cls(model)  # type: ignore[arg-type]
    called = 0

    async def main() -> None:
        nonlocal called
        for name, args in HANDLERS.items():
            try:
                await getattr(ops, name)(*args)
            except pyfuse3.FUSEError as e:
                assert e.errno == errno.EIO, name
                called += 1
        await ops.forget([(1, 1)])  # no reply to give: it must not raise at all
        if cls is Operations:
            with pytest.raises(pyfuse3.FUSEError):
                await ops.readlink(1, None)

    trio.run(main)
    assert called == sum(1 for n in HANDLERS if n not in ("releasedir", "release", "flush",
                                                          "fsync"))
    assert model.stats.internal_errors == called + (cls is Operations)  # + readlink
    assert model.stats.fuse_requests["read"] == 1


def test_every_handler_pyfuse3_calls_is_behind_the_boundary():
    for cls in (Operations, BlobOperations):
        for name, fn in inspect.getmembers(cls, inspect.iscoroutinefunction):
            if name.startswith("_") or getattr(pyfuse3.Operations, name, None) is fn:
                continue
            assert hasattr(fn, "__wrapped__"), f"{cls.__name__}.{name} is not wrapped"
        for name in ("write", "mkdir", "setattr", "create", "unlink"):
            assert getattr(cls, name) is getattr(BaseOperations, name)


class Fixed:
    stats = Stats()

    def getattr(self, ino: int) -> Attr:
        return Attr(ino, 0o20644, 1, 0, 0, os.makedev(1, 3), 0, 0, 4096, 0)

    def statfs(self) -> StatFs:
        return StatFs(4096, 4096, 10, 1, 2, 3, 4, 5, 255)


def test_both_adapters_answer_attributes_and_statfs_alike():
    async def main() -> tuple[list[object], list[object]]:
        answers = []
        for cls in (Operations, BlobOperations):
            ops = cls(Fixed())  # type: ignore[arg-type]
            e = await ops.getattr(1, None)
            s = await ops.statfs(None)
            answers.append([e.st_rdev, e.st_mode, s.f_bfree, s.f_bavail, s.f_files,
                            s.f_ffree, s.f_favail, s.f_namemax])
        return answers[0], answers[1]

    fuse, blob = trio.run(main)
    assert fuse == blob == [os.makedev(1, 3), 0o20644, 1, 2, 3, 4, 5, 255]


def test_open_answers_differ_only_in_caching():
    assert (Operations.keep_cache, Operations.direct_io) == (True, False)
    assert (BlobOperations.keep_cache, BlobOperations.direct_io) == (False, True)
    assert BlobFs  # the blob model is what BlobOperations serves


# -- mounted -----------------------------------------------------------------------------


def _range_get(req: Request) -> bool:
    return req.method == "GET" and "/blobs/" in req.path and req.range is not None


@pytest.fixture(scope="module")
def pushed(registry, tmp_path_factory) -> str:
    from converter.convert import ConvertOptions, convert

    src = tmp_path_factory.mktemp("src")
    build_oci_image(src, "v1", [[file_entry("data", os.urandom(300_000)),
                                 file_entry("small", b"small\n")]])
    ref = registry.ref("hostile/answers", "v1")
    convert(f"oci:{src}:v1", ref, ConvertOptions(progress=False, chunk_size=CS))
    return ref


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_a_registry_that_stops_answering_gives_eio_and_a_clean_unmount(mode, registry, pushed,
                                                                      tmp_path):
    host = pushed.removeprefix("docker://").partition("/")[0]
    with FaultProxy(registry.host) as proxy:
        ref = pushed.replace(host, proxy.host)
        mnt = tmp_path / "mnt"
        with mounted(ref, mnt, tmp_path / "cache", mode=mode,
                     extra_args=["--no-prefetch", "--fetch-timeout", "1", "--retries", "1"]):
            proxy.inject(Fault.stall(120), _range_get)
            started = time.monotonic()
            res = run(["cat", str(mnt / "data")], timeout=120)  # a hang fails the test here
            assert res.returncode != 0 and "Input/output error" in res.stderr
            assert time.monotonic() - started < 120
            proxy.clear()
        assert str(mnt) not in rafs_mounts()


@pytest.fixture
def recorded(image, tmp_path) -> Iterator[str]:
    """The issue's case on a real layout: chunk 1's record is inconsistent, re-sealed."""
    import json

    from tests.helpers.mutate import Layout

    bad = with_record(image, 1, 28, "<I", 1 << 30)
    layout = Layout(image.layout, tmp_path / "recorded")
    manifest = json.loads((image.layout / "blobs" / "sha256" / json.loads(
        (image.layout / "index.json").read_text())["manifests"][0]["digest"][7:]).read_text())
    yield layout.reseal_bootstrap(manifest, bad.bootstrap)


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["fuse", "kernel"])
def test_the_recorded_image_is_refused_with_one_line_naming_offset_and_rule(mode, recorded,
                                                                            tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run(rafs_cmd("mount", recorded, mnt, "--cache-dir", tmp_path / "cache",
                       "--mode", mode), timeout=120)
    message = assert_clean_error(res)
    assert "at offset 0x" in message and "chunk 1: uncompressed size" in message
    assert str(mnt) not in rafs_mounts()
    assert "chunk 1" in assert_clean_error(run(rafs_cmd("check", recorded), timeout=120))


def test_rafs_check_accepts_the_unmutated_image(image):
    res = run(rafs_cmd("check", image.ref), timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(image.layout).is_dir()
