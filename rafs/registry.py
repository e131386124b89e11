"""The OCI distribution API client of every part of rafs (converter, runtime, snapshotter,
daemon).

This module owns how rafs talks to a registry (on httpx):

- manifests by tag or digest: OCI manifest and index, Docker schema 2 and
  manifest list; an index resolves to this machine's platform; a manifest
  must match the digest it was asked for by, and the one the registry names
  (``rafs.trust.verify_manifest``);
- blobs: HEAD; GET of a whole blob (size-capped, verified); a stream of a
  blob that resumes with a Range request after a transient failure; Range
  reads streamed in pieces as they arrive. A 206 must start where it was
  asked to (else ``TransientError`` class ``range``); a server that ignores
  Range and answers 200 with the whole blob still yields the right bytes
  (skipped up to the offset), with a warning and the ``range_ignored`` counter;
- uploads: a HEAD first (a blob the registry has is never sent twice), a
  cross-repository mount when the blob lives in another repository of the
  same registry, else a monolithic PUT or, above ``chunk_threshold``, a
  chunked PATCH sequence; ``check_push``, an upload session opened and
  cancelled, proves push access before a long conversion starts;
- transport policy: plain HTTP for localhost and 127.0.0.1 (as containerd
  does), HTTPS elsewhere unless ``insecure``; redirects followed (httpx drops
  Authorization when a redirect leaves the host); authentication through
  ``rafs.auth.RegistryAuth``; retries of transient failures under one
  ``rafs.retry.RetryPolicy``;
- the one mapping from HTTP answers and transport failures to the rafs error
  tree: 401/403 ``AuthError``, 404 ``ImageError``, other 4xx ``BackendError``;
  ``TransientError`` for 429 and 5xx (with the server's ``Retry-After``) and
  for transport failures, classed ``connection`` (no answer), ``timeout``,
  or ``truncated`` (an answer that began and broke off, by a reset or not).

One implementation, two thin drivers
------------------------------------

Every operation is written once, as a *flow*: a generator that yields
commands (``_Send`` a request, ``_Read`` the next piece of its answer,
``_Sleep``, ``_Emit`` a piece to the caller) and is sent their results; a
failed command is thrown into it as a rafs error. All of the protocol lives
in the flows: building requests, mapping answers to errors, checking
manifests and ranges, resuming, retrying. ``RegistryClient`` runs flows on a
blocking ``httpx.Client`` (``time.sleep``) for the converter, the runtime and
the snapshotter; ``AsyncRegistryClient`` on an ``httpx.AsyncClient``
(``anyio.sleep``; the daemon runs it under trio), and its callers own the
retries of range reads (the fetcher). Drivers only do I/O, the way httpx runs
one ``Auth`` flow from both of its clients. Why not an async core behind a
sync wrapper: blocking callers (a gRPC thread of the snapshotter, the
converter reading a multi-GB layer piece by piece) would each need an event
loop in a thread and a hop across it per piece; why not two clients over
shared helpers: retries, resumption and range checks are most of the logic,
and those were the copies that had drifted.

Endpoints (mirrors)
-------------------

A registry is reached through its *endpoints* (``rafs.hosts``: containerd's
``hosts.toml``): mirrors in order, then the registry itself (or the
configured ``server``). Each attempt that ``_retrying`` runs is handed the
endpoint to send to, and every URL is built from it by ``_request`` (its API
root, its headers, ``ns=REGISTRY`` for a mirror as containerd sends; an
httpx client per endpoint for its TLS settings and its own
``RegistryAuth``, with the credentials stored for the endpoint's host).
``_retrying`` walks the endpoints that may serve the operation (a manifest by
tag needs ``resolve``, by digest and blobs ``pull``, uploads ``push``),
skipping those that are down (``rafs.endpoints.EndpointHealth``: counters,
down after a connection failure, 5xx, stall or digest mismatch, probed again
after a backoff); the last one is always tried. A failure moves on to the
next endpoint at once (a blob read resumes there from its first missing
byte); when the last one has failed too, a transient failure is retried
under the policy, from the first endpoint that is up. A stall the daemon's
fetcher cuts off (it cancels the stream) counts against the endpoint that
was being waited for; a chunk that fails verification is reported with
``distrust`` by whoever verified it (the daemon's backend knows, from the
``sources`` of each range, which endpoint sent which bytes). Digests are
verified as always: an endpoint can make a read slower, never wrong.

``transport=`` takes any httpx transport, so tests inject faults a real
registry cannot produce with ``httpx.MockTransport``.
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

import anyio
import httpx

from .auth import RegistryAuth
from .credentials import Credentials, load_credentials
from .endpoints import EndpointHealth
from .errors import (
    AuthError,
    BackendError,
    ConfigError,
    DigestError,
    ImageError,
    RafsError,
    TransientError,
)
from .hosts import Endpoint, RegistryHosts, load_hosts, origin_url
from .oci import (
    INDEX_TYPES,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    ImageRef,
    Manifest,
    check_digest,
    parse_manifest,
    select_platform,
    sha256_digest,
)
from .retry import RetryPolicy
from .trust import bootstrap_layer, verify_bootstrap, verify_manifest

__all__ = ["AsyncRegistryClient", "Endpoint", "RegistryClient", "RegistryCounters",
           "fetch_bootstrap", "registry_url"]

log = logging.getLogger(__name__)

ACCEPT_MANIFESTS = ", ".join([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX,
                              MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST])
MAX_MANIFEST = 4 << 20
MAX_SMALL_BODY = 64 << 10  # error bodies and answers whose body rafs does not use
CHUNK_THRESHOLD = 64 << 20  # uploads larger than this go in PATCH chunks of UPLOAD_CHUNK
UPLOAD_CHUNK = 16 << 20
READ_PIECE = 1 << 20
DEFAULT_TIMEOUT = 30.0
ONE_ATTEMPT = RetryPolicy(retries=0)
# A request the daemon's fetcher cancels after waiting this fraction of the client's
# timeout for its next byte counts as a stall of the endpoint (the fetcher's idle
# timeout is the client's: whichever fires first, the endpoint is blamed once).
STALL_FRACTION = 0.9

T = TypeVar("T")


def registry_url(registry: str, insecure: bool | None = None) -> str:
    """``http://`` for a local registry (or when ``insecure``), ``https://`` otherwise."""
    return origin_url(registry, insecure)


