"""The OCI distribution API client, shared by the converter and the daemon.

This module owns how rafs talks to a registry (on httpx):

- manifests by tag or digest: OCI manifest and index, Docker schema 2 and
  manifest list; an index resolves to this machine's platform; a manifest
  fetched by digest must match it;
- blobs: HEAD, GET (whole, verified, size-capped), streamed GET that resumes
  with a Range request after a transient failure, and Range reads streamed in
  pieces. A server that ignores Range and answers 200 with the whole blob
  still yields the right bytes (skipped up to the offset), with a warning and
  a counter;
- uploads: a HEAD first (a blob the registry has is never sent twice), a
  cross-repository mount when the blob lives in another repository of the
  same registry, else a monolithic PUT or, above ``chunk_threshold``, a
  chunked PATCH sequence;
- transport policy: plain HTTP for localhost and 127.0.0.1 (as containerd
  does), HTTPS elsewhere unless ``insecure``; redirects followed (httpx drops
  Authorization when a redirect leaves the host); authentication through
  ``rafs.auth.RegistryAuth``;
- the one mapping from HTTP answers and transport failures to the rafs error
  tree: 401/403 ``AuthError``, 404 ``ImageError``, 429/5xx/resets/timeouts/
  truncated bodies ``TransientError`` (with ``error_class`` and the server's
  ``Retry-After``).

``RegistryClient`` (blocking; retries transient failures itself with
exponential backoff and jitter) serves the converter; ``AsyncRegistryClient``
(trio, via httpx/anyio) serves the daemon, whose fetcher owns retries.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import io
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

import httpx

from . import codec
from .auth import RegistryAuth
from .credentials import Credentials, load_credentials
from .errors import AuthError, BackendError, DigestError, ImageError, TransientError
from .oci import (
    ANNOTATION_RAFS_BOOTSTRAP_DIGEST,
    INDEX_TYPES,
    MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
    ImageRef,
    Manifest,
    bootstrap_descriptor,
    check_digest,
    is_rafs,
    parse_manifest,
    select_platform,
    sha256_digest,
)

__all__ = ["AsyncRegistryClient", "RegistryClient", "RegistryCounters", "fetch_bootstrap",
           "registry_url"]

log = logging.getLogger(__name__)

ACCEPT_MANIFESTS = ", ".join([MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_INDEX,
                              MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_LIST])
MAX_MANIFEST = 4 << 20
CHUNK_THRESHOLD = 64 << 20  # uploads larger than this go in PATCH chunks of UPLOAD_CHUNK
UPLOAD_CHUNK = 16 << 20
READ_PIECE = 1 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

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


def _registry_message(response: httpx.Response) -> str:
    """The registry's own words from an error body: ``CODE: message``."""
    try:
        errors = json.loads(response.content[:65536]).get("errors")
        first = errors[0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, IndexError, KeyError, TypeError, RecursionError,
            httpx.ResponseNotRead):
        text = ""
    return text[:200] or response.reason_phrase or f"HTTP {response.status_code}"


def _answer_error(response: httpx.Response, what: str) -> Exception:
    status = response.status_code
    message = _registry_message(response)
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


def _transport_error(e: httpx.HTTPError, what: str) -> TransientError:
    if isinstance(e, httpx.TimeoutException):
        return TransientError(f"{what}: timed out", error_class="timeout")
    if isinstance(e, httpx.RemoteProtocolError):
        return TransientError(f"{what}: the connection broke mid-answer ({e})",
                              error_class="truncated")
    return TransientError(f"{what}: {type(e).__name__}: {e}", error_class="connection")


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError as e:
        if isinstance(e, httpx.UnsupportedProtocol | httpx.InvalidURL):
            raise BackendError(f"{what}: {e}") from None
        raise _transport_error(e, what) from None


def _content_range_start(response: httpx.Response) -> int | None:
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", ""))
    return int(m.group(1)) if m else None


def _manifest_url(repo: str, reference: str) -> str:
    return f"/v2/{repo}/manifests/{reference}"


def _blob_url(repo: str, digest: str) -> str:
    return f"/v2/{repo}/blobs/{check_digest(digest)}"


