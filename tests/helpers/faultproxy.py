"""An HTTP-aware TCP proxy that records every exchange and injects faults on demand.

Owns: ``FaultProxy`` — listens on 127.0.0.1:RANDOM, relays HTTP/1.1 between a
client and an upstream (the real registry), one upstream connection per client
connection, so keep-alive works through it. Each request is parsed (method,
path, headers, body by Content-Length or chunked) and each response is relayed
with its body length known, so the proxy can record and alter exchanges:

    with FaultProxy(registry.host) as proxy:
        rule = proxy.inject(Fault.RESET, match=lambda r: r.method == "GET"
                            and "/blobs/" in r.path, times=2)
        ...point the client at proxy.host...
        assert rule.hits == 2
        blob_gets = [x for x in proxy.exchanges if x.method == "GET"]

Faults (``Fault``): ``RESET`` (TCP RST instead of an answer), ``UNAVAILABLE``
(503), ``Fault.too_many(retry_after)`` (429 with ``Retry-After``),
``Fault.stall(seconds)`` (wait, then answer normally; default ``STALL`` is
10 s), ``Fault.truncate(keep_bytes)`` (send the headers and ``keep_bytes`` of
the body, then close; ``TRUNCATE`` keeps half; with ``reset=True`` the close is
a TCP RST), ``IGNORE_RANGE`` (drop the
Range header upstream, so the full blob comes back as 200), ``Fault.flip(offset)``
(XOR one body byte; ``FLIP`` flips the middle one), and ``DOWN`` / ``down()``
(reset every connection and request until ``up()`` or ``clear()``).

Rules apply per request (``match`` sees a ``Request``), or with
``per="connection"`` to the next new connections (RESET or STALL before any
byte is read). Plain threads; ``close()`` (or leaving the ``with``) shuts every
socket and joins every thread. Independent of rafs on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, ClassVar, Literal

__all__ = ["Exchange", "Fault", "FaultProxy", "Request", "Rule"]

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024
_STATUS_TEXT = {429: "Too Many Requests", 500: "Internal Server Error",
                502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass(frozen=True)
class Fault:
    """What to do to a matched request (see the module docstring for the kinds)."""

    kind: Literal["reset", "status", "stall", "truncate", "ignore_range", "flip", "down"]
    status: int = 503
    retry_after: int | None = None
    seconds: float = 10.0
    keep_bytes: int | None = None  # truncate: None = half the body
    offset: int | None = None  # flip: None = the middle byte
    reset: bool = False  # truncate: end with a TCP RST instead of a FIN

    RESET: ClassVar[Fault]
    UNAVAILABLE: ClassVar[Fault]
    TOO_MANY: ClassVar[Fault]
    STALL: ClassVar[Fault]
    TRUNCATE: ClassVar[Fault]
    IGNORE_RANGE: ClassVar[Fault]
    FLIP: ClassVar[Fault]
    DOWN: ClassVar[Fault]

    @staticmethod
    def answer(status: int, retry_after: int | None = None) -> Fault:
        """Answer ``status`` (with ``Retry-After`` if given) instead of forwarding."""
        return Fault("status", status=status, retry_after=retry_after)

    @staticmethod
    def too_many(retry_after: int = 1) -> Fault:
        return Fault("status", status=429, retry_after=retry_after)

    @staticmethod
    def stall(seconds: float = 10.0) -> Fault:
        return Fault("stall", seconds=seconds)

    @staticmethod
    def truncate(keep_bytes: int | None = None, *, reset: bool = False) -> Fault:
        return Fault("truncate", keep_bytes=keep_bytes, reset=reset)

    @staticmethod
    def flip(offset: int | None = None) -> Fault:
        return Fault("flip", offset=offset)


Fault.RESET = Fault("reset")
Fault.UNAVAILABLE = Fault("status", status=503)
Fault.TOO_MANY = Fault("status", status=429, retry_after=1)
Fault.STALL = Fault("stall", seconds=10.0)
Fault.TRUNCATE = Fault("truncate")
Fault.IGNORE_RANGE = Fault("ignore_range")
Fault.FLIP = Fault("flip")
Fault.DOWN = Fault("down")


@dataclass(frozen=True)
class Request:
    """A request as the proxy parsed it; ``headers`` keys are lower case."""

    conn: int  # connection number, from 1
    index: int  # request number on that connection, from 1
    method: str
    path: str
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Exchange:
    """One request and what became of it."""

    conn: int
    method: str
    path: str
    range: str | None
    status: int | None = None  # None: no answer reached the client
    body_bytes: int = 0  # response body bytes sent to the client
    fault: str | None = None
    seconds: float = 0.0


@dataclass
class Rule:
    """An injected fault; ``hits`` counts how often it fired."""

    fault: Fault
    match: Callable[[Request], bool] | None
    times: int | None  # None: until cleared
    per: Literal["request", "connection"] = "request"
    hits: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.hits < self.times


@dataclass
class _Response:
    status: int
    head: bytes
    headers: dict[str, str]
    length: int | None  # None with chunked; -1 until close
    chunked: bool


class _Closed(Exception):
    """The peer closed the connection between requests."""


class FaultProxy:
    """A fault-injecting HTTP proxy in front of ``upstream`` (``HOST:PORT``)."""

    def __init__(self, upstream: str, *, listen: str = "127.0.0.1", connect_timeout: float = 5):
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.connect_timeout = connect_timeout
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self._rules: list[Rule] = []
        self._down = False
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.create_server((listen, 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self._accepter: threading.Thread | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the proxy."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        self._accepter = threading.Thread(target=self._accept_loop, name="faultproxy-accept",
                                          daemon=True)
        self._accepter.start()

    def close(self) -> None:
        """Stop accepting, shut every connection, join every thread."""
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(5)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
            threads = list(self._threads)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)

    # -- programming faults --------------------------------------------------

    def inject(
        self,
        fault: Fault,
        match: Callable[[Request], bool] | None = None,
        *,
        times: int | None = None,
        per: Literal["request", "connection"] = "request",
    ) -> Rule:
        """Apply ``fault`` to the next ``times`` matching requests (None: all, until
        cleared). ``per="connection"``: to the next ``times`` new connections,
        before any byte (``RESET`` or ``stall``). ``Fault.DOWN`` is ``down()``."""
        if fault.kind == "down":
            self.down()
        if per == "connection" and fault.kind not in ("reset", "stall"):
            raise ValueError("per-connection faults are RESET and stall")
        rule = Rule(fault, match, times, per)
        with self._lock:
            self._rules.append(rule)
        return rule

    def down(self) -> None:
        """Reset every new connection and every request until ``up()``/``clear()``."""
        self._down = True

    def up(self) -> None:
        self._down = False

    def clear(self) -> None:
        """Remove every rule and bring the link up; records are kept."""
        with self._lock:
            self._rules.clear()
        self._down = False

    def reset_records(self) -> None:
        with self._lock:
            self.exchanges.clear()
            self.connections = 0

    def requests_matching(self, method: str | None = None,
                          path_contains: str = "") -> list[Exchange]:
        with self._lock:
            return [x for x in self.exchanges
                    if (method is None or x.method == method) and path_contains in x.path]

    def _take(self, req: Request | None, per: str) -> Fault | None:
        with self._lock:
            for rule in self._rules:
                if rule.per != per or not rule.active or rule.fault.kind == "down":
                    continue
                if req is not None and rule.match is not None and not rule.match(req):
                    continue
                rule.hits += 1
                return rule.fault
        return None

    # -- serving -------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                conn_id = self.connections
                self._sockets.add(client)
            t = threading.Thread(target=self._serve, args=(client, conn_id),
                                 name=f"faultproxy-{conn_id}", daemon=True)
            with self._lock:
                self._threads.add(t)
            t.start()

    def _serve(self, client: socket.socket, conn_id: int) -> None:
        upstream: socket.socket | None = None
        up_reader: BinaryIO | None = None
        reader: BinaryIO | None = None
        try:
            client.settimeout(None)
            if self._down:
                _reset(client)
                return
            fault = self._take(None, "connection")
            if fault is not None and fault.kind == "reset":
                _reset(client)
                return
            if fault is not None and fault.kind == "stall" and self._stopping.wait(fault.seconds):
                return
            reader = client.makefile("rb")
            index = 0
            while not self._stopping.is_set():
                index += 1
                try:
                    req, raw_head = _read_request(reader, conn_id, index)
                except _Closed:
                    return
                new_up, new_reader, keep_open = self._exchange(
                    client, reader, req, raw_head, upstream, up_reader)
                if new_up is not upstream:
                    self._drop(upstream, up_reader)
                upstream, up_reader = new_up, new_reader
                if not keep_open:
                    return
        except OSError as e:
            log.debug("faultproxy connection %d: %s", conn_id, e)
        finally:
            self._drop(client, reader)
            self._drop(upstream, up_reader)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _drop(self, sock: socket.socket | None, reader: BinaryIO | None) -> None:
        """Close a socket and its reader and forget it."""
        for f in (reader, sock):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        if sock is not None:
            with self._lock:
                self._sockets.discard(sock)

    def _connect(self) -> tuple[socket.socket, BinaryIO]:
        up = socket.create_connection(self.upstream, timeout=self.connect_timeout)
        up.settimeout(None)
        with self._lock:
            self._sockets.add(up)
        return up, up.makefile("rb")

    def _exchange(
        self,
        client: socket.socket,
        reader: BinaryIO,
        req: Request,
        raw_head: bytes,
        upstream: socket.socket | None,
        up_reader: BinaryIO | None,
    ) -> tuple[socket.socket | None, BinaryIO | None, bool]:
        """Serve one request: (upstream connection now in use, its reader, whether
        the client connection stays open)."""
        started = time.monotonic()
        rec = Exchange(req.conn, req.method, req.path, req.range)
        with self._lock:
            self.exchanges.append(rec)
        fault = None if self._down else self._take(req, "request")
        rec.fault = "down" if self._down else (fault.kind if fault else None)

        if self._down or (fault is not None and fault.kind == "reset"):
            _reset(client, reader)
            return upstream, up_reader, False
        if fault is not None and fault.kind == "status":
            _relay_request_body(reader, req.headers, None)
            rec.status = fault.status
            client.sendall(_status_answer(fault.status, fault.retry_after))
            rec.seconds = time.monotonic() - started
            return upstream, up_reader, True
        if fault is not None and fault.kind == "stall" and self._stopping.wait(fault.seconds):
            return upstream, up_reader, False

        head = raw_head
        if fault is not None and fault.kind == "ignore_range":
            head = _drop_header(raw_head, b"range")
        upstream, up_reader, resp = self._forward(head, req, reader, upstream, up_reader)
        rec.status = resp.status
        client.sendall(resp.head)
        keep_bytes, flip_at = _body_faults(fault, resp)
        sent, complete = _relay_response_body(up_reader, resp, client.sendall, keep_bytes, flip_at)
        rec.body_bytes = sent
        rec.seconds = time.monotonic() - started
        if not complete:
            if fault is not None and fault.reset:
                _reset(client, reader)
            return upstream, up_reader, False  # truncated: close both sides
        if resp.length == -1 or resp.headers.get("connection", "").lower() == "close":
            return upstream, up_reader, False
        return upstream, up_reader, req.headers.get("connection", "").lower() != "close"


    def _forward(self, head: bytes, req: Request, reader: BinaryIO,
                 upstream: socket.socket | None, up_reader: BinaryIO | None
                 ) -> tuple[socket.socket, BinaryIO, _Response]:
        """Send the request upstream (on the kept-alive connection, or a new one) and
        read the answer's head: (the connection used, its reader, the answer)."""
        if upstream is None or up_reader is None:
            upstream, up_reader = self._connect()
        try:
            upstream.sendall(head)
            _relay_request_body(reader, req.headers, upstream.sendall)
            return upstream, up_reader, _read_response(up_reader, req.method)
        except (OSError, _Closed):
            # the kept-alive upstream connection went away: one fresh try when no
            # request body had to be sent (we cannot replay a body we streamed)
            if _has_body(req.headers):
                raise
            self._drop(upstream, up_reader)
            upstream, up_reader = self._connect()
            upstream.sendall(head)
            return upstream, up_reader, _read_response(up_reader, req.method)


