"""The fuzzer: hostile images through every loader, with an answer and the right bytes.

Owns: the seed image (``Seed``: a small converted image with every entry kind,
multi-chunk files, holes, a multi-block directory, two blobs and a prefetch
list; and what every chunk's sha256 vouches for), the case generator
(``make_case``: a mutated bootstrap, manifest, source config or source tar,
re-sealed with ``tests.helpers.mutate``), the two runners and the tally.

Runners:

- ``run_inprocess`` (the bulk): ``rafs check`` (``rafs.image.check``), then
  the daemon's own loading path (``fused.daemon.load_bootstrap`` through a
  ``LocalBackend``, ``Bootstrap.open(stamp=True)``), then every file read
  through the fuse-mode adapter (``fused.fuseops.Operations`` over ``Vfs``)
  and every blob file through the kernel-mode adapter
  (``fused.blobops.BlobOperations`` over ``BlobFs``), with the real cache and
  fetcher, in one ``trio.run``, no kernel. ``readdir_reply`` is the one thing
  stood in for (pyfuse3 needs a kernel request to reply to).
- ``run_mounted``: ``rafs mount`` (the real CLI, daemon and kernel; fuse or
  kernel mode) and ``tests.helpers.treeread`` in a subprocess with a timeout;
  a reader still waiting then is a hang: the FUSE connection is aborted
  through ``/sys/fs/fuse/connections/N/abort`` and everything is torn down.
  After each case no mount and no daemon may be left.

What counts (``Outcome``): *refused* (the image was refused with one line),
*read* (mounted and every entry read; reads may fail with EIO), *hang* (an
operation outlived its bound), *traceback* (anything but a one-line
``RafsError`` from a command, a log record with a traceback, or
``internal_errors`` counted by the daemon), *wrong bytes* (a byte served
that is not the byte the bootstrap's sha256 vouches for: every chunk of a
file or blob address space must equal the seed's chunk with that sha256,
holes and gaps must be zeros, and a chunk whose sha256 no seed chunk has
can only be answered with an error).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from converter.convert import ConvertOptions, convert
from fused.backend import LocalBackend
from fused.blobfs import FIRST_BLOB_INO, BlobFs
from fused.blobops import BlobOperations
from fused.cache import ChunkCache
from fused.daemon import load_bootstrap
from fused.fetcher import Fetcher
from fused.fuseops import Operations
from fused.stats import Stats
from fused.vfs import ROOT_INO, Vfs
from rafs.bootstrap import Bootstrap
from rafs.codec import decode_chunk
from rafs.errors import RafsError
from rafs.image import check, open_local_image
from rafs.oci import OCILayout
from rafs.retry import RetryPolicy
from tests.helpers import mutate
from tests.helpers.mounts import REPO_ROOT, rafs_cmd
from tests.helpers.ocibuild import Entry, build_oci_image, dir_entry, file_entry, symlink_entry

__all__ = ["TARGETS", "Case", "Outcome", "Seed", "Tally", "make_case", "run_inprocess",
           "run_mounted"]

log = logging.getLogger(__name__)

TARGETS = ("bootstrap", "manifest", "config", "tar")
CHUNK_SIZE = 16 << 10
# fetch_deadline 2.2 s: two attempts of 1 s, one backoff of at most 0.2 s
FETCH = {"timeout": 1.0, "retries": 1, "retry": RetryPolicy(cap=0.2, retry_after_cap=0.2)}
OP_LIMIT = 30.0  # an in-process operation taking longer is a hang (answer_bound is 7.2 s)
READ_LIMIT = 90.0  # a mounted tree read taking longer is a hang
MOUNT_ARGS = ("--fetch-timeout", "1", "--retries", "1")


# -- the seed ------------------------------------------------------------------------


def _text(n: int, salt: int) -> bytes:
    words = [b"rafs", b"chunk", b"blob", b"lazy", b"erofs", b"%d" % salt]
    out, i = bytearray(), salt
    while len(out) < n:
        out += words[i % len(words)] + b" "
        i = i * 1103515245 + 12345 & 0x7FFFFFFF
    return bytes(out[:n])


def seed_layers() -> list[list[Entry]]:
    rnd = random.Random(7)
    wide = [file_entry(f"wide/entry-{i:04d}-" + "n" * (i % 40), _text(i % 300, i))
            for i in range(260)]
    first: list[Entry] = [
        dir_entry("etc"), file_entry("etc/hostname", b"rafs\n"),
        file_entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mode=0o600),
        dir_entry("usr"), dir_entry("usr/bin"), dir_entry("usr/lib"),
        file_entry("usr/bin/tool", rnd.randbytes(3 * CHUNK_SIZE + 123), mode=0o755),
        file_entry("usr/lib/lib.so", _text(5 * CHUNK_SIZE, 3), mode=0o755),
        Entry("usr/lib/lib.so.1", "hardlink", linkname="usr/lib/lib.so"),
        symlink_entry("usr/lib/lib.so.link", "lib.so.1"),
        symlink_entry("dangling", "/nowhere/" + "x" * 200),
        file_entry("sparse", bytes(2 * CHUNK_SIZE) + b"end" + bytes(CHUNK_SIZE)),
        file_entry("exact", rnd.randbytes(CHUNK_SIZE)),
        file_entry("empty", b""), file_entry("one", b"1"),
        file_entry("xattrs", b"x", xattrs={"user.a": b"1", "user.long": b"v" * 300}),
        Entry("dev-null", "chardev", mode=0o666, devmajor=1, devminor=3),
        Entry("fifo", "fifo", mode=0o600),
        dir_entry("deep"), dir_entry("deep/a"), dir_entry("deep/a/b"),
        file_entry("deep/a/b/leaf", _text(40_000, 9)),
        dir_entry("wide"), *wide,
    ]
    second: list[Entry] = [
        file_entry("etc/hostname", b"second\n"),
        file_entry("layer2", rnd.randbytes(2 * CHUNK_SIZE + 5)),
        file_entry("copy-of-tool", b""),  # replaced below by the same bytes: dedup
        file_entry("text", _text(3 * CHUNK_SIZE, 11)),
    ]
    second[2] = file_entry("copy-of-tool", first[6].data, mode=0o755)
    return [first, second]


@dataclass
class Seed:
    """The unmutated images every case starts from, and what their chunks hold."""

    work: Path
    source: Path  # OCI layout of the source image (converter input), tag "src"
    rafs: Path  # OCI layout of the converted RAFS image, tag "v1"
    bootstrap: bytes
    manifest: dict[str, object]
    manifest_raw: bytes
    source_manifest: dict[str, object]
    source_config: dict[str, object]
    source_tars: list[bytes]
    fields: list[mutate.Field]
    chunks: dict[bytes, bytes]  # sha256 -> uncompressed bytes, every chunk of the seed
    digests: list[str]

    @classmethod
    def build(cls, work: Path) -> Seed:
        work.mkdir(parents=True, exist_ok=True)
        source, rafs = work / "source", work / "rafs"
        layers = seed_layers()
        build_oci_image(source, "src", layers, compression="gzip")
        convert(f"oci:{source}:src", f"oci:{rafs}:v1", ConvertOptions(
            chunk_size=CHUNK_SIZE, progress=False, workers=0,
            prefetch=[b"/usr/bin/tool", b"/etc", b"/deep/a/b/leaf"]))
        img = open_local_image(f"oci:{rafs}:v1")
        layout = OCILayout(rafs)
        desc = layout.resolve("v1")
        manifest_raw = layout.read_blob(desc.digest)
        src_layout = OCILayout(source)
        src_manifest_raw = src_layout.read_blob(src_layout.resolve("src").digest)
        src_manifest = json.loads(src_manifest_raw)
        src_config = json.loads(src_layout.read_blob(src_manifest["config"]["digest"]))
        import gzip

        tars = [gzip.decompress(src_layout.read_blob(d["digest"]))
                for d in src_manifest["layers"]]
        chunks = _chunk_contents(img.bootstrap, layout)
        digests = [d.digest for d in desc.layers] + [src_manifest["config"]["digest"]]
        return cls(work, source, rafs, img.bootstrap, json.loads(manifest_raw), manifest_raw,
                   src_manifest, src_config, tars, mutate.bootstrap_fields(img.bootstrap),
                   chunks, digests)


def _chunk_contents(bootstrap: bytes, layout: OCILayout) -> dict[bytes, bytes]:
    boot = Bootstrap.from_bytes(bootstrap)
    out = {}
    for blob in boot.blobs:
        data = layout.blob_path(blob.digest).read_bytes()
        for i in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
            c = boot.chunk(i)
            out[c.sha256] = decode_chunk(c, data[c.compressed_offset:
                                                 c.compressed_offset + c.compressed_size])
    boot.close()
    return out


# -- cases ---------------------------------------------------------------------------


@dataclass
class Case:
    number: int
    target: str
    description: str
    ref: str  # the image to check and mount (a RAFS image)
    source_ref: str | None = None  # converter input: convert this to ``ref`` first
    layout: mutate.Layout | None = None


def make_case(seed: Seed, number: int, rng: random.Random, root: Path,
              target: str | None = None) -> Case:
    """Case ``number``: a mutated, re-sealed image in its own layout under ``root``."""
    target = target or rng.choices(TARGETS, [80, 8, 6, 6])[0]
    layout = mutate.Layout(seed.rafs if target in ("bootstrap", "manifest") else seed.source,
                           root / f"case{number}")
    if target == "bootstrap":
        data, what = mutate.mutate_bootstrap(seed.bootstrap, rng, seed.fields)
        ref = layout.reseal_bootstrap(seed.manifest, data)
        return Case(number, target, what, ref, layout=layout)
    if target == "manifest":
        data, what = mutate.mutate_manifest(seed.manifest_raw, rng, seed.digests)
        return Case(number, target, what, layout.reseal_manifest(data), layout=layout)
    if target == "config":
        raw = json.dumps(seed.source_config).encode()
        data, what = mutate.mutate_config(raw, rng, seed.digests)
        src = layout.reseal_source(seed.source_manifest, data)
    else:
        k = rng.randrange(len(seed.source_tars))
        tar, what = mutate.mutate_tar(seed.source_tars[k], rng)
        what = f"layer {k}: {what}"
        src = layout.reseal_source(seed.source_manifest, seed.source_config, k, tar)
    out = root / f"case{number}-rafs"
    return Case(number, target, what, f"oci:{out}:v1", source_ref=src, layout=layout)


def cleanup_case(case: Case, root: Path) -> None:
    shutil.rmtree(root / f"case{case.number}", ignore_errors=True)
    shutil.rmtree(root / f"case{case.number}-rafs", ignore_errors=True)


# -- outcomes ------------------------------------------------------------------------


@dataclass
class Outcome:
    case: int
    target: str
    mode: str  # "inprocess" (fuse and kernel models), "fuse", "kernel"
    description: str
    refused: str | None = None  # the one-line error, when the image was refused
    check_error: str | None = None  # rafs check's one line, when it refused
    read: bool = False
    hang: list[str] = field(default_factory=list)
    traceback: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    eio: int = 0
    entries: int = 0
    validated: bool = False
    fsck_refused: str | None = None

    def problems(self) -> list[str]:
        return ([f"hang: {h}" for h in self.hang] + [f"traceback: {t}" for t in self.traceback]
                + [f"wrong bytes: {w}" for w in self.wrong])


@dataclass
class Tally:
    """The fuzzer's table, per mode."""

    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[Outcome] = field(default_factory=list)

    def add(self, o: Outcome) -> None:
        row = self.rows.setdefault(o.mode, dict.fromkeys(
            ("tried", "refused", "read", "hangs", "tracebacks", "wrong", "eio_reads",
             "check_refused", "fsck_refused"), 0))
        row["tried"] += 1
        row["refused"] += o.refused is not None
        row["read"] += o.read
        row["hangs"] += bool(o.hang)
        row["tracebacks"] += bool(o.traceback)
        row["wrong"] += bool(o.wrong)
        row["eio_reads"] += o.eio
        row["check_refused"] += o.check_error is not None
        row["fsck_refused"] += o.fsck_refused is not None
        if o.problems():
            self.failures.append(o)

    def table(self) -> str:
        head = ("| mode | cases tried | refused with one line | mounted and read | hangs | "
                "tracebacks | wrong bytes | reads answered EIO | `rafs check` refused |")
        lines = [head, "|" + "---|" * 9]
        for mode, r in self.rows.items():
            lines.append(f"| {mode} | {r['tried']:,} | {r['refused']:,} | {r['read']:,} | "
                         f"{r['hangs']} | {r['tracebacks']} | {r['wrong']} | "
                         f"{r['eio_reads']:,} | {r['check_refused']:,} |")
        return "\n".join(lines)


