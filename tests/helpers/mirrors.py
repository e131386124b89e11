"""Parts for the mirror and proxy tests: hosts.toml files, certificates, a forward proxy.

Owns: ``write_hosts`` (a ``hosts.toml`` for a registry in containerd's layout
under a hosts directory), ``make_certificates`` (a CA and a server
certificate for 127.0.0.1 signed by it, PEM files, with ``cryptography``),
``TinyProxy`` (Debian's ``tinyproxy`` as a real HTTP forward proxy on
127.0.0.1:RANDOM, foreground, its own config and log, always stopped; the
log records every request it relayed) and ``random_files_image`` (an OCI
image of incompressible files, so every chunk is a real fetch).

Like the other helpers it does not import rafs: it builds inputs and runs
real programs.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bench.registry import free_port
from tests.helpers.ocibuild import build_oci_image, dir_entry, file_entry

__all__ = ["Certificates", "TinyProxy", "make_certificates", "random_files_image",
           "write_hosts"]

TINYPROXY = "/usr/bin/tinyproxy"


def write_hosts(hosts_dir: Path, registry: str, text: str, dirname: str | None = None) -> Path:
    """Write ``text`` as ``hosts_dir/REGISTRY/hosts.toml`` (or ``dirname``); its path."""
    directory = hosts_dir / (dirname or registry)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(text)
    return path


def random_files_image(layout: Path, tag: str, count: int, size: int,
                       seed: int = 7) -> dict[str, bytes]:
    """An OCI image with ``count`` files of ``size`` random bytes under /data;
    {path in the image: bytes}."""
    rng = random.Random(seed)
    files = {f"data/f{i:03d}.bin": rng.randbytes(size) for i in range(count)}
    entries = [dir_entry("data"), *(file_entry(p, d) for p, d in files.items())]
    build_oci_image(layout, tag, [entries])
    return files


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA certificate (what a client trusts)
    cert: Path  # the server certificate for 127.0.0.1, signed by the CA
    key: Path  # the server's private key


def make_certificates(directory: Path) -> Certificates:
    """A CA and a server certificate for IP 127.0.0.1 (and localhost) signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rafs test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    out = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return out


class TinyProxy:
    """``tinyproxy`` in the foreground on 127.0.0.1:RANDOM; use as a context manager.

    ``url`` is what ``HTTP_PROXY`` takes; ``requests()`` the request lines it
    logged (``GET http://HOST/PATH``, ``CONNECT HOST:PORT``)."""

    def __init__(self) -> None:
        self.port = 0
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "tinyproxy.log"

    def __enter__(self) -> TinyProxy:
        if not os.access(TINYPROXY, os.X_OK):
            raise RuntimeError(f"{TINYPROXY} not found: install the tinyproxy-bin package")
        self._dir = Path(tempfile.mkdtemp(prefix="rafs-tinyproxy-"))
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        assert self._dir is not None
        self.port = free_port()
        conf = self._dir / "tinyproxy.conf"
        conf.write_text(
            f"Port {self.port}\nListen 127.0.0.1\nTimeout 120\nAllow 127.0.0.1\n"
            f"LogFile \"{self.log_path}\"\nLogLevel Info\nMaxClients 64\n"
            "DisableViaHeader Yes\nConnectPort 443\n"
            + ("User nobody\nGroup nogroup\n" if os.geteuid() == 0 else ""))
        os.chmod(self._dir, 0o777)  # it drops to nobody and writes its log there
        self._proc = subprocess.Popen([TINYPROXY, "-d", "-c", str(conf)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self._proc.returncode}: "
                                   f"{self._log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"tinyproxy did not listen: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        return ""

    def requests(self) -> list[str]:
        """Request lines tinyproxy logged (``Request (file descriptor N): GET ...``)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line.split("): ", 1)[1] for line in text.splitlines()
                if "Request (file descriptor" in line and "): " in line]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