def _body_faults(fault: Fault | None, resp: _Response) -> tuple[int | None, int | None]:
    """(bytes of the body to send before breaking off, offset of the byte to flip)."""
    half = max(resp.length or 0, 0) // 2
    if fault is not None and fault.kind == "truncate":
        return (half if fault.keep_bytes is None else fault.keep_bytes), None
    if fault is not None and fault.kind == "flip":
        return None, (half if fault.offset is None else fault.offset)
    return None, None


# -- HTTP/1.1 framing --------------------------------------------------------

def _read_head(reader: BinaryIO) -> bytes:
    lines = []
    total = 0
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            if lines:
                raise OSError("connection closed inside a message head")
            raise _Closed
        if not lines and line in (b"\r\n", b"\n"):
            continue  # stray CRLF between messages
        lines.append(line)
        total += len(line)
        if total > _MAX_HEAD:
            raise OSError("message head too large")
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_headers(head: bytes) -> tuple[str, dict[str, str]]:
    text = head.decode("latin-1")
    first, *rest = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


def _read_request(reader: BinaryIO, conn: int, index: int) -> tuple[Request, bytes]:
    head = _read_head(reader)
    first, headers = _parse_headers(head)
    parts = first.split(" ")
    if len(parts) != 3:
        raise OSError(f"bad request line {first!r}")
    return Request(conn, index, parts[0], parts[1], headers), head