def _one_line(e: BaseException) -> str | None:
    """The message if ``e`` is a clean one-line RafsError, else None."""
    if not isinstance(e, RafsError):
        return None
    text = str(e)
    return text if text and "\n" not in text else None


# -- expected bytes ------------------------------------------------------------------


class _Expect:
    """What the (accepted) mutated bootstrap's sha256s vouch for, by file and by blob."""

    def __init__(self, boot: Bootstrap, chunks: dict[bytes, bytes]) -> None:
        self.boot, self.chunks = boot, chunks

    def file(self, nid: int) -> list[bytes | None]:
        """Per chunk of the file: the bytes it must hold (None: only an error is right)."""
        ino = self.boot.inode(nid)
        out: list[bytes | None] = []
        for k, index in enumerate(self.boot.file_chunks(ino)):
            length = min(self.boot.chunk_size, ino.size - k * self.boot.chunk_size)
            if index is None:
                out.append(bytes(length))
            else:
                out.append(self.chunks.get(self.boot.chunk(index).sha256))
        return out

    def blob(self, k: int) -> tuple[bytes, list[tuple[int, int]]]:
        """Blob ``k``'s address space as it must read, and the (start, end) ranges of
        chunks whose sha256 no seed chunk has (only an error is right there)."""
        blob = self.boot.blobs[k]
        space = bytearray(blob.uncompressed_size)
        unknown = []
        for i in range(blob.chunk_start, blob.chunk_start + blob.chunk_count):
            c = self.boot.chunk(i)
            data = self.chunks.get(c.sha256)
            if data is None:
                unknown.append((c.uncompressed_offset, c.uncompressed_offset + c.uncompressed_size))
            else:
                space[c.uncompressed_offset:c.uncompressed_offset + len(data)] = data
        return bytes(space), unknown


