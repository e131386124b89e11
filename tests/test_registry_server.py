"""The registry fixture is a real OCI registry: skopeo pushes to it and reads back,
its access log counts the requests, and it leaves no process or storage behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from bench.registry import RegistryError, RegistryServer, parse_access_line
from tests.helpers.ocibuild import build_oci_image, dir_entry, file_entry
from tests.helpers.procs import run


def _small_layout(tmp_path: Path) -> tuple[Path, str]:
    layout = tmp_path / "layout"
    digest = build_oci_image(
        layout, "v1",
        [[dir_entry("etc"), file_entry("etc/hello", b"hello registry\n")],
         [file_entry("big", os.urandom(200_000))]],
    )
    return layout, digest


def test_skopeo_push_then_inspect_shows_the_same_manifest(registry, tmp_path):
    layout, digest = _small_layout(tmp_path)
    registry.mark()
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}:v1", f"docker://{registry.host}/selftest/small:v1"],
        timeout=60, check=True)
    out = run(["skopeo", "inspect", "--tls-verify=false",
               f"docker://{registry.host}/selftest/small:v1"], timeout=60, check=True)
    info = json.loads(out.stdout)
    assert info["Digest"] == digest
    assert len(info["Layers"]) == 2

    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false",
               f"docker://{registry.host}/selftest/small:v1"], timeout=60, check=True)
    local = (layout / "blobs" / "sha256" / digest.split(":")[1]).read_text()
    assert json.loads(raw.stdout) == json.loads(local)

    # the registry's own account: one manifest PUT, blob uploads finished by PUT
    records = registry.access_log(since_mark=True)
    puts = [r for r in records if r.method == "PUT"]
    assert any("/manifests/v1" in r.path and r.status == 201 for r in puts)
    assert sum("/blobs/uploads/" in r.path and r.status == 201 for r in puts) == 3


def test_access_log_counts_blob_bytes_and_ranges(registry, tmp_path):
    layout, digest = _small_layout(tmp_path)
    run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
         f"oci:{layout}:v1", f"docker://{registry.host}/selftest/ranges:v1"],
        timeout=60, check=True)
    manifest = json.loads((layout / "blobs" / "sha256" / digest.split(":")[1]).read_text())
    big = max(manifest["layers"], key=lambda d: d["size"])
    blob_url = f"{registry.url}/v2/selftest/ranges/blobs/{big['digest']}"

    registry.mark()
    with httpx.Client() as client:
        full = client.get(blob_url)
        part = client.get(blob_url, headers={"Range": "bytes=100-1099"})
        head = client.head(blob_url)
    assert full.status_code == 200 and len(full.content) == big["size"]
    assert part.status_code == 206 and part.content == full.content[100:1100]
    assert head.status_code == 200

    gets = registry.blob_gets()
    assert [(r.status, r.bytes) for r in gets] == [(200, big["size"]), (206, 1000)]
    heads = [r for r in registry.access_log(since_mark=True) if r.method == "HEAD"]
    assert len(heads) == 1 and heads[0].body_bytes == 0


def test_parse_access_line_reads_the_combined_format():
    line = ('127.0.0.1 - - [22/Nov/2026:18:25:13 +0000] "GET /v2/x/blobs/sha256:ab?n=1 '
            'HTTP/1.1" 206 1000 "" "python-httpx/0.28.1"')
    rec = parse_access_line(line)
    assert rec is not None
    assert (rec.method, rec.path, rec.status, rec.bytes) == (
        "GET", "/v2/x/blobs/sha256:ab", 206, 1000)
    assert rec.user_agent == "python-httpx/0.28.1"
    assert parse_access_line('{"level":"info","msg":"listening"}') is None


def test_registry_stops_and_removes_its_storage():
    with RegistryServer() as reg:
        pid, storage = reg.pid, reg.storage
        assert httpx.get(f"{reg.url}/v2/").status_code == 200
        assert storage.is_dir()
    assert not storage.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_registry_that_cannot_start_is_a_clear_error(tmp_path):
    with pytest.raises(RegistryError, match="not found"), RegistryServer(
        binary=str(tmp_path / "no-such-registry")
    ):
        pass
