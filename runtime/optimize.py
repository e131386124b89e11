"""``rafs optimize SRC DST -- CMD...``: trace a workload, write an image that prefetches it.

1. Find the plain original of SRC: SRC itself if it is a plain OCI image;
   for a RAFS image, the manifest named by its ``io.rafs.source.digest``
   annotation, looked up among the tags of the same OCI layout or by digest in
   the same registry repository (OptimizeError if it is not there).
2. Get a RAFS image to trace on: SRC itself, or SRC converted into a
   temporary layout.
3. Mount it privately (its own daemon without prefetch, so the trace holds this
   workload only; in the mode ``rafs run`` would use, ``--mode auto``, so the
   reads traced are the reads a start will make), run CMD in a container on it
   (``run.run_container``), and read the access trace (``fused.client.trace_report``:
   the byte ranges read, in first-access order of their chunks) before
   unmounting.
4. Convert the original into DST with the ranges as the prefetch list: the
   converter puts those chunks first in each blob, in the order they were
   read, and records them as the start-up set that a mount prefetches
   (``converter.startup``). ``whole_files`` records the files read instead,
   each whole (the form of hand-written prefetch lists).

The container's exit status is reported; a failing workload still yields a
trace, but DST is written only when CMD exited 0. A registry DST is checked
first (it answers and takes our pushes), before the workload runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converter.convert import ConvertOptions, ConvertResult, convert
from converter.push import check_push_target
from fused import client
from fused.errors import ControlError, MountError
from fused.options import MountOptions
from rafs.oci import (
    ANNOTATION_RAFS_SOURCE_DIGEST,
    ANNOTATION_REF_NAME,
    ImageRef,
    OCILayout,
    parse_image_ref,
)
from rafs.prefetchlist import Entry

from .errors import OptimizeError
from .image import ResolvedImage, registry_client, resolve_image
from .imagemount import check_fuse
from .paths import cache_dir as default_cache_dir
from .run import RunOptions, require_root, run_container

__all__ = ["Optimized", "find_original", "optimize", "startup_entries"]

log = logging.getLogger(__name__)


def find_original(image: ResolvedImage) -> ImageRef:
    """The reference of the plain image a RAFS image was converted from."""
    if not image.is_rafs:
        return image.ref
    digest = image.manifest.annotations.get(ANNOTATION_RAFS_SOURCE_DIGEST)
    if not digest:
        raise OptimizeError(f"{image.ref} does not record the digest of its original "
                            "image: give the plain image as SRC")
    ref = image.ref
    if ref.transport == "oci":
        for desc in OCILayout(ref.path).index_entries():
            tag = desc.annotations.get(ANNOTATION_REF_NAME)
            if desc.digest == digest and tag:
                return ImageRef("oci", ref.path, tag)
    elif ref.transport == "docker":
        pinned = ImageRef("docker", ref.path, None, digest)
        with contextlib.suppress(Exception), registry_client(pinned) as registry:
            registry.resolve(pinned)
            return pinned
    raise OptimizeError(f"the original of {ref} ({digest}) is not tagged in the same "
                        "layout or repository: give the plain image as SRC")


@dataclass
class Optimized:
    """What ``optimize`` did: the workload's exit status, and DST's conversion (None
    when the workload failed)."""

    status: int
    result: ConvertResult | None = None
    traced: int = 0  # files in the trace, the prefetch list of DST


def optimize(src: str, dst: str, cmd: list[str], *, env: list[str] | None = None,
             user: str | None = None, workdir: str | None = None, net: str = "host",
             chunk_size: int | None = None, mode: str = "auto",
             whole_files: bool = False) -> Optimized:
    require_root("rafs optimize")
    check_fuse()
    image = resolve_image(src)
    original = find_original(image)
    options = ConvertOptions() if chunk_size is None else ConvertOptions(chunk_size=chunk_size)
    check_push_target(parse_image_ref(dst), options)
    with tempfile.TemporaryDirectory(prefix="rafs-optimize-") as tmp:
        traced = image
        if not image.is_rafs:
            print(f"rafs: converting {image.ref} to trace it", file=sys.stderr)
            result = convert(image.ref, ImageRef("oci", os.path.join(tmp, "layout"), "trace"),
                             options)
            traced = resolve_image(result.target)
        report, status = _trace(traced, Path(tmp) / "mnt", cmd, RunOptions(
            image=str(traced.ref), cmd=cmd, env=env or [], user=user, workdir=workdir,
            net=net, rm=True), mode)
    if status != 0:
        print(f"rafs: the workload exited with {status}: {dst} is not written",
              file=sys.stderr)
        return Optimized(status)
    options.prefetch = startup_entries(report, whole_files)
    ranges = report.get("ranges", [])
    print(f"rafs: {len(report['paths'])} files traced, {len(ranges)} ranges of "
          f"{sum(r['length'] for r in ranges) / 1e6:.1f} MB read; converting {original} "
          f"into {dst}", file=sys.stderr)
    return Optimized(0, convert(original, dst, options), len(report["paths"]))


def startup_entries(report: dict[str, Any], whole_files: bool = False) -> list[Entry]:
    """The prefetch list of DST from a trace (``fused.trace``): the ranges read, or with
    ``whole_files`` (or a trace without ranges) the files read, whole."""
    ranges = report.get("ranges")
    if whole_files or ranges is None:
        return [Entry(os.fsencode(p)) for p in report["paths"]]
    return [Entry(os.fsencode(r["path"]), r["offset"], r["length"]) for r in ranges]


def _trace(image: ResolvedImage, mnt: Path, cmd: list[str],
           opts: RunOptions, mode: str) -> tuple[dict[str, Any], int]:
    mnt.mkdir()
    # Both modes trace the ranges read; in kernel mode the kernel's own readahead of
    # blob data is part of them, as it will be when the image starts.
    client.mount(image.pinned, mnt, MountOptions(str(default_cache_dir()), prefetch=False,
                                                 mode=mode))
    try:
        status = run_container(opts, image=image, lower=mnt)
        report = client.trace_report(mnt)
    finally:
        try:
            client.unmount(mnt)
        except (MountError, ControlError) as e:
            log.warning("unmounting %s: %s; ending its daemon", mnt, e)
            client.unmount(mnt, force=True)
    return report, status