def _read_manifest(response: httpx.Response, reference: str, what: str) -> tuple[bytes, str]:
    """Check a manifest answer: its bytes and its digest."""
    raw = response.content
    if len(raw) > MAX_MANIFEST:
        raise ImageError(f"{what}: the manifest is larger than {MAX_MANIFEST} bytes")
    digest = sha256_digest(raw)
    if reference.startswith("sha256:") and digest != reference:
        raise DigestError(f"{what}: the registry sent a manifest with digest {digest}")
    header = response.headers.get("docker-content-digest")
    if header and header.startswith("sha256:") and header != digest:
        raise DigestError(f"{what}: the manifest is {digest}, the registry says {header}")
    return raw, digest


def _is_index(raw: bytes, content_type: str) -> bool:
    if content_type.split(";")[0].strip() in INDEX_TYPES:
        return True
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting
        return False
    return isinstance(value, dict) and (value.get("mediaType") in INDEX_TYPES
                                        or ("manifests" in value and "layers" not in value))


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


class _Base:
    def __init__(self, registry: str, *, insecure: bool | None, creds: Credentials | None,
                 timeout: float, retries: int) -> None:
        self.registry = registry
        self.base_url = registry_url(registry, insecure)
        self.auth = RegistryAuth(registry, load_credentials(registry, creds))
        self.timeout = timeout
        self.retries = retries
        self.counters = RegistryCounters()
        self._warned_range: set[str] = set()

    def _client_args(self, max_connections: int) -> dict[str, Any]:
        return dict(base_url=self.base_url, auth=self.auth, follow_redirects=True,
                    timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=max_connections,
                                        max_keepalive_connections=max_connections),
                    headers={"User-Agent": "rafs"})

    def _range_ignored(self, digest: str) -> None:
        self.counters.range_ignored += 1
        if digest not in self._warned_range:
            self._warned_range.add(digest)
            log.warning("%s ignored a Range request for %s and sent the whole blob",
                        self.registry, digest)

    def _backoff(self, attempt: int, error: TransientError) -> float:
        delay = min(10.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0)
        if error.retry_after is not None:
            delay = max(delay, min(error.retry_after, 60.0))
        return delay


