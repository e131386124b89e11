"""The OCI distribution API client, shared by the converter and the daemon.

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
  chunked PATCH sequence;
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

Endpoints: each attempt that ``_retrying`` runs is handed the endpoint (base
URL) to send to; today that is the registry itself. Mirrors slot in there (a
list of endpoints per registry, and the fallback between them in
``_retrying``); request URLs are built from the endpoint by ``_request``.

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
from .errors import (
    AuthError,
    BackendError,
    DigestError,
    ImageError,
    RafsError,
    TransientError,
)
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

__all__ = ["AsyncRegistryClient", "RegistryClient", "RegistryCounters", "fetch_bootstrap",
           "registry_url"]

log = logging.getLogger(__name__)

ACCEPT_MANIFESTS = ", ".join([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX,
                              MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST])
MAX_MANIFEST = 4 << 20
MAX_SMALL_BODY = 64 << 10  # error bodies and answers whose body rafs does not use
CHUNK_THRESHOLD = 64 << 20  # uploads larger than this go in PATCH chunks of UPLOAD_CHUNK
UPLOAD_CHUNK = 16 << 20
READ_PIECE = 1 << 20
DEFAULT_TIMEOUT = 30.0
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
ONE_ATTEMPT = RetryPolicy(retries=0)

T = TypeVar("T")


def registry_url(registry: str, insecure: bool | None = None) -> str:
    """``http://`` for a local registry (or when ``insecure``), ``https://`` otherwise."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    plain = insecure if insecure is not None else host in LOCAL_HOSTS
    if registry == "docker.io":
        registry = "registry-1.docker.io"
    return f"{'http' if plain else 'https'}://{registry}"


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
    except (ValueError, AttributeError, IndexError, KeyError, TypeError):
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


def _transport_error(e: httpx.HTTPError, what: str, started: bool) -> RafsError:
    """``started``: the answer had begun (its headers arrived) when ``e`` happened."""
    if isinstance(e, httpx.UnsupportedProtocol) or not isinstance(e, httpx.TransportError):
        return BackendError(f"{what}: {e}")  # a bad URL, too many redirects, bad encoding
    if isinstance(e, httpx.TimeoutException):
        return TransientError(f"{what}: timed out", error_class="timeout")
    if started:
        return TransientError(f"{what}: the answer broke off ({type(e).__name__}: {e})",
                              error_class="truncated")
    return TransientError(f"{what}: {type(e).__name__}: {e}", error_class="connection")


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
    return f"/v2/{repo}/manifests/{reference}"