def _check_file_read(expect: list[bytes | None], chunk_size: int, off: int,
                     data: bytes) -> str | None:
    pos = off
    while pos < off + len(data):
        k = pos // chunk_size
        want = expect[k] if k < len(expect) else None
        end = min((k + 1) * chunk_size, off + len(data))
        if want is None or data[pos - off:end - off] != want[pos - k * chunk_size:
                                                             end - k * chunk_size]:
            return f"{end - pos} bytes at {pos}"
        pos = end
    return None


def _check_blob_read(expect: tuple[bytes, list[tuple[int, int]]], off: int,
                     data: bytes) -> str | None:
    space, unknown = expect
    end = off + len(data)
    for a, b in unknown:
        if a < end and off < b:
            return f"[{max(a, off)}, {min(b, end)}) served, no seed chunk has that sha256"
    if data != space[off:end]:
        return f"bytes in [{off}, {end}) differ"
    return None


# -- the in-process runner -----------------------------------------------------------


class _Records(logging.Handler):
    """Log records carrying a traceback (an exception nothing expected)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tracebacks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.tracebacks.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def _capture() -> Iterator[_Records]:
    handler = _Records()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


@contextlib.contextmanager
def _readdir_collector() -> Iterator[None]:
    """pyfuse3.readdir_reply stood in for: the token is a list that collects entries."""
    real = pyfuse3.readdir_reply

    def reply(token: list[tuple[bytes, pyfuse3.EntryAttributes, int]], name: bytes,
              attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        token.append((name, attr, next_id))
        return True

    pyfuse3.readdir_reply = reply  # type: ignore[assignment]
    try:
        yield
    finally:
        pyfuse3.readdir_reply = real  # type: ignore[assignment]


def run_inprocess(seed: Seed, case: Case, root: Path) -> Outcome:
    """Check, load and read ``case`` through the daemon's code, without a kernel."""
    out = Outcome(case.number, case.target, "inprocess", case.description)
    with _capture() as records, _readdir_collector():
        chunks = seed.chunks
        if case.source_ref is not None:
            try:
                convert(case.source_ref, case.ref, ConvertOptions(
                    chunk_size=CHUNK_SIZE, progress=False, workers=0))
            except Exception as e:
                msg = _one_line(e)
                if msg is None:
                    out.traceback.append(f"convert: {type(e).__name__}: {e}")
                else:
                    out.refused = msg
                out.traceback += records.tracebacks
                return out
            try:
                chunks = _chunk_contents(open_local_image(case.ref).bootstrap,
                                         OCILayout(case.ref[4:].rpartition(":")[0]))
            except RafsError as e:
                out.traceback.append(f"the converter wrote an image that does not load: {e}")
                return out
        try:
            check(open_local_image(case.ref))
        except Exception as e:
            msg = _one_line(e)
            if msg is None:
                out.traceback.append(f"check: {type(e).__name__}: {e}")
            else:
                out.check_error = msg
        cache = root / f"case{case.number}-cache"
        try:
            trio.run(_mount_and_read, case, cache, chunks, out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        out.traceback += records.tracebacks
    return out


async def _mount_and_read(case: Case, cache_dir: Path, chunks: dict[bytes, bytes],
                          out: Outcome) -> None:
    layout, _, tag = case.ref[4:].rpartition(":")
    try:
        async with LocalBackend(layout, tag) as backend:
            try:
                with trio.fail_after(OP_LIMIT):
                    path = await load_bootstrap(backend, str(cache_dir))
                boot = Bootstrap.open(path, stamp=True)
            except trio.TooSlowError:
                out.hang.append("loading the bootstrap")
                return
            except Exception as e:
                msg = _one_line(e)
                if msg is None:
                    out.traceback.append(f"load: {type(e).__name__}: {e}")
                else:
                    out.refused = msg
                return
            out.validated = True
            try:
                await _serve_and_read(boot, backend, cache_dir, chunks, out)
            finally:
                boot.close()
    except Exception as e:  # the backend itself, or a bug in this runner
        out.traceback.append(f"backend: {type(e).__name__}: {e}")


async def _serve_and_read(boot: Bootstrap, backend: LocalBackend, cache_dir: Path,
                          chunks: dict[bytes, bytes], out: Outcome) -> None:
    stats = Stats()
    cache = ChunkCache(cache_dir, boot.blobs, boot.chunk, stats)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            fetcher = Fetcher(cache, backend, stats, **FETCH)  # type: ignore[arg-type]
            async with fetcher.running():
                vfs = Vfs(boot, fetcher, stats)
                expect = _Expect(boot, chunks)
                if cache_dir.exists() and boot.prefetch:
                    nursery.start_soon(_prefetch, fetcher, vfs, boot.prefetch)
                await _read_fuse(Operations(vfs, stats), boot, expect, out)
                await _read_blobs(BlobOperations(BlobFs(boot, fetcher, stats), stats), boot,
                                  expect, out)
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    if stats.internal_errors:
        out.traceback.append(f"{stats.internal_errors} internal errors counted")
    out.read = not out.hang


async def _prefetch(fetcher: Fetcher, vfs: Vfs, nids: list[int]) -> None:
    with contextlib.suppress(RafsError):
        await fetcher.prefetch(list(vfs.chunks_of_nids(nids)))


async def _op(out: Outcome, what: str, coro_fn, *args):  # type: ignore[no-untyped-def]
    """Run one adapter call with the hang bound; (result, errno or None)."""
    try:
        with trio.fail_after(OP_LIMIT):
            return await coro_fn(*args), None
    except trio.TooSlowError:
        out.hang.append(what)
        return None, -1
    except pyfuse3.FUSEError as e:
        return None, e.errno


async def _read_fuse(ops: Operations, boot: Bootstrap, expect: _Expect, out: Outcome) -> None:
    """Walk the whole tree through the adapter: every entry looked up, stat'ed, its
    xattrs, links and file data read (and checked)."""
    seen_dirs = {ROOT_INO}
    queue = [(ROOT_INO, b"/")]
    while queue and not out.hang:
        ino, path = queue.pop()
        fh, err = await _op(out, f"opendir {path!r}", ops.opendir, ino, None)
        if err is not None:
            continue
        token: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []
        _, err = await _op(out, f"readdir {path!r}", ops.readdir, fh, 0, token)
        await ops.releasedir(fh)
        for name, _attr, _cookie in token:
            out.entries += 1
            child = path.rstrip(b"/") + b"/" + name
            entry = await _visit_entry(ops, ino, name, child, out)
            if entry is None:
                continue
            mode = entry.st_mode
            if stat.S_ISDIR(mode) and entry.st_ino not in seen_dirs:
                seen_dirs.add(entry.st_ino)
                queue.append((entry.st_ino, child))
            elif stat.S_ISLNK(mode):
                await _op(out, f"readlink {child!r}", ops.readlink, entry.st_ino, None)
            elif stat.S_ISREG(mode):
                await _read_fuse_file(ops, entry, child, expect, boot.chunk_size, out)


async def _visit_entry(ops: Operations, parent: int, name: bytes, child: bytes,
                       out: Outcome) -> pyfuse3.EntryAttributes | None:
    """lookup, getattr, listxattr and every getxattr of one entry; its attributes."""
    entry, err = await _op(out, f"lookup {child!r}", ops.lookup, parent, name, None)
    if err is not None or entry is None:
        return None
    await _op(out, f"getattr {child!r}", ops.getattr, entry.st_ino, None)
    names, err = await _op(out, f"listxattr {child!r}", ops.listxattr, entry.st_ino, None)
    for xname in names or ():
        await _op(out, f"getxattr {child!r}", ops.getxattr, entry.st_ino, xname, None)
    return entry


async def _read_fuse_file(ops: Operations, entry: pyfuse3.EntryAttributes, child: bytes,
                          expect: _Expect, chunk_size: int, out: Outcome) -> None:
    """Read one regular file to its end, checking every piece against ``expect``."""
    fi, err = await _op(out, f"open {child!r}", ops.open, entry.st_ino, os.O_RDONLY, None)
    if err is not None:
        return
    want = expect.file(ops.vfs.nid(entry.st_ino))
    offset = 0
    while offset < entry.st_size and not out.hang:
        data, err = await _op(out, f"read {child!r} at {offset}", ops.read, fi.fh, offset,
                              128 << 10)
        if err is not None:
            out.eio += 1
            break
        if not data:
            break
        bad = _check_file_read(want, chunk_size, offset, bytes(data))
        if bad:
            out.wrong.append(f"{child!r}: {bad}")
            break
        offset += len(data)
    await ops.release(fi.fh)


async def _read_blobs(ops: BlobOperations, boot: Bootstrap, expect: _Expect,
                      out: Outcome) -> None:
    for k, blob in enumerate(boot.blobs):
        ino = FIRST_BLOB_INO + k
        fi, err = await _op(out, f"open blob {k}", ops.open, ino, os.O_RDONLY, None)
        if err is not None:
            continue
        layout = expect.blob(k)
        offset = 0
        while offset < blob.uncompressed_size and not out.hang:
            data, err = await _op(out, f"read blob {k} at {offset}", ops.read, fi.fh, offset,
                                  1 << 20)
            if err is not None:
                out.eio += 1
                offset += 1 << 20  # as the kernel would: the next read is elsewhere
                continue
            if not data:
                break
            bad = _check_blob_read(layout, offset, bytes(data))
            if bad:
                out.wrong.append(f"blob {k}: {bad}")
                break
            offset += len(data)


# -- the mounted runner --------------------------------------------------------------


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, major:minor) of every mount, from /proc/self/mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        out.append((f[4].replace("\\040", " "), right.split()[0] if right else "", f[2]))
    return out