class RegistryClient(_Base):
    """A blocking client for one registry; transient failures are retried here."""

    def __init__(self, registry: str, *, insecure: bool | None = None,
                 creds: Credentials | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, max_connections: int = 4,
                 chunk_threshold: int = CHUNK_THRESHOLD, upload_chunk: int = UPLOAD_CHUNK) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retries=retries)
        self.chunk_threshold = chunk_threshold
        self.upload_chunk = upload_chunk
        self._http = httpx.Client(**self._client_args(max_connections))

    @classmethod
    def for_ref(cls, ref: ImageRef, **kwargs: Any) -> Self:
        if ref.transport != "docker":
            raise ImageError(f"{ref} is not a registry reference")
        return cls(ref.registry, **kwargs)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- plumbing --

    def _retrying(self, what: str, attempt_fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return attempt_fn()
            except TransientError as e:
                if attempt == self.retries:
                    raise
                delay = self._backoff(attempt, e)
                self.counters.retries += 1
                log.info("%s; retrying in %.1fs", e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _request(self, method: str, url: str | httpx.URL, what: str, *,
                 ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        with _mapped(what):
            response = self._http.request(method, url, **kwargs)
        self.counters.requests += 1
        self.counters.bytes_in += len(response.content)
        if response.status_code not in ok:
            raise _answer_error(response, what)
        return response

    # -- manifests --

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(raw bytes, content type, digest) of a manifest or index."""
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"{repo}@{reference}"
        response = self._retrying(what, lambda: self._request(
            "GET", _manifest_url(repo, reference), what, headers={"Accept": ACCEPT_MANIFESTS}))
        raw, digest = _read_manifest(response, reference, what)
        return raw, response.headers.get("content-type", ""), digest

    def resolve(self, ref: ImageRef) -> Manifest:
        """The image manifest ``ref`` names, an index resolved to this platform."""
        reference = ref.digest or ref.tag or "latest"
        raw, content_type, digest = self.get_manifest(ref.repository, reference)
        if _is_index(raw, content_type):
            child = select_platform(raw, digest)
            raw, content_type, digest = self.get_manifest(ref.repository, child.digest)
            if _is_index(raw, content_type):
                raise ImageError(f"{ref}: the platform entry of the index is another index")
        return parse_manifest(raw, digest)

    def put_manifest(self, repo: str, reference: str, raw: bytes, media_type: str) -> str:
        what = f"manifest {repo}:{reference}"
        response = self._retrying(what, lambda: self._request(
            "PUT", _manifest_url(repo, reference), what, ok=(200, 201, 202),
            content=raw, headers={"Content-Type": media_type}))
        digest = sha256_digest(raw)
        said = response.headers.get("docker-content-digest")
        if said and said != digest:
            raise DigestError(f"{what}: pushed {digest}, the registry stored {said}")
        return digest

    # -- blobs --

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The size of a blob the registry has in ``repo``, else None."""
        what = f"blob {digest} in {repo}"
        try:
            response = self._retrying(what, lambda: self._request(
                "HEAD", _blob_url(repo, digest), what))
        except ImageError:
            return None
        try:
            return int(response.headers.get("content-length", ""))
        except ValueError:
            return 0

    def get_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        """A whole blob (a config, a bootstrap), checked against ``digest``."""
        with self.open_blob(repo, digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise ImageError(f"blob {digest} is larger than {max_size} bytes")
        if sha256_digest(data) != digest:
            raise DigestError(f"blob {digest} from {self.registry} does not match its digest")
        return data

    def open_blob(self, repo: str, digest: str) -> BinaryIO:
        """A stream of a blob's bytes that resumes (by Range) after transient failures.
        The caller verifies the digest (it is known only at the end)."""
        return io.BufferedReader(_BlobReader(self, repo, digest), READ_PIECE)  # type: ignore[return-value]

    def push_blob(self, repo: str, digest: str, size: int, source: Path | bytes,
                  mount_from: str | None = None) -> bool:
        """Make ``repo`` hold the blob; True if its bytes were uploaded, False if the
        registry had it (or mounted it from ``mount_from``)."""
        digest = check_digest(digest)
        if self.head_blob(repo, digest) is not None:
            log.debug("%s already has %s", repo, digest)
            return False
        what = f"upload of {digest} to {repo}"
        if mount_from:
            response = self._retrying(what, lambda: self._request(
                "POST", f"/v2/{repo}/blobs/uploads/", what, ok=(201, 202),
                params={"mount": digest, "from": mount_from}))
            if response.status_code == 201:
                log.debug("mounted %s into %s from %s", digest, repo, mount_from)
                return False
            self._cancel(response)
            if not source:
                return True  # not mountable, and nothing to upload: the caller decides
        self._retrying(what, lambda: self._upload(repo, digest, size, source, what))
        return True

    def _cancel(self, response: httpx.Response) -> None:
        location = response.headers.get("location")
        if location:
            with contextlib.suppress(BackendError, ImageError, AuthError):
                self._request("DELETE", location, "cancel upload", ok=(204, 200, 202, 404))

    def _upload(self, repo: str, digest: str, size: int, source: Path | bytes,
                what: str) -> None:
        response = self._request("POST", f"/v2/{repo}/blobs/uploads/", what, ok=(202,))
        location = self._location(response, what)
        if size > self.chunk_threshold:
            for start in range(0, size, self.upload_chunk):
                length = min(self.upload_chunk, size - start)
                response = self._request(
                    "PATCH", location, what, ok=(202,),
                    content=_Body(source, start, length, self.counters),
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Range": f"{start}-{start + length - 1}",
                             "Content-Length": str(length)})
                location = self._location(response, what)
            body: _Body | bytes = b""
        else:
            body = _Body(source, 0, size, self.counters)
        url = httpx.URL(location).copy_merge_params({"digest": digest})
        response = self._request(
            "PUT", url, what, ok=(201,), content=body,
            headers={"Content-Type": "application/octet-stream",
                     "Content-Length": str(size if isinstance(body, _Body) else 0)})
        said = response.headers.get("docker-content-digest")
        if said and said != digest:
            raise DigestError(f"{what}: the registry stored {said}")

    def _location(self, response: httpx.Response, what: str) -> str:
        location = response.headers.get("location")
        if not location:
            raise BackendError(f"{what}: the registry sent no upload location")
        return str(self._http.base_url.join(location))


class _BlobReader(io.RawIOBase):
    """The raw stream behind ``RegistryClient.open_blob``."""

    def __init__(self, client: RegistryClient, repo: str, digest: str) -> None:
        self.client, self.repo, self.digest = client, repo, digest
        self.what = f"blob {digest} in {repo}"
        self.pos = 0
        self.total: int | None = None
        self._stack = contextlib.ExitStack()
        self._pieces: Iterator[bytes] | None = None
        self._buf = b""
        self._failures = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        with _mapped(self.what):
            response = self._stack.enter_context(self.client._http.stream(
                "GET", _blob_url(self.repo, self.digest), headers=headers))
        self.client.counters.requests += 1
        if response.status_code not in (200, 206):
            response.read()
            raise _answer_error(response, self.what)
        skip = 0
        if self.pos and response.status_code == 200:
            self.client._range_ignored(self.digest)
            skip = self.pos
        elif self.pos and _content_range_start(response) != self.pos:
            raise TransientError(f"{self.what}: the registry answered the wrong range",
                                 error_class="range")
        if self.total is None and response.status_code == 200:
            with contextlib.suppress(ValueError):
                self.total = int(response.headers.get("content-length", ""))
        self._pieces = self._skip(response.iter_bytes(READ_PIECE), skip)

    @staticmethod
    def _skip(pieces: Iterator[bytes], skip: int) -> Iterator[bytes]:
        for piece in pieces:
            if skip >= len(piece):
                skip -= len(piece)
                continue
            yield piece[skip:]
            skip = 0

    def _next_piece(self) -> bytes:
        while True:
            try:
                if self._pieces is None:
                    self._open()
                assert self._pieces is not None
                with _mapped(self.what):
                    piece = next(self._pieces, b"")
                if not piece and self.total is not None and self.pos < self.total:
                    raise TransientError(f"{self.what}: the body ended at {self.pos} of "
                                         f"{self.total} bytes", error_class="truncated")
                self._failures = 0
                return piece
            except TransientError as e:
                self._reset()
                if self._failures >= self.client.retries:
                    raise
                delay = self.client._backoff(self._failures, e)
                self._failures += 1
                self.client.counters.retries += 1
                log.info("%s; resuming at byte %d in %.1fs", e, self.pos, delay)
                time.sleep(delay)

    def _reset(self) -> None:
        self._pieces = None
        self._stack.close()
        self._stack = contextlib.ExitStack()

    def readinto(self, b: Any) -> int:
        if not self._buf:
            self._buf = self._next_piece()
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.pos += n
        self.client.counters.bytes_in += n
        return n

    def close(self) -> None:
        self._stack.close()
        super().close()


class AsyncRegistryClient(_Base):
    """An async client for one registry (trio); the caller retries transient errors."""

    def __init__(self, registry: str, *, insecure: bool | None = None,
                 creds: Credentials | None = None, timeout: float = DEFAULT_TIMEOUT,
                 retries: int = DEFAULT_RETRIES, max_connections: int = 8) -> None:
        super().__init__(registry, insecure=insecure, creds=creds, timeout=timeout,
                         retries=retries)
        self._http = httpx.AsyncClient(**self._client_args(max_connections))

    @classmethod
    def for_ref(cls, ref: ImageRef, **kwargs: Any) -> Self:
        if ref.transport != "docker":
            raise ImageError(f"{ref} is not a registry reference")
        return cls(ref.registry, **kwargs)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _retrying(self, what: str, attempt_fn: Callable[[], Any]) -> Any:
        import trio

        for attempt in range(self.retries + 1):
            try:
                return await attempt_fn()
            except TransientError as e:
                if attempt == self.retries:
                    raise
                delay = self._backoff(attempt, e)
                self.counters.retries += 1
                log.info("%s; retrying in %.1fs", e, delay)
                await trio.sleep(delay)
        raise AssertionError("unreachable")

    async def _get(self, url: str, what: str, headers: dict[str, str] | None = None
                   ) -> httpx.Response:
        with _mapped(what):
            response = await self._http.get(url, headers=headers)
        self.counters.requests += 1
        self.counters.bytes_in += len(response.content)
        if response.status_code != 200:
            raise _answer_error(response, what)
        return response

    async def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        what = f"manifest {repo}:{reference}" if ":" not in reference else f"{repo}@{reference}"
        response = await self._retrying(what, lambda: self._get(
            _manifest_url(repo, reference), what, {"Accept": ACCEPT_MANIFESTS}))
        raw, digest = _read_manifest(response, reference, what)
        return raw, response.headers.get("content-type", ""), digest

    async def resolve(self, ref: ImageRef) -> Manifest:
        reference = ref.digest or ref.tag or "latest"
        raw, content_type, digest = await self.get_manifest(ref.repository, reference)
        if _is_index(raw, content_type):
            child = select_platform(raw, digest)
            raw, content_type, digest = await self.get_manifest(ref.repository, child.digest)
            if _is_index(raw, content_type):
                raise ImageError(f"{ref}: the platform entry of the index is another index")
        return parse_manifest(raw, digest)

    async def get_blob(self, repo: str, digest: str, max_size: int) -> bytes:
        what = f"blob {digest} in {repo}"
        response = await self._retrying(what, lambda: self._get(_blob_url(repo, digest), what))
        data = response.content
        if len(data) > max_size:
            raise ImageError(f"{what} is larger than {max_size} bytes")
        if sha256_digest(data) != digest:
            raise DigestError(f"{what} does not match its digest")
        return data

    async def stream_range(self, repo: str, digest: str, offset: int, length: int
                           ) -> AsyncIterator[bytes]:
        """Bytes ``[offset, offset+length)`` of a blob, in pieces as they arrive.
        One attempt: a failure raises (``TransientError`` if worth retrying)."""
        what = f"blob {digest} in {repo}"
        if length <= 0:
            return
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        with _mapped(what):
            async with self._http.stream("GET", _blob_url(repo, digest),
                                         headers=headers) as response:
                self.counters.requests += 1
                if response.status_code not in (200, 206):
                    await response.aread()
                    raise _answer_error(response, what)
                skip = 0
                if response.status_code == 200:
                    self._range_ignored(digest)
                    skip = offset
                elif _content_range_start(response) != offset:
                    raise TransientError(f"{what}: the registry answered the wrong range",
                                         error_class="range")
                left = length
                async for piece in response.aiter_bytes():
                    self.counters.bytes_in += len(piece)
                    if skip:
                        if skip >= len(piece):
                            skip -= len(piece)
                            continue
                        piece, skip = piece[skip:], 0
                    piece = piece[:left]
                    left -= len(piece)
                    if piece:
                        yield piece
                    if not left and response.status_code == 200:
                        return  # the rest of a whole blob: not worth reading
                # a 206 body read to its end: httpx keeps the connection for reuse
                if not left:
                    return
        raise TransientError(f"{what}: the body ended {left} bytes short", error_class="truncated")


# -- images ------------------------------------------------------------------------


def fetch_bootstrap(client: RegistryClient, ref: ImageRef) -> tuple[Manifest, bytes]:
    """The manifest and the verified, uncompressed bootstrap of the RAFS image ``ref``."""
    manifest = client.resolve(ref)
    if not is_rafs(manifest):
        raise ImageError(f"{ref} is not a RAFS image")
    desc = bootstrap_descriptor(manifest)
    if desc.size > codec.MAX_BOOTSTRAP:
        raise ImageError(f"{ref}: the bootstrap layer of {desc.size} bytes is too large")
    payload = client.get_blob(ref.repository, desc.digest, desc.size)
    raw = codec.decode_bootstrap(payload, desc.annotations.get(ANNOTATION_RAFS_BOOTSTRAP_DIGEST))
    log.debug("bootstrap of %s: %d bytes (%s)", ref, len(raw),
              "sha256:" + hashlib.sha256(raw).hexdigest())
    return manifest, raw
