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
    p = sub.add_parser("inspect", help="show layers, file and chunk counts, dedup and sizes")
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
    return f"{n / (1 << 20):.1f} MiB"


def cmd_inspect(args: argparse.Namespace) -> int:
    with _open(args) as img:
        s = images.summarize(img)
    if args.json:
        out = dataclasses.asdict(s) | {"dedup_ratio": round(s.dedup_ratio, 4),
                                       "manifest_digest": img.manifest.digest}
        print_json(out)
        return 0
    print(f"image      {args.image}  ({img.manifest.digest})")
    for layer in s.layers:
        size = _mib(int(layer["size"]))  # type: ignore[call-overload]
        print(f"layer      {layer['digest']}  {size:>11}  {layer['media_type']}")
    print(f"inodes     {s.inodes}  ({s.files} files, {s.directories} directories, "
          f"{s.other} other)")
    print(f"chunks     {s.chunks} unique of {s.chunk_refs} referenced, "
          f"chunk size {s.chunk_size // 1024} KiB")
    print(f"data       {_mib(s.file_bytes)} in files, {_mib(s.unique_bytes)} unique "
          f"(dedup ratio {s.dedup_ratio:.2f}), {_mib(s.blob_bytes)} in blobs")
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