def ensure_fusectl() -> Path:
    """/sys/fs/fuse/connections, mounting fusectl there if it is not yet (root)."""
    path = Path("/sys/fs/fuse/connections")
    if not any(mp == str(path) for mp, _t, _d in _mountinfo()):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(path)], check=False,
                       capture_output=True)
    return path


def abort_fuse_under(prefix: str) -> list[str]:
    """Abort every FUSE connection mounted under ``prefix``; the mount points aborted."""
    done = []
    conns = ensure_fusectl()
    for mp, fstype, dev in _mountinfo():
        if fstype.startswith("fuse") and (mp == prefix or mp.startswith(prefix + "/")):
            minor = dev.partition(":")[2]
            with contextlib.suppress(OSError):
                (conns / minor / "abort").write_text("1")
                done.append(mp)
    return done


def _mounts_under(prefixes: list[str]) -> list[str]:
    return [mp for mp, fstype, _d in _mountinfo()
            if fstype.startswith(("fuse", "erofs"))
            and any(mp == p or mp.startswith(p + "/") for p in prefixes)]


def _env(run_dir: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, "RAFS_RUN_DIR": str(run_dir)}


def _daemon_pids(run_dir: Path) -> list[int]:
    """The owner and worker pids every instance of ``run_dir`` names (fused.runstate)."""
    pids: set[int] = set()
    for state in run_dir.glob("mounts/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            fields = json.loads(state.read_text())
            pids.update(int(fields[k]) for k in ("owner_pid", "worker_pid") if fields.get(k))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _run(cmd: list[str], env: dict[str, str], timeout: float,
         on_timeout: Callable[[], object] | None = None) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr). On timeout ``on_timeout`` runs
    first (abort the FUSE connections a reader may be stuck on), then the group dies."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        if on_timeout is not None:
            on_timeout()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", "unkillable even after the abort"
        return None, stdout, stderr


