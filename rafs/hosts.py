"""Where a registry's content may be fetched from: containerd's ``hosts.toml`` layout.

This module owns the *endpoints* of a registry namespace (``HOST[:PORT]`` of an
image reference): mirrors first, in the order the file lists them, then the
namespace's own server. It reads the layout containerd reads (``ctr
--hosts-dir``, CRI's ``config_path``), with containerd's semantics:

- the configuration directory is ``--hosts-dir`` (``$RAFS_HOSTS_DIR``),
  default ``/etc/containerd/certs.d``; for ``HOST:PORT`` the first existing
  of ``HOST_PORT_/``, ``HOST:PORT/`` and ``_default/`` is used; a missing
  directory means no configuration (the registry itself, as always);
- in that directory, ``hosts.toml``::

      server = "https://registry.example.com"   # omit: the registry itself

      [host."http://mirror.internal:5000"]
        capabilities = ["pull", "resolve"]      # default: pull, resolve, push
        skip_verify = false
        ca = "mirror-ca.pem"                    # or a list; relative to the file
        client = [["client.cert", "client.key"]]
        override_path = false                   # true: the URL path is the API root
        dial_timeout = "2s"
        [host."http://mirror.internal:5000".header]
          x-custom = "value"                    # or a list of values

  root-level ``capabilities``, ``ca``, ``client``, ``skip_verify``,
  ``header``, ``override_path`` and ``dial_timeout`` configure the server;
  without ``server`` the registry itself is the last endpoint, with all
  capabilities (containerd does the same, so a mirror can never be the only
  way unless ``server`` says so);
- without ``hosts.toml``, Docker's certificate files in the directory:
  ``*.crt`` are CA files, ``*.cert`` (with ``*.key`` of the same name) client
  certificates, for the registry itself;
- which endpoints an operation may use (``RegistryHosts.serving``): a manifest
  by tag needs ``pull`` and ``resolve`` (turning a name into a digest is
  trusted), a manifest by digest and every blob need ``pull`` (the digest
  vouches for the bytes), pushes need ``push``;
- an endpoint URL without ``/v2`` gets it appended unless ``override_path``;
  a URL without a scheme is ``https://``.

The parser (``parse_hosts``) is pure: text in, endpoints out. ``load_hosts``
finds the file, reads it and checks that the certificate files it names
exist. Every problem is one ``ConfigError`` line naming the file: a TOML
syntax error, an unknown capability, a missing CA file, a bad URL, a value of
the wrong type. Unknown keys are ignored with a warning (containerd ignores
them silently).

Light on purpose (tomllib, no HTTP library): command-line front ends import
it to check a configuration before they start a daemon.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["CAPABILITIES", "DEFAULT_HOSTS_DIR", "HOSTS_DIR_ENV", "Endpoint", "RegistryHosts",
           "host_dirs", "load_hosts", "origin_url", "parse_hosts", "use_hosts_dir"]

log = logging.getLogger(__name__)

DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
HOSTS_DIR_ENV = "RAFS_HOSTS_DIR"
CAPABILITIES = frozenset({"pull", "resolve", "push"})
_KNOWN_ONLY = frozenset({"referrers"})  # containerd's; rafs reads no referrers
_ALL = CAPABILITIES | _KNOWN_ONLY
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
_HOST_KEYS = frozenset({"capabilities", "ca", "client", "skip_verify", "header",
                        "override_path", "dial_timeout"})
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def origin_url(registry: str, insecure: bool | None = None) -> str:
    """The registry's own base URL: ``http://`` for a local registry (or when
    ``insecure``), ``https://`` otherwise; Docker Hub's API host for docker.io."""
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    plain = insecure if insecure is not None else host in LOCAL_HOSTS
    if registry == "docker.io":
        registry = "registry-1.docker.io"
    return f"{'http' if plain else 'https'}://{registry}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a registry namespace's content can be fetched from (or pushed to)."""

    url: str  # scheme://host[:port], no path
    root: str = "/v2"  # the API root path ("" or a path of override_path)
    capabilities: frozenset[str] = CAPABILITIES
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str | None], ...] = ()  # (certificate, key or None: in the cert)
    headers: tuple[tuple[str, str], ...] = ()  # a name repeats for several values
    dial_timeout: float | None = None
    server: bool = True  # the namespace's server (the last endpoint), not a mirror

    @property
    def host(self) -> str:
        """``HOST[:PORT]`` of the endpoint: what its credentials are stored under."""
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        """The endpoint in messages and counters: its URL, with the API root if unusual."""
        return self.url if self.root == "/v2" else self.url + self.root

    def can(self, need: str) -> bool:
        """May this endpoint serve an operation that needs ``need`` (see ``serving``)?"""
        if need == "resolve":
            return {"pull", "resolve"} <= self.capabilities
        return need in self.capabilities

    @property
    def custom_tls(self) -> bool:
        return self.skip_verify or bool(self.ca) or bool(self.client)


