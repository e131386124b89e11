"""``rafs optimize SRC DST -- CMD...``: trace a workload, write an image that prefetches it.

1. Find the plain original of SRC: SRC itself if it is a plain OCI image;
   for a RAFS image, the manifest named by its ``io.rafs.source.digest``
   annotation, looked up among the tags of the same OCI layout or by digest in
   the same registry repository (OptimizeError if it is not there).
2. Get a RAFS image to trace on: SRC itself, or SRC converted into a
   temporary layout.
3. Mount it privately in fuse mode (its own daemon, so the trace holds this
   workload only, every file in first-open order),
   run CMD in a container on it (``run.run_container``), and read the access
   trace (``fused.client.trace``) before unmounting.
4. Convert the original into DST with the trace as the prefetch list (the
   converter puts those files first in each blob).

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

from .errors import OptimizeError
from .image import ResolvedImage, registry_client, resolve_image
from .imagemount import check_fuse
from .paths import cache_dir as default_cache_dir
from .run import RunOptions, require_root, run_container

__all__ = ["Optimized", "find_original", "optimize"]

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
             chunk_size: int | None = None) -> Optimized:
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
        paths, status = _trace(traced, Path(tmp) / "mnt", cmd, RunOptions(
            image=str(traced.ref), cmd=cmd, env=env or [], user=user, workdir=workdir,
            net=net, rm=True))
    if status != 0:
        print(f"rafs: the workload exited with {status}: {dst} is not written",
              file=sys.stderr)
        return Optimized(status)
    print(f"rafs: {len(paths)} files traced; converting {original} into {dst}",
          file=sys.stderr)
    options.prefetch = [os.fsencode(p) for p in paths]
    return Optimized(0, convert(original, dst, options), len(paths))


def _trace(image: ResolvedImage, mnt: Path, cmd: list[str],
           opts: RunOptions) -> tuple[list[str], int]:
    mnt.mkdir()
    # fuse mode: the daemon sees every open, so the trace lists files in first-open order
    # (kernel mode only sees page-cache misses of blob data)
    client.mount(image.pinned, mnt, MountOptions(str(default_cache_dir()), prefetch=False,
                                                 mode="fuse"))
    try:
        status = run_container(opts, image=image, lower=mnt)
        paths = client.trace(mnt)
    finally:
        try:
            client.unmount(mnt)
        except (MountError, ControlError) as e:
            log.warning("unmounting %s: %s; ending its daemon", mnt, e)
            client.unmount(mnt, force=True)
    return paths, status