def _blob_url(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{check_digest(digest)}"


def _is_index(raw: bytes, content_type: str) -> bool:
    if content_type.split(";")[0].strip() in INDEX_TYPES:
        return True
    try:
        value = json.loads(raw)
    except ValueError:
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


# -- flows: the protocol, once ------------------------------------------------------


@dataclass(slots=True)
class _Send:
    """Send ``request``; the result is its answer, body not yet read."""

    request: httpx.Request
    what: str


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

    __slots__ = ("pieces", "response")

    def __init__(self) -> None:
        self.response: httpx.Response | None = None
        self.pieces: Any = None

    def pieces_of(self, response: httpx.Response) -> Any:
        if response is not self.response:
            raise BackendError("internal error: a flow read an answer it no longer holds")
        return self.pieces


class _Core:
    """What both clients are: configuration, counters and the flows."""

    def __init__(self, registry: str, *, insecure: bool | None, creds: Credentials | None,
                 timeout: float, retry: RetryPolicy | None, chunk_threshold: int = CHUNK_THRESHOLD,
                 upload_chunk: int = UPLOAD_CHUNK) -> None:
        self.registry = registry
        self.base_url = registry_url(registry, insecure)
        self.auth = RegistryAuth(registry, load_credentials(registry, creds))
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.chunk_threshold = chunk_threshold
        self.upload_chunk = upload_chunk
        self.counters = RegistryCounters()
        self._warned_range: set[str] = set()
        self._http: httpx.Client | httpx.AsyncClient

    @classmethod
    def for_ref(cls, ref: ImageRef, **kwargs: Any) -> Self:
        if ref.transport != "docker":
            raise ImageError(f"{ref} is not a registry reference")
        return cls(ref.registry, **kwargs)

    def _client_args(self, max_connections: int) -> dict[str, Any]:
        return dict(auth=self.auth, follow_redirects=True, timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=max_connections,
                                        max_keepalive_connections=max_connections),
                    headers={"User-Agent": "rafs"})

    # -- requests and answers --

    def _request(self, endpoint: str, method: str, url: str, **kwargs: Any) -> httpx.Request:
        """A request to ``url`` (a path on ``endpoint``, or an absolute URL)."""
        return self._http.build_request(method, httpx.URL(endpoint).join(url), **kwargs)

    def _retrying(self, what: str, attempt: Callable[[str], Flow[T]], *,
                  retry: RetryPolicy | None = None,
                  progress: Callable[[], int] | None = None) -> Flow[T]:
        """Run ``attempt(endpoint)`` until it succeeds, retrying transient failures
        under the policy; ``progress`` (bytes received) restarts the count."""
        backoff = (retry or self.retry).start(log)
        mark = progress() if progress else 0
        while True:
            try:
                return (yield from attempt(self.base_url))
            except TransientError as e:
                if progress is not None and progress() > mark:
                    backoff.reset()
                    mark = progress()
                delay = backoff.next(e)
                if delay is None:
                    raise
                self.counters.retries += 1
                yield _Sleep(delay)

    def _open(self, endpoint: str, method: str, url: str, what: str, *,
              ok: tuple[int, ...] = (200,), **kwargs: Any) -> Flow[httpx.Response]:
        """Send one request; an answer outside ``ok`` raises its error. The body is
        left to the caller."""
        response = yield _Send(self._request(endpoint, method, url, **kwargs), what)
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

    def _exchange(self, endpoint: str, method: str, url: str, what: str, *,
                  ok: tuple[int, ...] = (200,), limit: int = MAX_SMALL_BODY,
                  too_large: str | None = None, **kwargs: Any
                  ) -> Flow[tuple[httpx.Response, bytes]]:
        """One request and its whole (small) answer."""
        response = yield from self._open(endpoint, method, url, what, ok=ok, **kwargs)
        body = yield from self._body(response, what, limit, too_large)
        return response, body

    # -- manifests --

    def _get_manifest(self, repo: str, reference: str) -> Flow[tuple[bytes, str, str]]:
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"{repo}@{reference}"
        response, raw = yield from self._retrying(what, lambda endpoint: self._exchange(
            endpoint, "GET", _manifest_url(repo, reference), what, limit=MAX_MANIFEST,
            too_large=f"{what}: the manifest is larger than {MAX_MANIFEST} bytes",
            headers={"Accept": ACCEPT_MANIFESTS}))
        digest = verify_manifest(raw, reference if reference.startswith("sha256:") else None,
                                 what)
        verify_manifest(raw, response.headers.get("docker-content-digest"), what)
        return raw, response.headers.get("content-type", ""), digest

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
            content=raw, headers={"Content-Type": media_type}))
        digest = sha256_digest(raw)
        said = response.headers.get("docker-content-digest")
        if said and said != digest:
            raise DigestError(f"{what}: pushed {digest}, the registry stored {said}")
        return digest

    # -- blobs --

    def _head_blob(self, repo: str, digest: str) -> Flow[int | None]:
        what = f"blob {digest} in {repo}"
        try:
            response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
                endpoint, "HEAD", _blob_url(repo, digest), what))
        except ImageError:
            return None
        return _content_length(response) or 0

    def _blob(self, repo: str, digest: str, offset: int = 0, length: int | None = None, *,
              retry: RetryPolicy | None = None,
              sink: Callable[[bytes], None] | None = None) -> Flow[None]:
        """Bytes ``[offset, offset+length)`` of a blob (to its end if ``length`` is
        None), emitted (or handed to ``sink``) as they arrive. A transient failure
        asks again from the first byte not yet received, under ``retry``."""
        what = f"blob {digest} in {repo}"
        cursor = _Cursor(offset, None if length is None else offset + length)
        if cursor.end is not None and cursor.end <= cursor.pos:
            return
        yield from self._retrying(
            what, lambda endpoint: self._blob_attempt(endpoint, repo, digest, cursor, what,
                                                      sink),
            retry=retry, progress=lambda: cursor.pos)

    def _blob_attempt(self, endpoint: str, repo: str, digest: str, cursor: _Cursor, what: str,
                      sink: Callable[[bytes], None] | None) -> Flow[None]:
        ranged = cursor.pos > 0 or cursor.end is not None
        last = "" if cursor.end is None else str(cursor.end - 1)
        response = yield from self._open(
            endpoint, "GET", _blob_url(repo, digest), what, ok=(200, 206),
            headers={"Range": f"bytes={cursor.pos}-{last}"} if ranged else {})
        skip = self._check_range(response, digest, cursor, ranged, what)
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

    def _check_range(self, response: httpx.Response, digest: str, cursor: _Cursor,
                     ranged: bool, what: str) -> int:
        """Check an answer against the range asked for, learn the end of a read to the
        blob's end; the number of bytes to skip at the start of the body."""
        if response.status_code == 200:
            if cursor.end is None and (size := _content_length(response)) is not None:
                cursor.end = size
            if not ranged:
                return 0
            self.counters.range_ignored += 1
            if digest not in self._warned_range:
                self._warned_range.add(digest)
                log.warning("%s ignored a Range request for %s and sent the whole blob",
                            self.registry, digest)
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
        what = f"blob {digest} in {repo}"
        parts: list[bytes] = []
        size = 0

        def sink(piece: bytes) -> None:
            nonlocal size
            size += len(piece)
            if size > max_size:
                raise ImageError(f"{what} is larger than {max_size} bytes")
            parts.append(piece)

        yield from self._blob(repo, digest, sink=sink)
        data = b"".join(parts)
        if sha256_digest(data) != digest:
            raise DigestError(f"{what} from {self.registry} does not match its digest")
        return data

    # -- uploads --

    def _push_blob(self, repo: str, digest: str, size: int, source: Path | bytes,
                   mount_from: str | None) -> Flow[bool]:
        digest = check_digest(digest)
        if (yield from self._head_blob(repo, digest)) is not None:
            log.debug("%s already has %s", repo, digest)
            return False
        what = f"upload of {digest} to {repo}"
        if mount_from:
            response, _ = yield from self._retrying(what, lambda endpoint: self._exchange(
                endpoint, "POST", f"/v2/{repo}/blobs/uploads/", what, ok=(201, 202),
                params={"mount": digest, "from": mount_from}))
            if response.status_code == 201:
                log.debug("mounted %s into %s from %s", digest, repo, mount_from)
                return False
            yield from self._cancel(response)
            if not source:
                return True  # not mountable, and nothing to upload: the caller decides
        yield from self._retrying(what, lambda endpoint: self._upload(
            endpoint, repo, digest, size, source, what))
        return True

    def _cancel(self, response: httpx.Response) -> Flow[None]:
        with contextlib.suppress(BackendError, ImageError):
            location = _location(response, "cancel upload")
            yield from self._exchange(location, "DELETE", location, "cancel upload",
                                      ok=(200, 202, 204, 404))

    def _upload(self, endpoint: str, repo: str, digest: str, size: int, source: Path | bytes,
                what: str) -> Flow[None]:
        response, _ = yield from self._exchange(endpoint, "POST", f"/v2/{repo}/blobs/uploads/",
                                                what, ok=(202,))
        location = _location(response, what)
        body: _Body | bytes = _Body(source, 0, size, self.counters)
        if size > self.chunk_threshold:
            for start in range(0, size, self.upload_chunk):
                length = min(self.upload_chunk, size - start)
                response, _ = yield from self._exchange(
                    location, "PATCH", location, what, ok=(202,),
                    content=_Body(source, start, length, self.counters),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{start}-{start + length - 1}",
                             "Content-Length": str(length)})
                location = _location(response, what)
            body = b""
        done = str(httpx.URL(location).copy_merge_params({"digest": digest}))
        response, _ = yield from self._exchange(
            done, "PUT", done, what, ok=(201,), content=body,
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
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retry=retry, chunk_threshold=chunk_threshold,
                         upload_chunk=upload_chunk)
        self._http = httpx.Client(**self._client_args(max_connections), transport=transport)

    def close(self) -> None:
        self._http.close()

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
            with _mapped(command.what):
                link.response = self._http.send(command.request, stream=True)
            link.pieces = link.response.iter_bytes()
            self.counters.requests += 1
            return link.response
        if isinstance(command, _Read):
            with _mapped(command.what, started=True):
                piece = next(link.pieces_of(command.response), b"")
            self.counters.bytes_in += len(piece)
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
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retry=retry)
        self._http = httpx.AsyncClient(**self._client_args(max_connections),
                                       transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

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

    def stream_range(self, repo: str, digest: str, offset: int, length: int
                     ) -> AsyncGenerator[bytes, None]:
        """Bytes ``[offset, offset+length)`` of a blob, in pieces as they arrive.
        One attempt: a failure raises (``TransientError`` if worth retrying); a
        stream that raises after some pieces has delivered only right bytes."""
        return self._drive(self._blob(repo, digest, offset, length, retry=ONE_ATTEMPT))

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
                else:
                    await runner.areply(self._execute(command, link))
            if done is not None:
                done.append(runner.value)
        finally:
            runner.close()
            await self._release(link)

    async def _execute(self, command: _Command, link: _Link) -> Any:
        if isinstance(command, _Send):
            await self._release(link)
            with _mapped(command.what):
                link.response = await self._http.send(command.request, stream=True)
            link.pieces = link.response.aiter_bytes()
            self.counters.requests += 1
            return link.response
        if isinstance(command, _Read):
            with _mapped(command.what, started=True):
                piece = await anext(link.pieces_of(command.response), b"")
            self.counters.bytes_in += len(piece)
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