def _read_response(reader: BinaryIO, method: str) -> _Response:
    while True:
        head = _read_head(reader)
        first, headers = _parse_headers(head)
        parts = first.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise OSError(f"bad status line {first!r}")
        status = int(parts[1])
        if status >= 200 or status == 101:
            break  # 1xx interim answers are dropped
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length: int | None
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        length = 0
    elif chunked:
        length = None
    elif "content-length" in headers:
        length = int(headers["content-length"])
    else:
        length = -1
    return _Response(status, head, headers, length, chunked)


def _has_body(headers: dict[str, str]) -> bool:
    return "chunked" in headers.get("transfer-encoding", "").lower() or int(
        headers.get("content-length", "0") or 0) > 0


def _relay_request_body(reader: BinaryIO, headers: dict[str, str],
                        sink: Callable[[bytes], object] | None) -> None:
    """Copy a request body to ``sink`` (None: read and drop it)."""
    put = sink or (lambda _b: None)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        _copy_chunked(reader, put)
        return
    _copy_exact(reader, int(headers.get("content-length", "0") or 0), put)


def _copy_exact(reader: BinaryIO, n: int, put: Callable[[bytes], object]) -> int:
    done = 0
    while done < n:
        data = reader.read(min(_CHUNK, n - done))
        if not data:
            raise OSError("connection closed inside a body")
        put(data)
        done += len(data)
    return done


