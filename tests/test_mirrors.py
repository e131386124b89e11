"""Mirrors and proxies with real parts: a pull-through docker-registry, TLS, tinyproxy.

The origin is the session's ``docker-registry``; the mirror is another
``docker-registry`` in pull-through mode (``proxy: remoteurl:`` the origin),
configured for the daemon with a containerd ``hosts.toml`` in a temporary
hosts directory. A mount reads through the mirror (its access log shows the
chunk GETs); the mirror stopped mid-read: reads go on from the origin with no
error and no wrong byte (sha256 of every file against the source); started
again: fetches return to it. A mirror that flips bytes (``FaultProxy``) or
stalls: no EIO, the origin serves, the mirror's digest errors and stalls are
counted. A TLS registry with a self-signed CA: ``ca`` and ``skip_verify``.
Bad hosts.toml: one error line naming the file, from ``rafs mount``,
``rafs convert`` and ``rafs run``. ``rafs convert docker://`` pulls through the mirror, and an
HTTP proxy (``HTTP_PROXY``, ``NO_PROXY``) carries the daemon's Range requests.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from bench.registry import RegistryServer
from tests.helpers.faultproxy import Fault, FaultProxy
from tests.helpers.mirrors import (
    TinyProxy,
    make_certificates,
    random_files_image,
    write_hosts,
)
from tests.helpers.mounts import mounted, rafs_cmd, read_stats
from tests.helpers.procs import assert_clean_error, run

pytestmark = [pytest.mark.fuse]

FILES, SIZE, CHUNK = 120, 96 << 10, 64 << 10
LAZY = ["--no-prefetch", "--amplify-bytes", "0"]  # every file read is its own fetch


@pytest.fixture(scope="module")
def files_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """(OCI layout, {path: bytes}) of an image of incompressible files."""
    layout = tmp_path_factory.mktemp("mirror-src") / "oci"
    return layout, random_files_image(layout, "v1", FILES, SIZE)


@pytest.fixture(scope="module")
def origin_ref(registry: RegistryServer, files_image: tuple[Path, dict[str, bytes]]) -> str:
    """The files image as RAFS (64 KiB chunks) in the origin registry."""
    from converter.convert import ConvertOptions, convert

    layout, _ = files_image
    ref = registry.ref("mirrors/files", "v1")
    convert(f"oci:{layout}:v1", ref, ConvertOptions(chunk_size=CHUNK, progress=False))
    return ref


def _mirror_hosts(tmp_path: Path, registry: RegistryServer, mirror_url: str) -> Path:
    hosts = tmp_path / "hosts"
    write_hosts(hosts, registry.host,
                f'server = "{registry.url}"\n\n'
                f'[host."{mirror_url}"]\n  capabilities = ["pull", "resolve"]\n')
    return hosts


def _check(mp: Path, files: dict[str, bytes], names: Iterable[str]) -> None:
    for name in names:
        got = hashlib.sha256((mp / name).read_bytes()).hexdigest()
        assert got == hashlib.sha256(files[name]).hexdigest(), f"wrong bytes in {name}"


def _stats(mp: Path) -> dict:
    return read_stats(mp)["stats"]  # type: ignore[return-value]


def test_pull_through_mirror_serves_fails_over_to_the_origin_and_comes_back(
        tmp_path: Path, registry: RegistryServer, origin_ref: str,
        files_image: tuple[Path, dict[str, bytes]]) -> None:
    _, files = files_image
    names = sorted(files)
    with RegistryServer(proxy_remote=registry.url) as mirror:
        hosts = _mirror_hosts(tmp_path, registry, mirror.url)
        with mounted(origin_ref, tmp_path / "mnt", tmp_path / "cache",
                     extra_args=["--hosts-dir", str(hosts), *LAZY]) as mp:
            _check(mp, files, names[:20])
            ep = _stats(mp)["endpoints"]
            assert set(ep) == {mirror.url, registry.url}
            assert ep[mirror.url]["state"] == "up" and ep[mirror.url]["role"] == "mirror"
            assert ep[mirror.url]["requests"] >= 20 and ep[mirror.url]["bytes"] > 0
            assert ep[registry.url]["requests"] == 0, "the origin was used while the mirror was up"
            assert mirror.blob_gets(since_mark=False), "the mirror's log shows no blob GET"

            mirror.halt()  # mid-read: the mirror goes away
            _check(mp, files, names[20:60])
            stats = _stats(mp)
            assert stats["errors"] == 0
            ep = stats["endpoints"]
            assert ep[mirror.url]["state"] == "down"
            assert ep[mirror.url]["errors"] >= 1
            assert ep[registry.url]["requests"] >= 40

            mirror.restart()
            mirror.mark()
            rest = iter(names[60:])
            deadline = time.monotonic() + 120  # the probe backoff is at most 30 s
            while True:  # read on, slowly, until a probe finds the mirror up again
                name = next(rest)
                _check(mp, files, [name])
                ep = _stats(mp)["endpoints"]
                if ep[mirror.url]["state"] == "up":
                    break
                assert time.monotonic() < deadline, f"the mirror never came back: {ep}"
                time.sleep(1.0)
            before = ep
            more = [next(rest) for _ in range(5)]
            _check(mp, files, more)
            stats = _stats(mp)
            ep = stats["endpoints"]
            assert ep[mirror.url]["requests"] >= before[mirror.url]["requests"] + 5
            assert ep[registry.url]["requests"] == before[registry.url]["requests"]
            assert mirror.blob_gets(since_mark=True), "no blob GET reached the restarted mirror"
            assert stats["errors"] == 0
            prom = run(rafs_cmd("stats", "--prometheus", mp), timeout=60, check=True).stdout
            assert 'rafs_endpoint_up{' in prom and f'endpoint="{mirror.url}"' in prom


def test_a_mirror_that_corrupts_bytes_never_reaches_a_reader(
        tmp_path: Path, registry: RegistryServer, origin_ref: str,
        files_image: tuple[Path, dict[str, bytes]]) -> None:
    _, files = files_image
    with FaultProxy(registry.host) as bad:
        rule = bad.inject(Fault.FLIP, lambda r: r.method == "GET" and "/blobs/" in r.path)
        hosts = _mirror_hosts(tmp_path, registry, bad.url)
        with mounted(origin_ref, tmp_path / "mnt", tmp_path / "cache",
                     extra_args=["--hosts-dir", str(hosts), *LAZY]) as mp:
            _check(mp, files, sorted(files))  # every byte right, and no EIO
            stats = _stats(mp)
        assert rule.hits >= 2  # the bootstrap, and at least one chunk
        assert stats["errors"] == 0
        mirror = stats["endpoints"][bad.url]
        assert mirror["digest_errors"] >= 1
        assert stats["digest_failures"] >= 1  # the fetcher caught them, then the origin served
        assert stats["endpoints"][registry.url]["requests"] >= 1


def test_a_stalling_mirror_is_passed_over_within_the_fetch_timeout(
        tmp_path: Path, registry: RegistryServer, origin_ref: str,
        files_image: tuple[Path, dict[str, bytes]]) -> None:
    _, files = files_image
    with FaultProxy(registry.host) as slow:
        hosts = _mirror_hosts(tmp_path, registry, slow.url)
        with mounted(origin_ref, tmp_path / "mnt", tmp_path / "cache",
                     extra_args=["--hosts-dir", str(hosts), "--fetch-timeout", "3",
                                 *LAZY]) as mp:
            # the manifest and the bootstrap came through the mirror; now it stalls
            rule = slow.inject(Fault.stall(60), lambda r: r.method == "GET"
                               and "/blobs/" in r.path)
            names = sorted(files)[:10]
            _check(mp, files, names)
            stats = _stats(mp)
        assert rule.hits >= 1
        assert stats["errors"] == 0
        assert stats["endpoints"][slow.url]["stalls"] >= 1
        assert stats["endpoints"][registry.url]["requests"] >= len(names)


def test_tls_registry_through_ca_and_skip_verify(
        tmp_path: Path, files_image: tuple[Path, dict[str, bytes]]) -> None:
    layout, files = files_image
    certs = make_certificates(tmp_path / "certs")
    with RegistryServer(tls=(certs.cert, certs.key)) as tls:
        with_ca = tmp_path / "with-ca"
        path = write_hosts(with_ca, tls.host, f'server = "{tls.url}"\nca = "ca.pem"\n')
        shutil.copy(certs.ca, path.parent / "ca.pem")  # relative to the hosts.toml
        ref = tls.ref("tls/files", "v1")
        run(rafs_cmd("convert", f"oci:{layout}:v1", ref, "--chunk-size", "64K",
                     "--hosts-dir", with_ca), timeout=300, check=True)
        assert any(r.method == "PUT" for r in tls.access_log()), "the push did not reach it"
        name = sorted(files)[3]
        with mounted(ref, tmp_path / "m1", tmp_path / "cache1",
                     extra_args=["--hosts-dir", str(with_ca)]) as mp:
            _check(mp, files, [name])
        skip = tmp_path / "skip"
        write_hosts(skip, tls.host, f'server = "{tls.url}"\nskip_verify = true\n')
        with mounted(ref, tmp_path / "m2", tmp_path / "cache2",
                     extra_args=["--hosts-dir", str(skip)]) as mp:
            _check(mp, files, [name])
        plain = tmp_path / "no-ca"
        write_hosts(plain, tls.host, f'server = "{tls.url}"\n')
        (tmp_path / "m3").mkdir()
        res = run(rafs_cmd("mount", ref, tmp_path / "m3", "--cache-dir", tmp_path / "cache3",
                           "--hosts-dir", plain, "--retries", "0"), timeout=180)
        message = assert_clean_error(res)
        assert "certificate verify failed" in message, message


BAD_HOSTS = {
    "syntax": ('[host."http://mirror:5000"\ncapabilities = ["pull"]\n', "not valid TOML"),
    "capability": ('[host."http://mirror:5000"]\ncapabilities = ["pull", "fetch"]\n',
                   "unknown capability 'fetch'"),
    "ca": ('[host."https://mirror:5000"]\nca = "missing-ca.pem"\n', "missing-ca.pem"),
    "url": ('[host."ftp://mirror:5000"]\ncapabilities = ["pull"]\n', "bad URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_HOSTS))
def test_a_bad_hosts_toml_is_one_error_line_naming_the_file(tmp_path: Path, case: str) -> None:
    text, words = BAD_HOSTS[case]
    registry = "127.0.0.1:1"  # never reached: the file is read first
    path = write_hosts(tmp_path / "hosts", registry, text)
    (tmp_path / "mnt").mkdir()
    for argv in (["mount", f"docker://{registry}/some/image:v1", tmp_path / "mnt",
                  "--cache-dir", tmp_path / "cache"],
                 ["convert", f"docker://{registry}/some/image:v1", f"oci:{tmp_path / 'out'}"],
                 ["run", "--rm", f"docker://{registry}/some/image:v1", "true"]):
        res = run(rafs_cmd(argv[0], "--hosts-dir", tmp_path / "hosts", *argv[1:]),
                  timeout=120)
        message = assert_clean_error(res)
        assert str(path) in message and words in message, message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_convert_pulls_a_docker_source_through_the_mirror(
        tmp_path: Path, registry: RegistryServer,
        files_image: tuple[Path, dict[str, bytes]]) -> None:
    layout, _ = files_image
    src = registry.ref("mirrors/plain", "v1")
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1", src],
                   check=True, capture_output=True, timeout=300)
    with RegistryServer(proxy_remote=registry.url) as mirror:
        hosts = _mirror_hosts(tmp_path, registry, mirror.url)
        registry.mark()
        run(rafs_cmd("convert", src, f"oci:{tmp_path / 'out'}:v1", "--hosts-dir", hosts),
            timeout=300, check=True)
        layers = [r for r in mirror.blob_gets(since_mark=False) if r.status == 200]
        assert layers, "the layers did not come through the mirror"
        ours = [r for r in registry.access_log(since_mark=True)
                if r.user_agent == "rafs" and "/blobs/" in r.path]
        assert ours == [], "rafs fetched blobs from the origin past the mirror"


def test_an_http_proxy_carries_range_requests_and_no_proxy_bypasses_it(
        tmp_path: Path, registry: RegistryServer, origin_ref: str,
        files_image: tuple[Path, dict[str, bytes]]) -> None:
    _, files = files_image
    names = sorted(files)[:8]
    with TinyProxy() as proxy:
        env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "", "no_proxy": ""}
        with mounted(origin_ref, tmp_path / "m1", tmp_path / "c1", env=env,
                     extra_args=LAZY) as mp:
            _check(mp, files, names)
            stats = _stats(mp)
        blob_gets = [r for r in proxy.requests() if r.startswith("GET ") and "/blobs/" in r]
        assert len(blob_gets) >= len(names), proxy.requests()
        assert stats["range_ignored"] == 0 and stats["errors"] == 0
        seen = len(proxy.requests())
        env = {**env, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        with mounted(origin_ref, tmp_path / "m2", tmp_path / "c2", env=env,
                     extra_args=LAZY) as mp:
            _check(mp, files, names)
        assert len(proxy.requests()) == seen, "NO_PROXY was not honoured"