def _clean_line(stderr: str) -> str | None:
    text = stderr.strip()
    if text.startswith("rafs: error:") and "\n" not in text and "Traceback" not in text:
        return text
    return None


def run_mounted(seed: Seed, case: Case, root: Path, mode: str, *,
                freeze_daemon: bool = False) -> Outcome:
    """``rafs mount`` ``case`` in ``mode``, read the whole tree, tear down; nothing left.

    ``freeze_daemon`` stops the daemon (SIGSTOP) before the read, so the case must
    end as a hang that the teardown still cleans up (the fuzzer checking itself).
    """
    out = Outcome(case.number, case.target, mode, case.description)
    work = root / f"case{case.number}-{mode}"
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True, exist_ok=True)
    # a short run directory: a unix socket's path has at most 107 bytes
    run_dir = Path(tempfile.mkdtemp(prefix="rafs-fuzz-"))
    env = _env(run_dir)
    try:
        chunks = seed.chunks
        if case.source_ref is not None:
            try:
                convert(case.source_ref, case.ref, ConvertOptions(
                    chunk_size=CHUNK_SIZE, progress=False, workers=0))
            except RafsError as e:
                out.refused = str(e)
                return out
            chunks = _chunk_contents(open_local_image(case.ref).bootstrap,
                                     OCILayout(case.ref[4:].rpartition(":")[0]))
        code, _o, err = _run([*rafs_cmd("mount", case.ref, mnt, "--cache-dir", cache,
                                        "--mode", mode, *MOUNT_ARGS)], env, 120)
        if code is None:
            out.hang.append("rafs mount did not return")
            return out
        if code != 0:
            line = _clean_line(err)
            if line is None:
                out.traceback.append(f"rafs mount: {err.strip()[-300:]}")
            out.refused = line
            return out
        out.validated = True
        if freeze_daemon:  # the fuzzer's own check: a daemon that never answers
            for pid in _daemon_pids(run_dir):
                os.kill(pid, signal.SIGSTOP)
        _read_mounted(mnt, env, case, chunks, out)
        out.read = not out.hang
        if not out.hang:
            code, stdout, _e = _run(rafs_cmd("stats", mnt), env, 60)
            if code == 0 and json.loads(stdout)["stats"].get("internal_errors"):
                out.traceback.append("the daemon counted internal errors")
    finally:
        _teardown(work, run_dir, mnt, env, out)
    return out


