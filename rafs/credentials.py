"""Where registry credentials come from.

In order: an explicit ``--creds USER:PASS``; the file named by
``REGISTRY_AUTH_FILE``; Docker's ``config.json`` (``$DOCKER_CONFIG`` or
``~/.docker``), looked up in its ``auths`` map by registry host. Light on
purpose (no HTTP library): command-line front ends import it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
from pathlib import Path

from .errors import AuthError

__all__ = ["AUTH_FILE_ENV", "Credentials", "load_credentials", "parse_creds"]

log = logging.getLogger(__name__)

AUTH_FILE_ENV = "REGISTRY_AUTH_FILE"

Credentials = tuple[str, str]

_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


def _auth_files() -> list[Path]:
    files = []
    if os.environ.get(AUTH_FILE_ENV):
        files.append(Path(os.environ[AUTH_FILE_ENV]))
    docker_dir = os.environ.get("DOCKER_CONFIG") or os.path.join(Path.home(), ".docker")
    files.append(Path(docker_dir) / "config.json")
    return files


def _keys_for(registry: str) -> list[str]:
    keys = [registry, f"https://{registry}", f"http://{registry}",
            f"https://{registry}/v1/", f"https://{registry}/v2/"]
    if registry in ("docker.io", *_DOCKER_HUB_KEYS):
        keys += list(_DOCKER_HUB_KEYS)
    return keys


def _entry_credentials(entry: object, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise AuthError(f"{where}: the entry is not a JSON object")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"{where}: \"auth\" is not base64 of USER:PASSWORD") from None
        if not sep:
            raise AuthError(f"{where}: \"auth\" is not base64 of USER:PASSWORD")
        return user, password
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    if entry.get("identitytoken"):
        log.warning("%s: identity tokens are not supported; trying anonymous access", where)
    return None


def parse_creds(text: str | None) -> Credentials | None:
    """``USER:PASSWORD`` as ``--creds`` takes it."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise AuthError("--creds takes USER:PASSWORD")
    return user, password


def load_credentials(registry: str, explicit: Credentials | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``HOST[:PORT]``), or None for anonymous access."""
    if explicit is not None:
        return explicit
    for path in _auth_files():
        try:
            config = json.loads(path.read_bytes())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise AuthError(f"cannot read credentials from {path}: {e}") from None
        auths = config.get("auths") if isinstance(config, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in _keys_for(registry):
            if key in auths:
                creds = _entry_credentials(auths[key], f"{path} auths[{key!r}]")
                if creds is not None:
                    log.debug("credentials for %s from %s", registry, path)
                    return creds
    return None
