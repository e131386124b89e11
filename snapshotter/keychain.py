"""Registry credentials the snapshotter learned from CRI pulls, by image repository.

containerd's CRI plugin hands a pull's credentials (the kubelet's image pull
secret, ``PullImageRequest.auth``) to its own resolver only; a snapshotter that
reads the image lazily, long after the pull, never sees them.
``snapshotter.imageproxy`` stands between the kubelet and containerd's image
service and puts each pull's credentials here *before* containerd starts the
pull (whose ``Prepare`` calls identify and mount the image); a pull that fails
puts back what was there before. ``FusedRemote`` asks for the credentials of
the image it identifies or mounts; without an entry it falls back to the
node's (``--creds``-less lookup: ``$REGISTRY_AUTH_FILE``, ``~/.docker/config.json``).

Kept: user and password (CRI's ``username``/``password``, or ``auth``, base64
of ``USER:PASSWORD``), which the registry client uses for basic auth and for
the token flow. Identity and registry tokens are not supported (one warning).
As containerd does, credentials whose ``server_address`` names another host
than the image's are not used. Entries live in memory only, never on disk or
in logs: after a snapshotter restart, images pulled before are mounted again
with the node's credentials until the kubelet pulls them again.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

from rafs.credentials import Credentials
from rafs.errors import RafsError
from rafs.oci import parse_image_ref

__all__ = ["Keychain", "pull_credentials"]

log = logging.getLogger(__name__)

# What containerd and the kubelet write for Docker Hub.
_DOCKER_HUB = {"docker.io", "index.docker.io", "registry-1.docker.io"}


def _same_host(server_address: str, registry: str) -> bool:
    host = urlsplit(server_address if "//" in server_address else "//" + server_address).netloc
    if host == registry:
        return True
    return host in _DOCKER_HUB and registry in _DOCKER_HUB


def pull_credentials(registry: str, username: str, password: str, auth: str,
                     server_address: str = "", tokens: bool = False) -> Credentials | None:
    """The user and password of one CRI ``AuthConfig`` for ``registry``, or None.

    ``tokens``: the config carried an identity or registry token (not supported)."""
    if server_address and not _same_host(server_address, registry):
        log.info("pull credentials are for %s, not %s: not used", server_address, registry)
        return None
    if username:
        return username, password
    if auth:
        try:
            user, sep, pw = base64.b64decode(auth, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep, pw = "", "", ""
        if sep and user:
            return user, pw
        log.warning("pull credentials for %s: \"auth\" is not base64 of USER:PASSWORD; "
                    "not used", registry)
        return None
    if tokens:
        log.warning("pull credentials for %s: identity and registry tokens are not "
                    "supported; the node's credentials are used", registry)
    return None


def _key(image: str) -> tuple[str, str] | None:
    try:
        ref = parse_image_ref("docker://" + image)
    except RafsError:
        return None
    return ref.registry, ref.repository


class Keychain:
    """Credentials by (registry host, repository), as the last successful pull sent them."""

    def __init__(self) -> None:
        self._creds: dict[tuple[str, str], Credentials] = {}
        self._lock = threading.Lock()

    @staticmethod
    def registry_of(image: str) -> str | None:
        """The registry host of a CRI image name (``alpine`` is on ``docker.io``)."""
        key = _key(image)
        return key[0] if key else None

    def put(self, image: str, creds: Credentials) -> Callable[[], None]:
        """Keep ``creds`` for the repository of ``image`` (``HOST/REPO[:TAG][@DIGEST]``,
        or a Docker Hub short name); returns a function that puts back the previous."""
        key = _key(image)
        if key is None:
            return lambda: None
        with self._lock:
            previous = self._creds.get(key)
            self._creds[key] = creds

        def undo() -> None:
            with self._lock:
                if self._creds.get(key) != creds:
                    return  # another pull has changed it since
                if previous is None:
                    del self._creds[key]
                else:
                    self._creds[key] = previous

        return undo

    def get(self, registry: str, repository: str) -> Credentials | None:
        with self._lock:
            return self._creds.get((registry, repository))