def _read_mounted(mnt: Path, env: dict[str, str], case: Case, chunks: dict[bytes, bytes],
                  out: Outcome) -> None:
    run_dir = Path(env["RAFS_RUN_DIR"])

    def abort() -> None:
        abort_fuse_under(str(mnt))
        abort_fuse_under(str(run_dir))

    code, stdout, stderr = _run([sys.executable, "-m", "tests.helpers.treeread", str(mnt)],
                                env, READ_LIMIT, abort)
    if code is None:
        out.hang.append(f"reading the tree took over {READ_LIMIT:.0f}s")
    elif code != 0:
        out.traceback.append(f"reader failed: {stderr.strip()[-300:]}")
    expected = _expected_tree(case, chunks)
    for line in stdout.splitlines():
        rec = json.loads(line)
        out.entries += 1
        path = bytes.fromhex(rec["path"])[len(os.fsencode(mnt)):]
        if rec.get("type") != "reg":
            continue
        if "errno" in rec:
            out.eio += 1
        want = expected.get(path)
        if want is None:
            out.wrong.append(f"{path!r} is not a file of the bootstrap")
            continue
        valid = b"".join(itertools.takewhile(lambda c: c is not None, want))  # type: ignore[misc]
        vouched = len(valid) if None in want else sum(len(c) for c in want)  # type: ignore[misc]
        served = rec["read"]
        if served > vouched:
            out.wrong.append(f"{path!r}: {served} bytes served, {vouched} vouched for")
        elif hashlib.sha256(valid[:served]).hexdigest() != rec["data"]:
            out.wrong.append(f"{path!r}: the {served} bytes served differ")


