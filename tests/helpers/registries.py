"""Registries with authentication for tests: a ``docker-registry`` plus who may use it.

Owns: ``AuthRegistry`` (the server, one known user and password, and for token
auth the ``TokenIssuer``) and the context managers that start them:
``basic_registry`` (htpasswd) and ``token_registry`` (bearer tokens from the
issuer, which the registry verifies). The session fixtures ``registry_basic``
and ``registry_token`` in ``tests/conftest.py`` are built from these.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from bench.registry import HtpasswdAuth, RegistryServer
from tests.helpers.token_issuer import TokenIssuer

__all__ = [
    "BASIC_PASSWORD",
    "BASIC_USER",
    "READER_PASSWORD",
    "READER_USER",
    "TOKEN_PASSWORD",
    "TOKEN_USER",
    "AuthRegistry",
    "basic_registry",
    "token_registry",
]

BASIC_USER, BASIC_PASSWORD = "rafs", "basic-secret-pw"
TOKEN_USER, TOKEN_PASSWORD = "alice", "token-secret-pw"
READER_USER, READER_PASSWORD = "reader", "reader-secret-pw"  # token auth: pull only


@dataclass
class AuthRegistry:
    """A running registry that wants credentials, and the credentials it takes."""

    server: RegistryServer
    user: str
    password: str
    issuer: TokenIssuer | None = None

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def creds(self) -> str:
        """``user:password``, as ``--creds`` and skopeo's ``--creds`` take it."""
        return f"{self.user}:{self.password}"

    def ref(self, repository: str, tag: str = "latest") -> str:
        return self.server.ref(repository, tag)


@contextlib.contextmanager
def basic_registry(users: Mapping[str, str] | None = None) -> Iterator[AuthRegistry]:
    """A registry with htpasswd basic auth; ``users`` default to ``BASIC_USER``."""
    users = dict(users or {BASIC_USER: BASIC_PASSWORD})
    user, password = next(iter(users.items()))
    with RegistryServer(auth=HtpasswdAuth(users)) as server:
        yield AuthRegistry(server, user, password)


@contextlib.contextmanager
def token_registry(*, expires_in: int = 300, key_header: str = "x5c",
                   allow_anonymous: bool = False) -> Iterator[AuthRegistry]:
    """A registry with token auth and its issuer; ``TOKEN_USER`` may pull and push,
    ``READER_USER`` may only pull."""
    with tempfile.TemporaryDirectory(prefix="rafs-token-") as tmp, TokenIssuer(
        {TOKEN_USER: TOKEN_PASSWORD, READER_USER: READER_PASSWORD},
        Path(tmp),
        expires_in=expires_in,
        key_header=key_header,  # type: ignore[arg-type]
        allow_anonymous=allow_anonymous,
        grants={READER_USER: {"pull"}},
    ) as issuer, RegistryServer(auth=issuer.token_auth()) as server:
        yield AuthRegistry(server, TOKEN_USER, TOKEN_PASSWORD, issuer)