def _copy_chunked(reader: BinaryIO, put: Callable[[bytes], object]) -> int:
    """Copy a chunked body verbatim (framing included); return the bytes copied."""
    total = 0
    while True:
        size_line = reader.readline(1024)
        if not size_line:
            raise OSError("connection closed inside a chunked body")
        put(size_line)
        total += len(size_line)
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers up to the empty line
                line = reader.readline(_MAX_HEAD)
                put(line)
                total += len(line)
                if line in (b"\r\n", b"\n", b""):
                    return total
        total += _copy_exact(reader, size + 2, put)


def _relay_response_body(
    reader: BinaryIO,
    resp: _Response,
    put: Callable[[bytes], object],
    keep_bytes: int | None,
    flip_at: int | None,
) -> tuple[int, bool]:
    """Relay the body, truncated after ``keep_bytes`` or with the byte at ``flip_at``
    flipped; return (bytes sent, whether the body was sent whole)."""
    state = {"sent": 0, "stop": False}

    def out(data: bytes) -> None:
        pos = state["sent"]
        if flip_at is not None and pos <= flip_at < pos + len(data):
            b = bytearray(data)
            b[flip_at - pos] ^= 0xFF
            data = bytes(b)
        if keep_bytes is not None and pos + len(data) >= keep_bytes:
            data = data[: keep_bytes - pos]
            state["stop"] = True
        if data:
            put(data)
        state["sent"] = pos + len(data)
        if state["stop"]:
            raise _Truncated

    try:
        if keep_bytes is not None and keep_bytes <= 0:
            raise _Truncated
        if resp.chunked:
            _copy_chunked(reader, out)
        elif resp.length == -1:
            while data := reader.read1(_CHUNK):  # type: ignore[attr-defined]
                out(data)
        elif resp.length:
            _copy_exact(reader, resp.length, out)
    except _Truncated:
        return state["sent"], False
    return state["sent"], True


class _Truncated(Exception):
    pass


def _drop_header(head: bytes, name: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.split(b":", 1)[0].strip().lower() != name]
    return b"\r\n".join(kept)


def _status_answer(status: int, retry_after: int | None) -> bytes:
    body = (b'{"errors":[{"code":"FAULT","message":"injected by the test proxy"}]}')
    lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Fault')}",
             "Content-Type: application/json", f"Content-Length: {len(body)}"]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _reset(sock: socket.socket, reader: BinaryIO | None = None) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN. The descriptor is only
    closed once the ``makefile`` reader is closed too, so that goes first."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    if reader is not None:
        with contextlib.suppress(OSError):
            reader.close()
    with contextlib.suppress(OSError):
        sock.close()

