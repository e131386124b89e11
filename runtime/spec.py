"""The OCI runtime spec (``config.json``) of a container, from its image config.

What it holds follows containerd's defaults (``oci.populateDefaultUnixSpec``
and ``WithImageConfig``): the process from Entrypoint + Cmd (a command line
replaces Cmd), Env with a default PATH, WorkingDir, the user resolved in the
image, the default capability set (granted to root; a non-root user keeps them
only in the bounding set, as docker does), RLIMIT_NOFILE 1024, the /proc /dev
/dev/pts /dev/shm /dev/mqueue /sys mounts, masked and read-only /proc paths,
a device cgroup denying everything runc does not allow by default, and the
pid, ipc, uts, mount (and, for ``--net none``, network) namespaces.
/etc/hosts, /etc/hostname and /etc/resolv.conf are bind mounts of files in the
container's directory. No seccomp profile is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import NoCommandError
from .users import ResolvedUser

__all__ = ["DEFAULT_CAPABILITIES", "DEFAULT_PATH", "SpecInput", "build_spec", "command_of"]

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_CAPABILITIES = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass
class SpecInput:
    """What ``build_spec`` needs besides the image config."""

    args: list[str]  # the full command (entrypoint + cmd), from ``command_of``
    user: ResolvedUser
    hostname: str
    files_dir: Path  # holds hosts, hostname, resolv.conf
    env: list[str] = field(default_factory=list)  # -e K=V overrides
    workdir: str | None = None
    terminal: bool = False
    net: str = "host"


def command_of(image_config: dict[str, Any], cmd: list[str]) -> list[str]:
    """Entrypoint + (``cmd`` or the image's Cmd); NoCommandError if that is empty."""
    entrypoint = image_config.get("Entrypoint") or []
    image_cmd = image_config.get("Cmd") or []
    if not isinstance(entrypoint, list) or not isinstance(image_cmd, list):
        raise NoCommandError("the image config has a malformed Entrypoint or Cmd")
    args = [str(a) for a in entrypoint] + (list(cmd) if cmd else [str(a) for a in image_cmd])
    if not args:
        raise NoCommandError("the image has no command (Entrypoint or Cmd); give one after "
                             "the image name")
    return args


def _merge_env(image_env: list[str], extra: list[str], user: ResolvedUser,
               terminal: bool) -> list[str]:
    env: dict[str, str] = {}
    for item in image_env:
        key, _, value = str(item).partition("=")
        env[key] = value
    env.setdefault("PATH", DEFAULT_PATH.partition("=")[2])
    for item in extra:
        key, sep, value = item.partition("=")
        env[key] = value if sep else ""
    env.setdefault("HOME", user.home)
    if terminal:
        env.setdefault("TERM", "xterm")
    return [f"{k}={v}" for k, v in env.items()]


def _mounts(files: Path) -> list[dict[str, Any]]:
    def bind(dest: str, name: str) -> dict[str, Any]:
        return {"destination": dest, "type": "bind", "source": str(files / name),
                "options": ["rbind", "rprivate"]}

    return [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        bind("/etc/hosts", "hosts"),
        bind("/etc/hostname", "hostname"),
        bind("/etc/resolv.conf", "resolv.conf"),
    ]


def build_spec(image_config: dict[str, Any], s: SpecInput) -> dict[str, Any]:
    """The ``config.json`` of a bundle whose root file system is ``rootfs/``."""
    image_env = image_config.get("Env") or []
    workdir = s.workdir or image_config.get("WorkingDir") or "/"
    if not str(workdir).startswith("/"):
        workdir = "/" + str(workdir)
    caps = list(DEFAULT_CAPABILITIES)
    granted = caps if s.user.uid == 0 else []
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if s.net == "none":
        namespaces.append({"type": "network"})
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": s.terminal,
            "user": {"uid": s.user.uid, "gid": s.user.gid,
                     **({"additionalGids": s.user.additional_gids}
                        if s.user.additional_gids else {})},
            "args": s.args,
            "env": _merge_env([str(e) for e in image_env], s.env, s.user, s.terminal),
            "cwd": str(workdir),
            "capabilities": {"bounding": caps, "effective": granted, "permitted": granted},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": False,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": s.hostname,
        "mounts": _mounts(s.files_dir),
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": namespaces,
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
