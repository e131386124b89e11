"""A small token server for the registry's bearer-token auth (``auth: token:``).

Owns: ``TokenIssuer``, which makes an EC P-256 key and a self-signed
certificate (the registry's ``rootcertbundle``), and serves, on 127.0.0.1 in a
background thread,

- ``GET /token?service=S&scope=repository:NAME:pull,push`` with HTTP basic auth,
- ``POST /token`` (the OAuth2 password grant containerd tries first: form fields
  ``grant_type=password``, ``username``, ``password``, ``service``, ``scope``),

answering ``{"token": JWT, "access_token": JWT, "expires_in": N, "issued_at": ...}``.
The JWT is ES256, carries ``iss/sub/aud/exp/nbf/iat/jti`` and the ``access``
claim, and names its key either by an ``x5c`` header (the certificate, which
chains to the bundle) or by a ``kid`` in libtrust key-id format; the real
``docker-registry`` verifies it either way.

Unknown users or wrong passwords get 401; requests without credentials get a
token with no access when ``allow_anonymous`` (as public registries do), 401
otherwise. ``grants`` limits what a user may get (default: every action asked
for). Every request is recorded in ``requests`` (never the password).

Independent of rafs on purpose: it is what the rafs registry client is tested against.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench.registry import TokenAuth

__all__ = ["TokenIssuer", "TokenRequest", "libtrust_key_id", "parse_scope"]

DEFAULT_SERVICE = "rafs-test-registry"
DEFAULT_ISSUER = "rafs-test-issuer"
# distribution 2.8 still accepts a token up to 60 s after its exp (clock-skew
# leeway); the issuer moves exp back by this much, so a token really stops
# working ``expires_in`` seconds after it was issued.
REGISTRY_LEEWAY = 60


@dataclass(frozen=True)
class TokenRequest:
    """One request to the token endpoint, as the issuer saw it."""

    method: str
    user: str | None  # None: no credentials sent
    service: str | None
    scopes: tuple[str, ...]
    status: int
    granted: tuple[dict[str, object], ...] = ()


def parse_scope(scope: str) -> dict[str, object] | None:
    """``repository:NAME:pull,push`` -> ``{"type", "name", "actions"}``; None if malformed."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name):
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """The key id docker's libtrust derives from a public key: base32 of the first
    240 bits of sha256(DER SubjectPublicKeyInfo), in 12 colon-separated groups of 4."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


@dataclass
class TokenIssuer:
    """A token server on 127.0.0.1:RANDOM; use as a context manager.

    ``users``: user -> password. ``expires_in``: token lifetime in seconds.
    ``key_header``: how the JWT names its signing key (``"x5c"`` or ``"kid"``).
    ``grants``: user -> actions that user may get (e.g. ``{"reader": {"pull"}}``);
    users not listed get what they ask for. ``workdir``: where the key and the
    certificate bundle are written. ``registry_leeway``: seconds subtracted from
    ``exp`` to cancel the registry's own leeway (0 for the plain claim).
    ``expires_in`` may be changed while running (e.g. with ``monkeypatch``).
    """

    users: Mapping[str, str]
    workdir: Path
    service: str = DEFAULT_SERVICE
    issuer: str = DEFAULT_ISSUER
    expires_in: int = 300
    key_header: Literal["x5c", "kid"] = "x5c"
    allow_anonymous: bool = False
    grants: Mapping[str, Iterable[str]] = field(default_factory=dict)
    registry_leeway: int = REGISTRY_LEEWAY
    requests: list[TokenRequest] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.certificate = _self_signed(self._key, self.issuer)
        self.cert_path = self.workdir / "token-root.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self.key_id = libtrust_key_id(self._key.public_key())
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- addresses ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("token issuer not started")
        return self._server.server_address[1]

    @property
    def realm(self) -> str:
        """The token endpoint URL (the registry's ``auth.token.realm``)."""
        return f"http://127.0.0.1:{self.port}/token"

    def token_auth(self) -> TokenAuth:
        """The registry config that trusts this issuer."""
        return TokenAuth(realm=self.realm, service=self.service, issuer=self.issuer,
                         rootcertbundle=self.cert_path)

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> TokenIssuer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        issuer = self

        class Handler(_TokenHandler):
            owner = issuer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="token-issuer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    # -- tokens ------------------------------------------------------------

    def issue(
        self,
        subject: str,
        access: Iterable[Mapping[str, object]] = (),
        *,
        expires_in: int | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        now: float | None = None,
    ) -> str:
        """A signed JWT for ``subject`` with ``access`` entries (also for tests that
        want to hand the registry a token directly, e.g. an expired one)."""
        now = time.time() if now is None else now
        lifetime = self.expires_in if expires_in is None else expires_in
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": int(now) + lifetime - self.registry_leeway,
            "nbf": int(now) - 1,
            "iat": int(now),
            "jti": secrets.token_hex(16),
            "access": [dict(a) for a in access],
        }
        headers: dict[str, object] = {"typ": "JWT"}
        if self.key_header == "x5c":
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            headers["x5c"] = [base64.b64encode(der).decode()]
        else:
            headers["kid"] = self.key_id
        return jwt.encode(claims, self._key, algorithm="ES256", headers=headers)

    def decode(self, token: str) -> dict[str, object]:
        """The claims of a token this issuer signed (verifying signature and audience)."""
        return jwt.decode(token, self._key.public_key(), algorithms=["ES256"],
                          audience=self.service, issuer=self.issuer)

    def _grant(self, user: str | None, scopes: Iterable[str]) -> list[dict[str, object]]:
        granted = []
        allowed = None if user is None else self.grants.get(user)
        for scope in scopes:
            entry = parse_scope(scope)
            if entry is None or user is None:
                continue
            actions = entry["actions"]
            assert isinstance(actions, list)
            if allowed is not None:
                actions = [a for a in actions if a in set(allowed)]
            granted.append({**entry, "actions": actions})
        return granted

    def _answer(
        self, method: str, user: str | None, password: str | None, service: str | None,
        scopes: list[str], has_credentials: bool,
    ) -> tuple[int, dict[str, object]]:
        """(status, JSON body) for one token request."""
        if has_credentials:
            if user is None or self.users.get(user) != password:
                self._record(method, user, service, scopes, 401)
                return 401, {"errors": [{"code": "UNAUTHORIZED",
                                         "message": "invalid username or password"}]}
        elif not self.allow_anonymous:
            self._record(method, None, service, scopes, 401)
            return 401, {"errors": [{"code": "UNAUTHORIZED",
                                     "message": "authentication required"}]}
        if service is not None and service != self.service:
            self._record(method, user, service, scopes, 400)
            return 400, {"errors": [{"code": "DENIED", "message": f"unknown service {service}"}]}
        access = self._grant(user if has_credentials else None, scopes)
        token = self.issue(user if has_credentials and user else "", access)
        self._record(method, user if has_credentials else None, service, scopes, 200, access)
        return 200, {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }

    def _record(self, method: str, user: str | None, service: str | None,
                scopes: list[str], status: int, granted: list[dict[str, object]] = ()) -> None:
        with self._lock:
            self.requests.append(TokenRequest(method, user, service, tuple(scopes), status,
                                              tuple(granted)))


class _TokenHandler(BaseHTTPRequestHandler):
    owner: TokenIssuer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        query = urllib.parse.parse_qs(url.query)
        user, password, has_creds = self._basic()
        status, body = self.owner._answer(
            "GET", user, password, _first(query.get("service")), query.get("scope", []),
            has_creds)
        self._send(status, body)

    def do_POST(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode(errors="replace"))
        if url.path != "/token":
            self._send(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        if _first(form.get("grant_type")) != "password":
            self._send(400, {"error": "unsupported_grant_type"})
            return
        scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
        user = _first(form.get("username"))
        status, body = self.owner._answer(
            "POST", user, _first(form.get("password")), _first(form.get("service")), scopes,
            user is not None)
        self._send(status, body)

    def _basic(self) -> tuple[str | None, str | None, bool]:
        header = self.headers.get("Authorization")
        if not header:
            return None, None, False
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return None, None, True
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, None, True
        return user, password, True

    def _send(self, status: int, body: Mapping[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="rafs-token-issuer"')
        self.end_headers()
        self.wfile.write(data)


def _first(values: list[str] | None) -> str | None:
    return values[0] if values else None


def _self_signed(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True)
        .sign(key, hashes.SHA256())
    )