@dataclass(frozen=True, slots=True)
class RegistryHosts:
    """The endpoints of one registry namespace, mirrors first, the server last."""

    registry: str
    endpoints: tuple[Endpoint, ...]
    source: Path | None = None  # the hosts.toml (or certificate directory) read
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def serving(self, need: str) -> tuple[Endpoint, ...]:
        """The endpoints, in order, that may serve an operation needing ``need``:
        ``resolve`` (a manifest by tag), ``pull`` (by digest, blobs) or ``push``."""
        return tuple(e for e in self.endpoints if e.can(need))

    @property
    def mirrored(self) -> bool:
        return len(self.endpoints) > 1

    def describe(self) -> str:
        where = f" (from {self.source})" if self.source else ""
        return ", ".join(e.name for e in self.endpoints) + where


# -- parsing: text in, endpoints out -------------------------------------------------


def _duration(value: object, problem: ConfigError) -> float:
    """A Go duration (``1s``, ``500ms``, ``1m30s``) in seconds."""
    if not isinstance(value, str) or not value:
        raise problem
    text, total = value, 0.0
    while text:
        m = _DURATION.match(text)
        if m is None:
            raise problem
        total += float(m.group(1)) * _UNIT[m.group(2)]
        text = text[m.end():]
    return total


def _strings(value: object, what: str, err: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise err(f"{what} must be a string or a list of strings")


def _path(p: str, base: Path) -> str:
    return p if os.path.isabs(p) else str(base / p)


def _endpoint_url(text: str, override_path: bool, err: Any, what: str) -> tuple[str, str]:
    """(scheme://host[:port], API root) of a host URL, as containerd reads it."""
    if not isinstance(text, str) or not text.strip():
        raise err(f"{what}: the URL is empty")
    raw = text.strip()
    if "://" in raw and not raw.startswith(("http://", "https://")):
        raise err(f"{what}: bad URL {text!r} (the scheme must be http or https)")
    if not raw.startswith(("http://", "https://")):
        raw = "https://" + raw
    try:
        u = urllib.parse.urlsplit(raw)
        port = u.port
    except ValueError as e:
        raise err(f"{what}: bad URL {text!r} ({e})") from None
    if u.scheme not in ("http", "https"):
        raise err(f"{what}: bad URL {text!r} (the scheme must be http or https)")
    if not u.hostname or u.username is not None or u.password is not None:
        raise err(f"{what}: bad URL {text!r} (expected SCHEME://HOST[:PORT][/PATH])")
    if u.query or u.fragment:
        raise err(f"{what}: bad URL {text!r} (no query or fragment)")
    host = u.hostname if ":" not in u.hostname else f"[{u.hostname}]"
    netloc = host + (f":{port}" if port is not None else "")
    path = u.path
    if path and path != "/":
        path = posixpath.normpath(path)
        if not path.endswith("/v2") and not override_path:
            path += "/v2"
    elif not override_path:
        path = "/v2"
    else:
        path = ""
    return f"{u.scheme}://{netloc}", path.rstrip("/")


def _parse_host(table: Mapping[str, Any], url: str | None, base: Path, *, server: bool,
                err: Any, what: str, warnings: list[str]) -> dict[str, Any]:
    """The fields of one endpoint (``url`` None: the registry itself, filled in later)."""
    for key in table:
        if key not in _HOST_KEYS and not (server and key in ("server", "host")):
            warnings.append(f"{what}: unknown key {key!r} ignored")
    override = _flag(table, "override_path", err, what)
    fields: dict[str, Any] = {"server": server,
                              "skip_verify": _flag(table, "skip_verify", err, what)}
    if url is not None:
        fields["url"], fields["root"] = _endpoint_url(url, override, err, what)
    caps = table.get("capabilities")
    if caps is not None and caps != []:  # none listed: every capability (as containerd)
        fields["capabilities"] = _capabilities(caps, err, what)
    if "ca" in table:
        fields["ca"] = tuple(_path(p, base) for p in _strings(table["ca"], f"{what}: ca", err))
    if "client" in table:
        fields["client"] = _client_pairs(table["client"], base, err, what)
    if table.get("header") is not None:
        fields["headers"] = _headers(table["header"], err, what)
    if "dial_timeout" in table:
        fields["dial_timeout"] = _duration(
            table["dial_timeout"],
            err(f"{what}: dial_timeout {table['dial_timeout']!r} is not a duration like "
                "\"2s\" or \"500ms\""))
    return fields


def _flag(table: Mapping[str, Any], key: str, err: Any, what: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise err(f"{what}: {key} must be true or false")
    return value


def _capabilities(caps: Any, err: Any, what: str) -> frozenset[str]:
    wanted = set()
    for c in _strings(caps, f"{what}: capabilities", err):
        if c.lower() not in _ALL:
            raise err(f"{what}: unknown capability {c!r} (known: pull, resolve, push)")
        wanted.add(c.lower())
    return frozenset(wanted & CAPABILITIES)


def _client_pairs(value: Any, base: Path, err: Any, what: str
                  ) -> tuple[tuple[str, str | None], ...]:
    """``client``: a path, a list of paths, or a list of [certificate, key] pairs."""
    pairs: list[tuple[str, str | None]] = []
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else [None]
    for item in items:
        if isinstance(item, str):
            pairs.append((_path(item, base), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_path(item[0], base), _path(item[1], base) if item[1] else None))
        else:
            raise err(f"{what}: client must be a path, a list of paths or a list of "
                      "[certificate, key] pairs")
    return tuple(pairs)


def _headers(header: Any, err: Any, what: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(header, dict):
        raise err(f"{what}: header must be a table")
    return tuple((name, v) for name, values in header.items()
                 for v in _strings(values, f"{what}: header {name!r}", err))


def parse_hosts(text: str, registry: str, *, base_dir: Path | str, name: str = "hosts.toml",
                insecure: bool | None = None) -> RegistryHosts:
    """The endpoints that the ``hosts.toml`` text ``text`` gives ``registry``.
    ``base_dir``: what relative paths are relative to; ``name``: the file in messages."""
    base = Path(base_dir)

    def err(message: str) -> ConfigError:
        return ConfigError(f"{name}: {message}")

    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise err(f"not valid TOML: {e}") from None
    warnings: list[str] = []
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise err("host must be a table of [host.\"URL\"] entries")
    endpoints = []
    for url, table in hosts.items():  # tomllib keeps the order of the file
        what = f"[host.{_quote(url)}]"
        if not isinstance(table, dict):
            raise err(f"{what} must be a table")
        endpoints.append(Endpoint(**_parse_host(table, url, base, server=False, err=err,
                                                what=what, warnings=warnings)))
    server = doc.get("server")
    if server is not None and not isinstance(server, str):
        raise err("server must be a URL string")
    fields = _parse_host(doc, server or None, base, server=True, err=err, what="server",
                         warnings=warnings)
    if not server:  # the registry itself, with every capability (as containerd)
        fields.update(url=origin_url(registry, insecure), root="/v2", capabilities=CAPABILITIES)
    endpoints.append(Endpoint(**fields))
    for w in warnings:
        log.warning("%s: %s", name, w)
    return RegistryHosts(registry, tuple(endpoints), Path(name), tuple(warnings))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- the directory layout -------------------------------------------------------------


def host_dirs(root: Path | str, registry: str) -> list[Path]:
    """The directories containerd looks in for ``registry``, in order."""
    root = Path(root)
    dirs = []
    head, sep, port = registry.rpartition(":")
    if sep and head and not registry.endswith("]"):
        dirs.append(root / f"{head}_{port}_")
    dirs += [root / registry, root / "_default"]
    return dirs


def _cert_files(directory: Path, registry: str, insecure: bool | None) -> RegistryHosts:
    """Docker's certificate layout: ``*.crt`` CA files, ``*.cert``/``*.key`` pairs."""
    try:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    except OSError as e:
        raise ConfigError(f"{directory}: cannot list it: {e.strerror}") from None
    ca = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    client = tuple((str(directory / n),
                    str(directory / (n[:-5] + ".key")) if n[:-5] + ".key" in names else None)
                   for n in names if n.endswith(".cert"))
    origin = Endpoint(origin_url(registry, insecure), ca=ca, client=client)
    return RegistryHosts(registry, (origin,), directory if ca or client else None)


def default_hosts_dir() -> str:
    """``$RAFS_HOSTS_DIR``, else containerd's ``/etc/containerd/certs.d``."""
    return os.environ.get(HOSTS_DIR_ENV) or DEFAULT_HOSTS_DIR


def use_hosts_dir(path: str) -> str:
    """Make ``path`` the hosts directory of this process and the daemons it starts
    (``--hosts-dir``); ConfigError if it is not a directory."""
    absolute = os.path.abspath(path)
    if not os.path.isdir(absolute):
        raise ConfigError(f"--hosts-dir {path}: no such directory")
    os.environ[HOSTS_DIR_ENV] = absolute
    return absolute


def load_hosts(registry: str, hosts_dir: str | os.PathLike[str] | None = None, *,
               insecure: bool | None = None) -> RegistryHosts:
    """The endpoints of ``registry`` (``HOST[:PORT]``) under ``hosts_dir`` (default:
    ``default_hosts_dir()``); just the registry itself when nothing configures it."""
    root = Path(hosts_dir if hosts_dir is not None else default_hosts_dir())
    for directory in host_dirs(root, registry):
        if not directory.is_dir():
            continue
        path = directory / "hosts.toml"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return _cert_files(directory, registry, insecure)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
        if not text.strip():
            return _cert_files(directory, registry, insecure)
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
        hosts = parse_hosts(decoded, registry, base_dir=directory, name=str(path),
                            insecure=insecure)
        _check_files(hosts, path)
        log.debug("%s: endpoints %s", registry, hosts.describe())
        return hosts
    return RegistryHosts(registry, (Endpoint(origin_url(registry, insecure)),))


def _check_files(hosts: RegistryHosts, path: Path) -> None:
    for e in hosts.endpoints:
        what = "server" if e.server else f"[host.{_quote(e.name)}]"
        for ca in e.ca:
            if not os.path.isfile(ca):
                raise ConfigError(f"{path}: {what}: CA file {ca} does not exist")
        for cert, key in e.client:
            for p in (cert, key):
                if p is not None and not os.path.isfile(p):
                    raise ConfigError(f"{path}: {what}: client certificate file {p} "
                                      "does not exist")
