"""Shared pieces of the benchmarks: running rafs, timing, cache dropping, synthetic layers.

Benchmarks compare figures measured side by side in one run; nothing here asserts
a number.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rafs(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the rafs CLI of this checkout."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO, text=True,
                          capture_output=capture, check=check)


def drop_caches() -> None:
    """Flush dirty pages and drop the page, dentry and inode caches (needs root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


@contextlib.contextmanager
def mounted(image: str, mnt: Path, cache: Path, *extra: str) -> Iterator[Path]:
    """``rafs mount`` for the duration of the block; always unmounted (``fused.client``:
    plainly, else by force)."""
    from fused import client
    from rafs.errors import RafsError

    mnt.mkdir(parents=True, exist_ok=True)
    rafs("mount", image, str(mnt), "--cache-dir", str(cache), *extra)
    try:
        yield mnt
    finally:
        try:
            client.unmount(mnt)
        except RafsError as e:
            print(f"rafs umount {mnt}: {e}; by force", file=sys.stderr)
            client.unmount(mnt, force=True)


def stats(mnt: Path) -> dict[str, object]:
    return json.loads(rafs("stats", str(mnt)).stdout)


def read_tree(root: Path) -> int:
    """Read every regular file under ``root``; return bytes read."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    total += len(block)
    return total


def stat_tree(root: Path) -> int:
    """``find ROOT -exec stat``: lstat every entry; return the count."""
    count = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def read_file(path: Path, block: int = 1 << 20) -> int:
    total = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(block):
            total += len(data)
    return total


def oci_layout_of_tar(layout: Path, tag: str, tar_path: Path) -> None:
    """Wrap one uncompressed tar as a single-layer OCI image (no config frills)."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)

    def put(data: bytes | None, path: Path | None = None) -> tuple[str, int]:
        h = hashlib.sha256()
        if path is not None:
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
            size = path.stat().st_size
            target = layout / "blobs" / "sha256" / h.hexdigest()
            if not target.exists():
                os.link(path, target)
        else:
            assert data is not None
            h.update(data)
            size = len(data)
            (layout / "blobs" / "sha256" / h.hexdigest()).write_bytes(data)
        return "sha256:" + h.hexdigest(), size

    layer_digest, layer_size = put(None, tar_path)
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
              "history": [{"created_by": "bench synthetic layer"}]}
    cdig, csize = put(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdig, "size": csize},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer_digest, "size": layer_size}]}
    mdig, msize = put(json.dumps(manifest, sort_keys=True).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig,
         "size": msize, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))


def many_files_tar(path: Path, count: int) -> None:
    """A layer of ``count`` small files spread over directories of 100."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for d in range(-(-count // 100)):
            info = tarfile.TarInfo(f"d{d:05d}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
            for i in range(min(100, count - d * 100)):
                data = b"file %d %d\n" % (d, i)
                info = tarfile.TarInfo(f"d{d:05d}/f{i:03d}")
                info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def big_file_tar(path: Path, size: int, name: str = "big.bin") -> None:
    """A layer holding one file of ``size`` bytes, half random and half zeros per 128 KiB."""

    class Source(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = min(len(b), self.left, 1 << 17)
            block = (os.urandom(1 << 16) + bytes(1 << 16))[:n]
            b[:n] = block
            self.left -= n
            return n

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 1_700_000_000
        tar.addfile(info, io.BufferedReader(Source(), 1 << 20))