def _expected_tree(case: Case, chunks: dict[bytes, bytes]) -> dict[bytes, list[bytes | None]]:
    img = open_local_image(case.ref)
    boot = Bootstrap.from_bytes(img.bootstrap)
    expect = _Expect(boot, chunks)
    out = {}
    for path, ino in boot.walk():
        if stat.S_ISREG(ino.mode):
            out[path] = expect.file(ino.nid)
    return out


def _teardown(work: Path, run_dir: Path, mnt: Path, env: dict[str, str], out: Outcome) -> None:
    prefixes = [str(mnt), str(run_dir)]
    if out.hang:  # it did not answer once: do not wait for it again, take it down
        for pid in _daemon_pids(run_dir):
            _kill_stopped(pid)
    elif _mounts_under(prefixes):
        code, _o, _err = _run(rafs_cmd("umount", mnt), env, 60)
        if code is None:
            out.hang.append("rafs umount did not return")
    if _mounts_under(prefixes):  # a connection that does not answer: abort it, detach all
        abort_fuse_under(str(mnt))
        abort_fuse_under(str(run_dir))
        for mp in reversed(_mounts_under(prefixes)):
            subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
    _wait_daemons_gone(run_dir, out)
    for log_file in run_dir.glob("logs/*.log"):
        with contextlib.suppress(OSError):
            if "Traceback" in log_file.read_text(errors="replace"):
                out.traceback.append(f"traceback in the daemon log {log_file.name}")
    left = _mounts_under(prefixes)
    if left:
        out.hang.append(f"mounts left behind: {left}")
    shutil.rmtree(work, ignore_errors=True)
    if not left:
        shutil.rmtree(run_dir, ignore_errors=True)


def _kill_stopped(pid: int) -> None:
    """SIGKILL, and SIGCONT in case it was stopped (a stopped process dies only then)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        os.kill(pid, signal.SIGCONT)


def _wait_daemons_gone(run_dir: Path, out: Outcome) -> None:
    """Give the daemons 15 s to exit after the unmount; one still running is a hang (and
    is killed)."""
    deadline = time.monotonic() + 15
    pids = _daemon_pids(run_dir)
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            out.hang.append(f"daemon {pid} still running after unmount")
            _kill_stopped(pid)
            deadline = time.monotonic() + 15
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)


def chunk_record_inconsistent(seed: Seed) -> bytes:
    """The issue's recorded case: a chunk record whose uncompressed size exceeds the chunk
    size (``rafs check`` used to call it "chunk N record is inconsistent")."""
    boot = bytearray(seed.bootstrap)
    f = next(f for f in seed.fields if f.kind == "chunk.uncompressed_size" and f.label == "chunk 1")
    mutate._set(boot, f, 1 << 30)
    return bytes(boot)


__all__ += ["abort_fuse_under", "chunk_record_inconsistent", "cleanup_case", "ensure_fusectl"]
