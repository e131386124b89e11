"""Which image transports each command takes, and every text that says so.

This module owns the table ``IMAGE_ARGS``: for every image argument of every
``rafs`` command, the transports it accepts. Usage strings, ``--help`` text
and the errors for a reference a command cannot use are generated from it, so
help, errors and behaviour cannot drift apart. A command declares its image
argument with one of the ``ImageArg`` constants below and parses it with
``ImageArg.parse``::

    CONVERT_SRC.add_argument(p, "src")          # positional SRC with its help
    ref = CONVERT_SRC.parse(args.src)           # ImageRef, or one-line ImageError

Transports (skopeo's names): ``oci:DIR[:TAG]`` (an OCI image layout),
``docker-archive:FILE[:REPO:TAG]`` (``docker save`` output) and
``docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`` (a registry). The syntax of each
is parsed by ``rafs.oci.parse_image_ref``; this module only decides who takes
what.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from .errors import ImageError
from .oci import ImageRef, parse_image_ref

__all__ = [
    "CHECK_IMAGE",
    "CONVERT_CHUNK_DICT",
    "CONVERT_DST",
    "CONVERT_SRC",
    "DOCKER",
    "DOCKER_ARCHIVE",
    "IMAGE_ARGS",
    "INSPECT_IMAGE",
    "MOUNT_IMAGE",
    "OCI",
    "OPTIMIZE_DST",
    "OPTIMIZE_SRC",
    "RUN_IMAGE",
    "TRANSPORTS",
    "ImageArg",
    "Transport",
    "transport_of",
]


@dataclass(frozen=True)
class Transport:
    name: str  # as in ImageRef.transport
    prefix: str  # how a reference starts
    syntax: str  # how a reference reads, for help and errors
    what: str  # in words


OCI = Transport("oci", "oci:", "oci:DIR[:TAG]", "an OCI image layout")
DOCKER_ARCHIVE = Transport("docker-archive", "docker-archive:", "docker-archive:FILE[:REPO:TAG]",
                           "a `docker save` archive")
DOCKER = Transport("docker", "docker://", "docker://HOST/REPO[:TAG|@DIGEST]", "a registry")
TRANSPORTS = (OCI, DOCKER_ARCHIVE, DOCKER)


def transport_of(text: str) -> Transport | None:
    """The transport a reference names by its prefix (None: no known prefix)."""
    return next((t for t in TRANSPORTS if text.startswith(t.prefix)), None)


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


@dataclass(frozen=True)
class ImageArg:
    """One image argument of one command, and the transports it takes."""

    command: str  # "convert"
    name: str  # "SRC", "IMAGE", "--chunk-dict"
    transports: tuple[Transport, ...]

    @property
    def syntax(self) -> str:
        """``oci:DIR[:TAG] or docker://HOST/REPO[:TAG|@DIGEST]``."""
        return _words([t.syntax for t in self.transports])

    def accepts(self, transport: str) -> bool:
        return any(t.name == transport for t in self.transports)

    def add_argument(self, parser: argparse.ArgumentParser, dest: str, **kwargs: Any) -> None:
        """Add the positional argument ``dest`` (metavar ``name``) with its help."""
        help_text = kwargs.pop("help", None)
        parser.add_argument(dest, metavar=self.name,
                            help=f"{help_text}: {self.syntax}" if help_text else self.syntax,
                            **kwargs)

    def _takes(self) -> str:
        return f"`rafs {self.command}` takes {self.syntax} as {self.name}"

    def parse(self, text: str) -> ImageRef:
        """The reference ``text``; ImageError (one line saying what this argument takes)
        if it is malformed or of a transport the command cannot use."""
        transport = transport_of(text)
        if transport is None:
            raise ImageError(f"bad image reference {text!r}: {self._takes()}")
        if not self.accepts(transport.name):
            raise ImageError(f"{text}: {self._takes()}, not {transport.what} "
                             f"({transport.prefix})")
        return parse_image_ref(text)


#: Every image argument of every command, and the transports it takes.
IMAGE_ARGS: dict[tuple[str, str], tuple[Transport, ...]] = {
    ("convert", "SRC"): (OCI, DOCKER_ARCHIVE, DOCKER),
    ("convert", "DST"): (OCI, DOCKER),
    ("convert", "--chunk-dict"): (OCI, DOCKER),
    ("inspect", "IMAGE"): (OCI, DOCKER),
    ("check", "IMAGE"): (OCI, DOCKER),
    ("mount", "IMAGE"): (OCI, DOCKER),
    ("run", "IMAGE"): (OCI, DOCKER),
    ("optimize", "SRC"): (OCI, DOCKER),
    ("optimize", "DST"): (OCI, DOCKER),
}


def _arg(command: str, name: str) -> ImageArg:
    return ImageArg(command, name, IMAGE_ARGS[command, name])


CONVERT_SRC = _arg("convert", "SRC")
CONVERT_DST = _arg("convert", "DST")
CONVERT_CHUNK_DICT = _arg("convert", "--chunk-dict")
INSPECT_IMAGE = _arg("inspect", "IMAGE")
CHECK_IMAGE = _arg("check", "IMAGE")
MOUNT_IMAGE = _arg("mount", "IMAGE")
RUN_IMAGE = _arg("run", "IMAGE")
OPTIMIZE_SRC = _arg("optimize", "SRC")
OPTIMIZE_DST = _arg("optimize", "DST")