@dataclass
class RegistryCounters:
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    retries: int = 0
    range_ignored: int = 0


# -- answers and failures: the one mapping -----------------------------------------


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _registry_message(response: httpx.Response, body: bytes) -> str:
    """The registry's own words from an error body: ``CODE: message``."""
    try:
        first = json.loads(body).get("errors")[0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, IndexError, KeyError, TypeError, RecursionError):
        text = ""
    return text[:200] or response.reason_phrase or f"HTTP {response.status_code}"


def _answer_error(response: httpx.Response, body: bytes, what: str) -> RafsError:
    status = response.status_code
    message = _registry_message(response, body)
    registry = response.request.url.netloc.decode("ascii", "replace")
    if status == 401:
        return AuthError(f"{what}: {registry} refused the credentials ({message})")
    if status == 403:
        return AuthError(f"{what}: access denied by {registry} ({message})")
    if status == 404:
        return ImageError(f"{what}: not found in {registry} ({message})")
    if status == 429:
        return TransientError(f"{what}: {registry} is rate limiting (429)", error_class="429",
                              retry_after=_retry_after(response))
    if status >= 500:
        return TransientError(f"{what}: {registry} answered {status} ({message})",
                              error_class="5xx", retry_after=_retry_after(response))
    return BackendError(f"{what}: {registry} answered {status} ({message})")


def _cause(e: BaseException) -> BaseException | None:
    """The first exception in ``e``'s chain of causes that says something."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or str(seen):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _transport_error(e: httpx.HTTPError, what: str, started: bool) -> RafsError:
    """``started``: the answer had begun (its headers arrived) when ``e`` happened."""
    if isinstance(e, httpx.UnsupportedProtocol) or not isinstance(e, httpx.TransportError):
        return BackendError(f"{what}: {e}")  # a bad URL, too many redirects, bad encoding
    if isinstance(e, httpx.TimeoutException):
        return TransientError(f"{what}: timed out", error_class="timeout")
    cause = _cause(e)
    chain: BaseException | None = e
    while chain is not None and not isinstance(chain, ssl.SSLCertVerificationError):
        chain = chain.__cause__ or chain.__context__
    if chain is not None:  # no retry mends a certificate: a permanent failure
        reason = getattr(chain, "verify_message", None) or str(chain)
        return BackendError(f"{what}: TLS certificate verify failed ({reason}; a hosts.toml "
                            "ca or skip_verify may be wanted)")
    detail = f"{type(e).__name__}: {cause}" if cause is not None else type(e).__name__
    if started:
        return TransientError(f"{what}: the answer broke off ({detail})",
                              error_class="truncated")
    return TransientError(f"{what}: {detail}", error_class="connection")


@contextlib.contextmanager
def _mapped(what: str, started: bool = False) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as e:
        raise _transport_error(e, what, started) from None


def _content_range(response: httpx.Response) -> tuple[int, int, int | None] | None:
    """(first, last, total or None) of a 206 answer's ``Content-Range``."""
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", ""))
    if m is None or int(m.group(2)) < int(m.group(1)):
        return None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def _content_length(response: httpx.Response) -> int | None:
    try:
        return int(response.headers.get("content-length", ""))
    except ValueError:
        return None


def _manifest_url(repo: str, reference: str) -> str:
    """Paths are relative to an endpoint's API root (``/v2``): see ``_Core._request``."""
    return f"/{repo}/manifests/{reference}"


def _blob_url(repo: str, digest: str) -> str:
    return f"/{repo}/blobs/{check_digest(digest)}"


def _is_index(raw: bytes, content_type: str) -> bool:
    if content_type.split(";")[0].strip() in INDEX_TYPES:
        return True
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting
        return False
    return isinstance(value, dict) and (value.get("mediaType") in INDEX_TYPES
                                        or ("manifests" in value and "layers" not in value))


def _location(response: httpx.Response, what: str) -> str:
    """The upload URL an answer names, relative to the request it answers."""
    location = response.headers.get("location")
    if not location:
        raise BackendError(f"{what}: the registry sent no upload location")
    try:
        return str(response.url.join(location))
    except httpx.InvalidURL:
        raise BackendError(f"{what}: the registry sent a bad upload location") from None


