"""The pause image a CRI pod sandbox needs, built here (there is no internet to pull one).

Owns: compiling ``pause.c`` (next to this file) with Debian's ``gcc -static``
into a self-contained binary, wrapping it as a one-layer OCI image whose
entrypoint is ``/pause`` (``tests.helpers.ocibuild``), and pushing that image
to a test registry with ``skopeo``. containerd's CRI plugin is then told to
use it as ``sandbox_image``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers.ocibuild import ImageConfig, build_oci_image, file_entry

__all__ = ["PAUSE_SOURCE", "build_pause_binary", "push_pause_image"]

PAUSE_SOURCE = Path(__file__).with_name("pause.c")


def build_pause_binary(out: Path) -> Path:
    """Compile ``pause.c`` statically (and stripped) into ``out``."""
    subprocess.run(["gcc", "-static", "-Os", "-s", "-Wall", "-Werror", "-o", str(out),
                    str(PAUSE_SOURCE)], check=True, capture_output=True, text=True)
    return out


def push_pause_image(workdir: Path, registry_host: str, repository: str = "rafs-test/pause",
                     tag: str = "3.9-rafs") -> str:
    """Build the pause image in ``workdir`` and push it to the plain-HTTP registry at
    ``registry_host``; return its reference as containerd takes it (``HOST/REPO:TAG``)."""
    binary = build_pause_binary(workdir / "pause")
    layout = workdir / "pause-oci"
    build_oci_image(layout, tag, [[file_entry("pause", binary.read_bytes(), mode=0o755)]],
                    config=ImageConfig(env=[], cmd=None, entrypoint=["/pause"]))
    ref = f"{registry_host}/{repository}:{tag}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{layout}:{tag}", f"docker://{ref}"],
                   check=True, capture_output=True, text=True)
    return ref
