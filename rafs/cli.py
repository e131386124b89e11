"""`rafs inspect` and `rafs check`: look at and verify a RAFS image (``--json`` for both)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses

from . import image as images
from . import transports
from .credentials import parse_creds
from .output import add_json_flag, print_json


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("inspect", help="show layers, files, what is stored and what dedup saves")
    _image_args(p, transports.INSPECT_IMAGE)
    add_json_flag(p, "the summary")
    p.set_defaults(func=cmd_inspect, image_arg=transports.INSPECT_IMAGE)
    p = sub.add_parser("check", help="verify the bootstrap structure and every digest")
    _image_args(p, transports.CHECK_IMAGE)
    add_json_flag(p, "what was verified")
    p.set_defaults(func=cmd_check, image_arg=transports.CHECK_IMAGE)


def _image_args(p: argparse.ArgumentParser, image: transports.ImageArg) -> None:
    image.add_argument(p, "image")
    p.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")


def _open(args: argparse.Namespace) -> contextlib.AbstractContextManager[
        images.LocalImage | images.RemoteImage]:
    args.image_arg.parse(args.image)
    return images.open_image(args.image, creds=parse_creds(args.creds),
                             insecure=True if args.insecure else None)


def _mib(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps a digit before the point."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open(args) as img:
        s = images.summarize(img)
    if args.json:
        out = dataclasses.asdict(s) | {"manifest_digest": img.manifest.digest}
        print_json(out)
        return 0
    print(f"image      {args.image}  ({img.manifest.digest})")
    for layer in s.layers:
        size = _mib(int(layer["size"]))  # type: ignore[call-overload]
        print(f"layer      {layer['digest']}  {size:>11}  {layer['media_type']}")
    print(f"inodes     {s.inodes}  ({s.files} files, {s.directories} directories, "
          f"{s.other} other)")
    print(f"files      {_mib(s.file_bytes)} of data in the merged tree (a hardlinked file "
          "counted once)")
    print(f"           = {_mib(s.referenced_chunk_bytes)} in {s.referenced_chunks} chunks"
          f" + {_mib(s.dedup_saved_bytes)} ({_share(s.dedup_saved_bytes, s.file_bytes)})"
          f" saved by dedup + {_mib(s.hole_bytes)} of holes")
    print(f"stored     {_mib(s.stored_chunk_bytes)} in {s.chunks} chunks = those "
          f"{_mib(s.referenced_chunk_bytes)} + {_mib(s.unreferenced_chunk_bytes)} that no file "
          "of the merged tree uses")
    print("           (files that upper layers replace or delete); "
          f"{_mib(s.blob_bytes)} compressed in blobs")
    print(f"chunks     chunk size {s.chunk_size // 1024} KiB, {s.chunk_refs} references "
          "from files")
    print(f"bootstrap  {_mib(s.bootstrap_bytes)} ({_mib(s.bootstrap_layer_bytes)} compressed), "
          f"{s.prefetch_files} prefetch entries")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _open(args) as img:
        count = images.check(img)
    blobs = len(img.manifest.layers) - 1
    if args.json:
        print_json({"image": args.image, "manifest_digest": img.manifest.digest, "ok": True,
                    "chunks": count, "blobs": blobs})
        return 0
    print(f"ok: bootstrap and {count} chunks in {blobs} blobs verified")
    return 0
