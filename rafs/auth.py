"""The registry authentication handshake (credentials come from ``rafs.credentials``).

This module owns ``RegistryAuth``, an ``httpx.Auth`` that answers a registry's
401 challenge the way the distribution spec describes: ``Basic`` (send the
credentials), or ``Bearer`` (ask the token endpoint named in
``WWW-Authenticate`` for a token scoped to the repository and actions the
request needs, cache it, and fetch a fresh one when the registry answers 401
to it, i.e. on expiry).

Credentials and tokens never reach a log line or an error message. httpx
itself drops the Authorization header when a redirect leads to another host.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import httpx

from .credentials import AUTH_FILE_ENV, Credentials
from .errors import AuthError

__all__ = ["RegistryAuth", "parse_challenge"]

log = logging.getLogger(__name__)

MAX_TOKEN_RESPONSE = 1 << 20


# -- the challenge --------------------------------------------------------------

_PARAM = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercase: "basic" or "bearer"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` value: ``Bearer realm="...",service="..."``."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {}
    for m in _PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return Challenge(scheme.lower(), params)


_REPO_PATH = r"/(.+?)/(?:manifests|blobs|tags)/"


def request_scope(request: httpx.Request, api_root: str = "/v2") -> str | None:
    """The token scope a registry request needs: ``repository:NAME:ACTIONS``
    (``api_root``: the path the endpoint's API lives under, ``/v2`` by the spec)."""
    m = re.match(re.escape(api_root) + _REPO_PATH, request.url.path)
    if m is None:
        return None
    actions = "pull" if request.method in ("GET", "HEAD") else "pull,push"
    return f"repository:{m.group(1)}:{actions}"


# -- the handshake --------------------------------------------------------------


def _basic_header(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode("ascii")


class RegistryAuth(httpx.Auth):
    """Answers one registry endpoint's 401 challenges, for a sync or an async httpx
    client (each endpoint of a registry, a mirror or the registry itself, has its own:
    its own credentials and tokens)."""

    def __init__(self, registry: str, creds: Credentials | None, api_root: str = "/v2") -> None:
        self.registry = registry
        self.api_root = api_root
        self._creds = creds
        self._basic = False  # the registry asked for Basic: send it up front from now on
        self._tokens: dict[str, str] = {}  # scope -> bearer token
        self._lock = threading.Lock()

    def _cached(self, scope: str | None) -> str | None:
        if scope is None:
            return None
        with self._lock:
            token = self._tokens.get(scope)
            if token is None and scope.endswith(":pull"):  # a push token also pulls
                token = self._tokens.get(scope + ",push")
        return token

    def _apply(self, request: httpx.Request, scope: str | None) -> str | None:
        token = self._cached(scope)
        if token is not None:
            request.headers["Authorization"] = f"Bearer {token}"
        elif self._basic and self._creds is not None:
            request.headers["Authorization"] = _basic_header(self._creds)
        return token

    def _needs_creds(self) -> AuthError:
        return AuthError(f"{self.registry} requires credentials (use --creds USER:PASSWORD, "
                         f"${AUTH_FILE_ENV} or ~/.docker/config.json)")

    def _token_request(self, challenge: Challenge, scope: str | None) -> httpx.Request:
        realm = challenge.params.get("realm")
        if not realm:
            raise AuthError(f"{self.registry}: a Bearer challenge without a realm")
        params = {}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        wanted = challenge.params.get("scope") or scope
        if wanted:
            params["scope"] = wanted
        headers = {}
        if self._creds is not None:
            headers["Authorization"] = _basic_header(self._creds)
        try:
            url = httpx.URL(realm).copy_merge_params(params)
        except (httpx.InvalidURL, ValueError):
            raise AuthError(f"{self.registry}: bad token realm {realm!r}") from None
        return httpx.Request("GET", url, headers=headers)

    def _take_token(self, response: httpx.Response, scope: str | None) -> str:
        if response.status_code in (401, 403):
            raise AuthError(f"{self.registry}: wrong credentials (the token server at "
                            f"{response.request.url.host} refused them)"
                            if self._creds is not None else self._needs_creds().args[0])
        if response.status_code != 200:
            raise AuthError(f"{self.registry}: the token server answered "
                            f"{response.status_code}")
        try:
            body = json.loads(response.content[:MAX_TOKEN_RESPONSE])
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"{self.registry}: the token server sent no token")
        if scope is not None:
            with self._lock:
                self._tokens[scope] = token
        return token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scope = request_scope(request, self.api_root)
        self._apply(request, scope)
        response = yield request
        if response.status_code != 401:
            return
        challenge = next(filter(None, map(parse_challenge,
                                          response.headers.get_list("www-authenticate"))), None)
        if challenge is None:
            return  # the caller turns the 401 into an AuthError
        if challenge.scheme == "basic":
            if self._creds is None:
                raise self._needs_creds()
            if self._basic and request.headers.get("Authorization", "").startswith("Basic "):
                return  # our credentials were refused
            self._basic = True
            request.headers["Authorization"] = _basic_header(self._creds)
            yield request
        elif challenge.scheme == "bearer":
            # A token we sent was refused (expired, or too narrow): fetch a fresh one, once.
            token_response = yield self._token_request(challenge, scope)
            token = self._take_token(token_response, scope)
            request.headers["Authorization"] = f"Bearer {token}"
            yield request

    # httpx reads no response body for an Auth unless told to; the token answer
    # must be read, and blob bodies must not be, so read only those we consume.

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if response.status_code == 401 or outgoing is not request:
                response.read()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        flow = self.auth_flow(request)
        outgoing = next(flow)
        while True:
            response = yield outgoing
            if response.status_code == 401 or outgoing is not request:
                await response.aread()
            try:
                outgoing = flow.send(response)
            except StopIteration:
                return