class _Body:
    """A re-iterable request body from a file slice or bytes, so that a request
    repeated by the auth handshake sends the same bytes again."""

    def __init__(self, source: Path | bytes, offset: int = 0, length: int | None = None,
                 counters: RegistryCounters | None = None) -> None:
        self.source, self.offset = source, offset
        self.length = length if length is not None else (
            len(source) - offset if isinstance(source, bytes) else source.stat().st_size - offset)
        self.counters = counters

    def __iter__(self) -> Iterator[bytes]:
        if isinstance(self.source, bytes):
            pieces: Iterator[bytes] = iter([self.source[self.offset:self.offset + self.length]])
        else:
            pieces = self._file_pieces(self.source)
        for piece in pieces:
            if self.counters is not None:
                self.counters.bytes_out += len(piece)
            yield piece

    def _file_pieces(self, path: Path) -> Iterator[bytes]:
        with open(path, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left:
                piece = f.read(min(left, READ_PIECE))
                if not piece:
                    raise BackendError(f"{path} shrank while it was being uploaded")
                left -= len(piece)
                yield piece


class _Parts:
    """The pieces of a whole blob read into memory, up to ``limit`` bytes."""

    def __init__(self, limit: int, what: str) -> None:
        self.parts: list[bytes] = []
        self.size, self.limit, self.what = 0, limit, what

    def add(self, piece: bytes) -> None:
        self.size += len(piece)
        if self.size > self.limit:
            raise ImageError(f"{self.what} is larger than {self.limit} bytes")
        self.parts.append(piece)


# -- flows: the protocol, once ------------------------------------------------------


@dataclass(slots=True)
class _Send:
    """Send ``request`` to ``endpoint``; the result is its answer, body not yet read."""

    request: httpx.Request
    what: str
    endpoint: Endpoint


@dataclass(slots=True)
class _Read:
    """The next piece of ``response``'s body (b"" at its end)."""

    response: httpx.Response
    what: str


@dataclass(slots=True)
class _Sleep:
    seconds: float


@dataclass(slots=True)
class _Emit:
    """Hand ``data`` to whoever iterates the flow's driver (streaming flows)."""

    data: bytes


_Command = _Send | _Read | _Sleep | _Emit
Flow = Generator[_Command, Any, T]


class _Runner:
    """Steps a flow for a driver: iterating it gives the flow's commands; the driver
    answers each I/O command with ``reply`` (blocking) or ``areply`` (async), and
    finds the flow's result in ``value`` when the iteration ends."""

    __slots__ = ("_error", "_result", "flow", "value")

    def __init__(self, flow: Flow[Any]) -> None:
        self.flow = flow
        self.value: Any = None
        self._result: Any = None
        self._error: RafsError | None = None

    def __iter__(self) -> Iterator[_Command]:
        while True:
            result, error = self._result, self._error
            self._result = self._error = None
            try:
                command = self.flow.throw(error) if error is not None else self.flow.send(result)
            except StopIteration as stop:
                self.value = stop.value
                return
            yield command

    def reply(self, execute: Callable[..., Any], *args: Any) -> None:
        try:
            self._result = execute(*args)
        except RafsError as e:  # the flow decides: retry, map, or let it rise
            self._error = e

    async def areply(self, pending: Awaitable[Any]) -> None:
        try:
            self._result = await pending
        except RafsError as e:
            self._error = e

    def close(self) -> None:
        self.flow.close()


@dataclass(slots=True)
class _Cursor:
    """Where a blob read stands: the next byte wanted, and the end (exclusive; None
    until an answer tells the size of a read to the blob's end)."""

    pos: int
    end: int | None


class _Link:
    """The answer a running flow is reading; sending another request closes it."""

    __slots__ = ("endpoint", "pieces", "response")

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self.pieces: Any = None
        self.endpoint: Endpoint | None = None

    def pieces_of(self, response: httpx.Response) -> Any:
        if response is not self.response:
            raise BackendError("internal error: a flow read an answer it no longer holds")
        return self.pieces


class _Core:
    """What both clients are: configuration, endpoints, counters and the flows."""

    def __init__(self, registry: str, *, insecure: bool | None, creds: Credentials | None,
                 timeout: float, retry: RetryPolicy | None, chunk_threshold: int = CHUNK_THRESHOLD,
                 upload_chunk: int = UPLOAD_CHUNK, hosts: RegistryHosts | None = None,
                 hosts_dir: str | None = None) -> None:
        self.registry = registry
        self.hosts = hosts if hosts is not None else load_hosts(registry, hosts_dir,
                                                                insecure=insecure)
        self.endpoints = self.hosts.endpoints
        track = len(self.endpoints) > 1
        self.health = {e: EndpointHealth(e.name, role="server" if e.server else "mirror",
                                         track=track) for e in self.endpoints}
        self._auths = {e: RegistryAuth(e.host, self._credentials(e, creds), e.root)
                       for e in self.endpoints}
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.chunk_threshold = chunk_threshold
        self.upload_chunk = upload_chunk
        self.counters = RegistryCounters()
        self._warned_range: set[tuple[str, str]] = set()
        if track:
            log.info("%s: endpoints %s", registry, self.hosts.describe())

    @classmethod
    def for_ref(cls, ref: ImageRef, **kwargs: Any) -> Self:
        if ref.transport != "docker":
            raise ImageError(f"{ref} is not a registry reference")
        return cls(ref.registry, **kwargs)

    def _credentials(self, endpoint: Endpoint, explicit: Credentials | None
                     ) -> Credentials | None:
        """The registry's own server takes ``--creds`` (else what is stored for it);
        a mirror only what is stored for the mirror's host, as containerd looks
        credentials up by the host a request goes to."""
        if not endpoint.server:
            return load_credentials(endpoint.host)
        if explicit is not None:
            return explicit
        found = load_credentials(endpoint.host)
        if found is None and endpoint.host != self.registry:
            found = load_credentials(self.registry)
        return found

    def _tls(self, endpoint: Endpoint) -> ssl.SSLContext | bool:
        """The endpoint's TLS settings (``skip_verify``, ``ca``, ``client``)."""
        if not endpoint.custom_tls:
            return True
        where = f"{self.hosts.source or 'hosts.toml'}: {endpoint.name}"
        ctx = httpx.create_ssl_context()
        if endpoint.skip_verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        for ca in endpoint.ca:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(f"{where}: CA file {ca} is not usable: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        for cert, key in endpoint.client:
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as e:
                raise ConfigError(f"{where}: client certificate {cert} is not usable: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
        return ctx

    def _client_args(self, endpoint: Endpoint, max_connections: int) -> dict[str, Any]:
        timeout = httpx.Timeout(self.timeout, connect=endpoint.dial_timeout or self.timeout)
        return dict(auth=self._auths[endpoint], follow_redirects=True, timeout=timeout,
                    verify=self._tls(endpoint),
                    limits=httpx.Limits(max_connections=max_connections,
                                        max_keepalive_connections=max_connections),
                    headers={"User-Agent": "rafs"})

    # -- endpoints --

    @property
    def pull_endpoints(self) -> tuple[Endpoint, ...]:
        return self.hosts.serving("pull")

    def distrust(self, endpoint: Endpoint, reason: str) -> None:
        """Bytes ``endpoint`` sent did not match their digest (found by the caller)."""
        self.health[endpoint].failed(reason, digest=True)

    def _route(self, need: str, what: str) -> tuple[list[Endpoint], list[Endpoint]]:
        """The endpoints to try for an operation needing ``need``, in order, and the
        probes this claimed (down endpoints let through once)."""
        capable = self.hosts.serving(need)
        if not capable:
            raise ConfigError(f"{what}: no endpoint of {self.registry} may {need} "
                              f"({self.hosts.source}: none has that capability)")
        route, probes = [], []
        for e in capable[:-1]:
            health = self.health[e]
            was_up = health.up
            if health.usable():
                route.append(e)
                if not was_up:
                    probes.append(e)
        route.append(capable[-1])  # the last is always tried: there is nowhere else to go
        return route, probes

    # -- requests and answers --

    def _request(self, endpoint: Endpoint, method: str, url: str, **kwargs: Any
                 ) -> httpx.Request:
        """A request to ``url``: a path under ``endpoint``'s API root (``/REPO/...``),
        or an absolute URL (an upload location the registry sent)."""
        if not url.startswith(("http://", "https://")):
            if endpoint.host != self.registry:  # a mirror learns whose content is wanted
                kwargs["params"] = {**kwargs.get("params", {}), "ns": self.registry}
            url = endpoint.url + endpoint.root + url
        if endpoint.headers:  # hosts.toml's [header]: sent with every request
            given = httpx.Headers(kwargs.pop("headers", None) or {})
            kwargs["headers"] = httpx.Headers([*given.multi_items(), *endpoint.headers])
        return self._http_for(endpoint).build_request(method, url, **kwargs)

    def _http_for(self, endpoint: Endpoint) -> httpx.Client | httpx.AsyncClient:
        raise NotImplementedError

    def _retrying(self, what: str, attempt: Callable[[Endpoint], Flow[T]], *,
                  need: str = "pull", retry: RetryPolicy | None = None,
                  progress: Callable[[], int] | None = None) -> Flow[T]:
        """Run ``attempt(endpoint)`` on the endpoints that may serve ``need`` until it
        succeeds: a failure moves on to the next endpoint; when the last one failed
        transiently, the round is retried under the policy (``progress``, bytes
        received, restarts the count)."""
        backoff = (retry or self.retry).start(log)
        mark = progress() if progress else 0
        while True:
            route, probes = self._route(need, what)
            error: RafsError | None = None
            try:
                for n, endpoint in enumerate(route):
                    health = self.health[endpoint]
                    try:
                        result = yield from attempt(endpoint)
                    except (TransientError, DigestError) as e:
                        health.failed(str(e), digest=isinstance(e, DigestError))
                        error = e
                    except RafsError as e:  # an answer: the endpoint itself is fine
                        health.answered()
                        error = e
                    else:
                        health.succeeded()
                        return result
                    if n + 1 < len(route):
                        log.debug("%s: %s; trying %s", what, error, route[n + 1].name)
            finally:
                for endpoint in probes:
                    self.health[endpoint].release()
            assert error is not None
            if not isinstance(error, TransientError):
                raise error
            if progress is not None and progress() > mark:
                backoff.reset()
                mark = progress()
            delay = backoff.next(error)
            if delay is None:
                raise error
            self.counters.retries += 1
            yield _Sleep(delay)

    def _open(self, endpoint: Endpoint, method: str, url: str, what: str, *,
              ok: tuple[int, ...] = (200,), **kwargs: Any) -> Flow[httpx.Response]:
        """Send one request; an answer outside ``ok`` raises its error. The body is
        left to the caller."""
        response = yield _Send(self._request(endpoint, method, url, **kwargs), what, endpoint)
        if response.status_code not in ok:
            try:
                body = yield from self._body(response, what, MAX_SMALL_BODY)
            except TransientError:
                body = b""
            raise _answer_error(response, body, what)
        return response

    def _body(self, response: httpx.Response, what: str, limit: int,
              too_large: str | None = None) -> Flow[bytes]:
        """The body of ``response``, up to ``limit`` bytes: beyond that, ImageError
        ``too_large`` if given, else the rest is not read."""
        parts: list[bytes] = []
        size = 0
        while size <= limit and (piece := (yield _Read(response, what))):
            parts.append(piece)
            size += len(piece)
        if size > limit and too_large is not None:
            raise ImageError(too_large)
        return b"".join(parts)[:limit]

    def _exchange(self, endpoint: Endpoint, method: str, url: str, what: str, *,
                  ok: tuple[int, ...] = (200,), limit: int = MAX_SMALL_BODY,
                  too_large: str | None = None, **kwargs: Any
                  ) -> Flow[tuple[httpx.Response, bytes]]:
        """One request and its whole (small) answer."""
        response = yield from self._open(endpoint, method, url, what, ok=ok, **kwargs)
        body = yield from self._body(response, what, limit, too_large)
        return response, body

    # -- manifests --

    def _get_manifest(self, repo: str, reference: str) -> Flow[tuple[bytes, str, str]]:
        by_digest = reference.startswith("sha256:") or ":" in reference
        what = f"{repo}@{reference}" if by_digest else f"manifest {repo}:{reference}"

        def attempt(endpoint: Endpoint) -> Flow[tuple[bytes, str, str]]:
            response, raw = yield from self._exchange(
                endpoint, "GET", _manifest_url(repo, reference), what, limit=MAX_MANIFEST,
                too_large=f"{what}: the manifest is larger than {MAX_MANIFEST} bytes",
                headers={"Accept": ACCEPT_MANIFESTS})
            # checked here, so that a mirror that sends other bytes is passed over
            digest = verify_manifest(raw, reference if reference.startswith("sha256:")
                                     else None, what)
            verify_manifest(raw, response.headers.get("docker-content-digest"), what)
            return raw, response.headers.get("content-type", ""), digest

        # a tag is resolved only by endpoints trusted to; a digest vouches for itself
        return (yield from self._retrying(what, attempt,
                                          need="pull" if by_digest else "resolve"))

    def _resolve(self, ref: ImageRef) -> Flow[Manifest]:
        reference = ref.digest or ref.tag or "latest"
        raw, content_type, digest = yield from self._get_manifest(ref.repository, reference)
        if _is_index(raw, content_type):
            child = select_platform(raw, digest)
            raw, content_type, digest = yield from self._get_manifest(ref.repository,
                                                                      child.digest)
            if _is_index(raw, content_type):
                raise ImageError(f"{ref}: the platform entry of the index is another index")
        return parse_manifest(raw, digest)

    def _put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str
                      ) -> Flow[str]:
        what = f"manifest {repo}:{reference}"
        response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
            endpoint, "PUT", _manifest_url(repo, reference), what, ok=(200, 201, 202),
            content=raw, headers={"Content-Type": media_type}), need="push")
        digest = sha256_digest(raw)
        said = response.headers.get("docker-content-digest")
        if said and said != digest:
            raise DigestError(f"{what}: pushed {digest}, the registry stored {said}")
        return digest

    # -- blobs --

    def _head_blob(self, repo: str, digest: str, need: str = "pull") -> Flow[int | None]:
        what = f"blob {digest} in {repo}"
        try:
            response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
                endpoint, "HEAD", _blob_url(repo, digest), what), need=need)
        except ImageError:
            return None
        return _content_length(response) or 0

    def _blob(self, repo: str, digest: str, offset: int = 0, length: int | None = None, *,
              retry: RetryPolicy | None = None, sink: Callable[[bytes], None] | None = None,
              sources: list[tuple[int, Endpoint]] | None = None) -> Flow[None]:
        """Bytes ``[offset, offset+length)`` of a blob (to its end if ``length`` is
        None), emitted (or handed to ``sink``) as they arrive. A failure asks the
        next endpoint, then again under ``retry``, from the first byte not yet
        received; ``sources`` gets (blob offset, endpoint) where an endpoint took over."""
        what = f"blob {digest} in {repo}"
        cursor = _Cursor(offset, None if length is None else offset + length)
        if cursor.end is not None and cursor.end <= cursor.pos:
            return
        yield from self._retrying(
            what, lambda endpoint: self._blob_attempt(endpoint, repo, digest, cursor, what,
                                                      sink, sources),
            retry=retry, progress=lambda: cursor.pos)

    def _blob_attempt(self, endpoint: Endpoint, repo: str, digest: str, cursor: _Cursor,
                      what: str, sink: Callable[[bytes], None] | None,
                      sources: list[tuple[int, Endpoint]] | None) -> Flow[None]:
        ranged = cursor.pos > 0 or cursor.end is not None
        last = "" if cursor.end is None else str(cursor.end - 1)
        response = yield from self._open(
            endpoint, "GET", _blob_url(repo, digest), what, ok=(200, 206),
            headers={"Range": f"bytes={cursor.pos}-{last}"} if ranged else {})
        skip = self._check_range(response, endpoint, digest, cursor, ranged, what)
        if sources is not None:
            sources.append((cursor.pos, endpoint))
        while cursor.end is None or cursor.pos < cursor.end:
            piece = yield _Read(response, what)
            if not piece:
                break
            if skip:
                piece, skip = piece[skip:], max(0, skip - len(piece))
            if cursor.end is not None:
                piece = piece[:cursor.end - cursor.pos]
            if not piece:
                continue
            cursor.pos += len(piece)
            if sink is None:
                yield _Emit(piece)
            else:
                sink(piece)
        if cursor.end is not None and cursor.pos < cursor.end:
            raise TransientError(f"{what}: the answer ended at byte {cursor.pos} of "
                                 f"{cursor.end}", error_class="truncated")
        if response.status_code == 206 or not ranged:
            # See the body's end, so the connection goes back to the pool (the rest of
            # a whole blob sent to a Range request is not worth reading: it is dropped).
            with contextlib.suppress(TransientError):
                yield _Read(response, what)

    def _check_range(self, response: httpx.Response, endpoint: Endpoint, digest: str,
                     cursor: _Cursor, ranged: bool, what: str) -> int:
        """Check an answer against the range asked for, learn the end of a read to the
        blob's end; the number of bytes to skip at the start of the body."""
        if response.status_code == 200:
            if cursor.end is None and (size := _content_length(response)) is not None:
                cursor.end = size
            if not ranged:
                return 0
            self.counters.range_ignored += 1
            if (endpoint.name, digest) not in self._warned_range:
                self._warned_range.add((endpoint.name, digest))
                log.warning("%s ignored a Range request for %s and sent the whole blob",
                            endpoint.name, digest)
            return cursor.pos
        span = _content_range(response)
        if span is None or span[0] != cursor.pos:
            raise TransientError(f"{what}: the registry answered bytes "
                                 f"{response.headers.get('content-range')!r} to a request "
                                 f"for bytes {cursor.pos}-", error_class="range")
        if cursor.end is None:
            cursor.end = span[2] if span[2] is not None else span[1] + 1
        return 0

    def _get_blob(self, repo: str, digest: str, max_size: int) -> Flow[bytes]:
        """A whole blob, checked against its digest; bytes that do not match are asked
        for again from the next endpoint (the ones that sent them are distrusted)."""
        what = f"blob {digest} in {repo}"
        for tries_left in range(len(self.pull_endpoints) - 1, -1, -1):
            parts = _Parts(max_size, what)
            sources: list[tuple[int, Endpoint]] = []
            yield from self._blob(repo, digest, sink=parts.add, sources=sources)
            data = b"".join(parts.parts)
            if sha256_digest(data) == digest:
                return data
            senders = list(dict.fromkeys(e for _, e in sources))
            names = ", ".join(e.name for e in senders)
            for e in senders:
                self.distrust(e, f"{what} does not match its digest")
            if not tries_left or all(e is self.pull_endpoints[-1] for e in senders):
                raise DigestError(f"{what} from {names} does not match its digest")
            log.warning("%s from %s does not match its digest; fetching it again", what, names)
        raise AssertionError("unreachable")

    # -- uploads --

    def _push_blob(self, repo: str, digest: str, size: int, source: Path | bytes,
                   mount_from: str | None) -> Flow[bool]:
        digest = check_digest(digest)
        if (yield from self._head_blob(repo, digest, need="push")) is not None:
            log.debug("%s already has %s", repo, digest)
            return False
        what = f"upload of {digest} to {repo}"
        if mount_from:
            response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
                endpoint, "POST", f"/{repo}/blobs/uploads/", what, ok=(201, 202),
                params={"mount": digest, "from": mount_from}), need="push")
            if response.status_code == 201:
                log.debug("mounted %s into %s from %s", digest, repo, mount_from)
                return False
            yield from self._cancel(self.hosts.serving("push")[0], response)
            if not source:
                return True  # not mountable, and nothing to upload: the caller decides
        yield from self._retrying(what, lambda endpoint: self._upload(
            endpoint, repo, digest, size, source, what), need="push")
        return True

    def _cancel(self, endpoint: Endpoint, response: httpx.Response) -> Flow[None]:
        with contextlib.suppress(BackendError, ImageError):
            location = _location(response, "cancel upload")
            yield from self._exchange(endpoint, "DELETE", location, "cancel upload",
                                      ok=(200, 202, 204, 404))

    def _check_push(self, repo: str) -> Flow[None]:
        """Start an upload session in ``repo`` and cancel it: the registry answers, and
        our credentials may push there (a token scoped to push, in the bearer flow)."""
        what = f"push to {self.registry}/{repo}"
        response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
            endpoint, "POST", f"/{repo}/blobs/uploads/", what, ok=(201, 202)), need="push")
        yield from self._cancel(self.hosts.serving("push")[0], response)

    def _upload(self, endpoint: Endpoint, repo: str, digest: str, size: int,
                source: Path | bytes, what: str) -> Flow[None]:
        response, _ = yield from self._exchange(endpoint, "POST", f"/{repo}/blobs/uploads/",
                                                what, ok=(202,))
        location = _location(response, what)
        body: _Body | bytes = _Body(source, 0, size, self.counters)
        if size > self.chunk_threshold:
            for start in range(0, size, self.upload_chunk):
                length = min(self.upload_chunk, size - start)
                response, _ = yield from self._exchange(
                    endpoint, "PATCH", location, what, ok=(202,),
                    content=_Body(source, start, length, self.counters),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{start}-{start + length - 1}",
                             "Content-Length": str(length)})
                location = _location(response, what)
            body = b""
        done = str(httpx.URL(location).copy_merge_params({"digest": digest}))
        response, _ = yield from self._exchange(
            endpoint, "PUT", done, what, ok=(201,), content=body,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(size if isinstance(body, _Body) else 0)})
        said = response.headers.get("docker-content-digest")
        if said and said != digest:
            raise DigestError(f"{what}: the registry stored {said}")


# -- the drivers ---------------------------------------------------------------------


class RegistryClient(_Core):
    """A blocking client for one registry: the converter's, the runtime's and the
    snapshotter's. Transient failures are retried here, under ``retry``."""

    def __init__(self, registry: str, *, insecure: bool | None = None,
                 creds: Credentials | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, max_connections: int = 4,
                 chunk_threshold: int = CHUNK_THRESHOLD, upload_chunk: int = UPLOAD_CHUNK,
                 transport: httpx.BaseTransport | None = None,
                 hosts: RegistryHosts | None = None, hosts_dir: str | None = None) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retry=retry, chunk_threshold=chunk_threshold,
                         upload_chunk=upload_chunk, hosts=hosts, hosts_dir=hosts_dir)
        self._clients: dict[Endpoint, httpx.Client] = {}
        try:
            for e in self.endpoints:
                self._clients[e] = httpx.Client(**self._client_args(e, max_connections),
                                                transport=transport)
        except BaseException:
            self.close()
            raise

    def _http_for(self, endpoint: Endpoint) -> httpx.Client:
        return self._clients[endpoint]

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the operations --

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, content type, digest) of a manifest or index."""
        return self._run(self._get_manifest(repo, reference))

    def resolve(self, ref: ImageRef) -> Manifest:
        """The image manifest ``ref`` names, an index resolved to this platform."""
        return self._run(self._resolve(ref))

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store ``raw`` as ``repo:reference``; its digest."""
        return self._run(self._put_manifest(repo, reference, raw, media_type))

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The size of a blob the registry has in ``repo``, else None."""
        return self._run(self._head_blob(repo, digest))

    def get_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        """A whole blob (a config, a bootstrap), checked against ``digest``."""
        return self._run(self._get_blob(repo, digest, max_size))

    def open_blob(self, repo: str, digest: str) -> BinaryIO:
        """A stream of a blob's bytes that resumes (by Range) after transient failures.
        The caller verifies the digest (it is known only at the end)."""
        raw = _PieceReader(self._drive(self._blob(repo, digest)))
        return io.BufferedReader(raw, READ_PIECE)  # type: ignore[return-value]

    def stream_range(self, repo: str, digest: str, offset: int, length: int
                     ) -> Generator[bytes, None, None]:
        """Bytes ``[offset, offset+length)`` of a blob, in pieces as they arrive; one
        attempt, as ``AsyncRegistryClient.stream_range``."""
        return self._drive(self._blob(repo, digest, offset, length, retry=ONE_ATTEMPT))

    def push_blob(self, repo: str, digest: str, size: int, source: Path | bytes,
                  mount_from: str | None = None) -> bool:
        """Make ``repo`` hold the blob; True if its bytes were uploaded, False if the
        registry had it (or mounted it from ``mount_from``)."""
        return self._run(self._push_blob(repo, digest, size, source, mount_from))

    def check_push(self, repo: str) -> None:
        """Fail now (AuthError, BackendError, TransientError) unless ``repo`` takes
        pushes from us: before work whose result is to be pushed there."""
        self._run(self._check_push(repo))

    # -- running flows --

    def _run(self, flow: Flow[T]) -> T:
        driver = self._drive(flow)
        try:
            next(driver)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        driver.close()
        raise AssertionError("a flow emitted data to a caller that takes none")

    def _drive(self, flow: Flow[T]) -> Generator[bytes, None, T]:
        runner, link = _Runner(flow), _Link()
        try:
            for command in runner:
                if isinstance(command, _Emit):
                    yield command.data
                else:
                    runner.reply(self._execute, command, link)
            return runner.value  # type: ignore[no-any-return]
        finally:
            runner.close()
            self._release(link)

    def _execute(self, command: _Command, link: _Link) -> Any:
        if isinstance(command, _Send):
            self._release(link)
            self.counters.requests += 1
            self.health[command.endpoint].requests += 1
            with _mapped(command.what):
                link.response = self._clients[command.endpoint].send(command.request,
                                                                     stream=True)
            link.pieces = link.response.iter_bytes()
            link.endpoint = command.endpoint
            return link.response
        if isinstance(command, _Read):
            with _mapped(command.what, started=True):
                piece = next(link.pieces_of(command.response), b"")
            self.counters.bytes_in += len(piece)
            if link.endpoint is not None:
                self.health[link.endpoint].bytes += len(piece)
            return piece
        assert isinstance(command, _Sleep)
        time.sleep(command.seconds)
        return None

    @staticmethod
    def _release(link: _Link) -> None:
        if link.response is not None:
            link.pieces.close()
            link.response.close()
            link.response = link.pieces = None


class _PieceReader(io.RawIOBase):
    """A raw binary stream over an iterator of byte pieces (``open_blob``)."""

    def __init__(self, pieces: Generator[bytes, None, Any]) -> None:
        self._pieces = pieces
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._buf = memoryview(piece)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._pieces.close()
        super().close()


class AsyncRegistryClient(_Core):
    """An async client for one registry (the daemon's, under trio). Manifests and whole
    blobs are retried here; ``stream_range`` is one attempt (the fetcher retries)."""

    def __init__(self, registry: str, *, insecure: bool | None = None,
                 creds: Credentials | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retry: RetryPolicy | None = None, max_connections: int = 8,
                 transport: httpx.AsyncBaseTransport | None = None,
                 hosts: RegistryHosts | None = None, hosts_dir: str | None = None) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retry=retry, hosts=hosts, hosts_dir=hosts_dir)
        # built before any can fail: an AsyncClient holds nothing until it is used
        args = [self._client_args(e, max_connections) for e in self.endpoints]
        self._clients: dict[Endpoint, httpx.AsyncClient] = {
            e: httpx.AsyncClient(**a, transport=transport)
            for e, a in zip(self.endpoints, args, strict=True)}

    def _http_for(self, endpoint: Endpoint) -> httpx.AsyncClient:
        return self._clients[endpoint]

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    # -- the operations --

    async def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, content type, digest) of a manifest or index."""
        return await self._run(self._get_manifest(repo, reference))

    async def resolve(self, ref: ImageRef) -> Manifest:
        """The image manifest ``ref`` names, an index resolved to this platform."""
        return await self._run(self._resolve(ref))

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """The size of a blob the registry has in ``repo``, else None."""
        return await self._run(self._head_blob(repo, digest))

    async def get_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        """A whole blob (the bootstrap), checked against ``digest``; resumed and
        retried under the client's policy."""
        return await self._run(self._get_blob(repo, digest, max_size))

    def stream_range(self, repo: str, digest: str, offset: int, length: int, *,
                     sources: list[tuple[int, Endpoint]] | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Bytes ``[offset, offset+length)`` of a blob, in pieces as they arrive.
        One attempt on each endpoint in turn: a failure of the last raises
        (``TransientError`` if worth retrying); a stream that raises after some
        pieces has delivered only right bytes. ``sources`` gets (blob offset,
        endpoint) at each endpoint that began sending."""
        return self._drive(self._blob(repo, digest, offset, length, retry=ONE_ATTEMPT,
                                      sources=sources))

    # -- running flows --

    async def _run(self, flow: Flow[T]) -> T:
        done: list[Any] = []
        async with contextlib.aclosing(self._drive(flow, done)) as driver:
            async for _ in driver:
                raise AssertionError("a flow emitted data to a caller that takes none")
        return done[0]  # type: ignore[no-any-return]

    async def _drive(self, flow: Flow[Any], done: list[Any] | None = None
                     ) -> AsyncGenerator[bytes, None]:
        runner, link = _Runner(flow), _Link()
        try:
            for command in runner:
                if isinstance(command, _Emit):
                    yield command.data
                    continue
                began = time.monotonic()
                try:
                    await runner.areply(self._execute(command, link))
                except anyio.get_cancelled_exc_class():
                    self._cancelled(command, link, time.monotonic() - began)
                    raise
            if done is not None:
                done.append(runner.value)
        finally:
            runner.close()
            await self._release(link)

    def _cancelled(self, command: _Command, link: _Link, waited: float) -> None:
        """The caller gave up on a request (the fetcher's idle timeout, or a shutdown):
        after waiting most of a timeout for the endpoint, that is the endpoint's stall."""
        endpoint = command.endpoint if isinstance(command, _Send) else (
            link.endpoint if isinstance(command, _Read) else None)
        if endpoint is not None and waited >= STALL_FRACTION * self.timeout:
            self.health[endpoint].failed(f"no answer for {waited:.0f}s", stall=True)

    async def _execute(self, command: _Command, link: _Link) -> Any:
        if isinstance(command, _Send):
            await self._release(link)
            self.counters.requests += 1
            self.health[command.endpoint].requests += 1
            with _mapped(command.what):
                link.response = await self._clients[command.endpoint].send(command.request,
                                                                           stream=True)
            link.pieces = link.response.aiter_bytes()
            link.endpoint = command.endpoint
            return link.response
        if isinstance(command, _Read):
            with _mapped(command.what, started=True):
                piece = await anext(link.pieces_of(command.response), b"")
            self.counters.bytes_in += len(piece)
            if link.endpoint is not None:
                self.health[link.endpoint].bytes += len(piece)
            return piece
        assert isinstance(command, _Sleep)
        await anyio.sleep(command.seconds)
        return None

    @staticmethod
    async def _release(link: _Link) -> None:
        if link.response is not None:
            await link.pieces.aclose()
            await link.response.aclose()
            link.response = link.pieces = None


# -- images ------------------------------------------------------------------------


def fetch_bootstrap(client: RegistryClient, ref: ImageRef) -> tuple[Manifest, bytes]:
    """The manifest and the verified, uncompressed bootstrap of the RAFS image ``ref``."""
    manifest = client.resolve(ref)
    desc = bootstrap_layer(manifest, str(ref))
    payload = client.get_blob(ref.repository, desc.digest, desc.size)
    boot = verify_bootstrap(manifest, payload, manifest_digest=ref.digest, name=str(ref))
    log.debug("bootstrap of %s: %d bytes (%s)", ref, len(boot.raw), boot.digest)
    return manifest, boot.raw
