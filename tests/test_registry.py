"""The registry client and `docker://` images against Debian's real docker-registry.

Interop: what rafs pushes, skopeo reads back byte for byte; what skopeo pushes
(Docker schema 2), rafs converts. Uploads: a HEAD before each blob, so nothing
is uploaded twice; monolithic, chunked and cross-repository-mounted uploads, as
the registry's own access log shows. Manifests: indexes resolve to this
platform, a digest reference is checked. Mounts from the registry show the
same tree as `umoci unpack` of the source, and stay frugal: one small file
costs the bootstrap plus at most one amplified Range request.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from rafs.errors import ImageError
from rafs.oci import (
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    OCILayout,
    parse_image_ref,
    sha256_digest,
)
from rafs.registry import RegistryClient
from tests.helpers.mounts import mounted, rafs_cmd, read_stats
from tests.helpers.procs import run
from tests.helpers.treecmp import compare_trees
from tests.helpers.umoci import umoci_unpack

AMPLIFY = 1 << 20


def _client(ref: str, **kwargs) -> tuple[RegistryClient, str]:
    image = parse_image_ref(ref)
    return RegistryClient.for_ref(image, **kwargs), image.repository


def _uploads(records, digest: str, repo: str | None = None) -> list:
    """Completed uploads of ``digest`` (the final PUT of each upload), into ``repo`` if
    given: the session registry is shared, and other tests push the same base layers."""
    return [r for r in records if r.method == "PUT" and "/blobs/uploads/" in r.path
            and (repo is None or r.path.startswith(f"/v2/{repo}/blobs/uploads/"))
            and f"digest={digest.replace(':', '%3A')}" in r.uri and r.status == 201]


def test_skopeo_reads_back_the_pushed_image_byte_for_byte(rafs_python_ref, tmp_path):
    ref = parse_image_ref(rafs_python_ref)
    with RegistryClient.for_ref(ref) as client:
        manifest = client.resolve(ref)
    res = run(["skopeo", "inspect", "--tls-verify=false", rafs_python_ref], timeout=60)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["Digest"] == manifest.digest
    assert info["Layers"] == [d.digest for d in manifest.layers]
    res = run(["skopeo", "copy", "--src-tls-verify=false", rafs_python_ref,
               f"oci:{tmp_path / 'copy'}:x"], timeout=120)
    assert res.returncode == 0, res.stderr
    copied = OCILayout(tmp_path / "copy").resolve("x")
    assert copied.digest == manifest.digest and copied.raw == manifest.raw
    for desc in [manifest.config, *manifest.layers]:
        path = OCILayout(tmp_path / "copy").blob_path(desc.digest)
        assert sha256_digest(path.read_bytes()) == desc.digest


def test_an_image_sharing_base_layers_uploads_none_of_them_again(
    registry, rafs_python_ref, rafs_numpy_ref, debian_image
):
    py_ref, np_ref = parse_image_ref(rafs_python_ref), parse_image_ref(rafs_numpy_ref)
    with RegistryClient.for_ref(py_ref) as client:
        py, np = client.resolve(py_ref), client.resolve(np_ref)
    shared = {d.digest for d in py.layers} & {d.digest for d in np.layers}
    assert shared, "the numpy image should share its base blobs with the python3 image"
    log = registry.access_log()
    for digest in shared:
        assert len(_uploads(log, digest, "rafs/debian")) == 1, digest
    # Pushing the same image again to a new tag sends no blob at all.
    registry.mark()
    src, tag = debian_image
    res = run(rafs_cmd("convert", f"oci:{src}:{tag}", registry.ref("rafs/debian", "again"),
                       "--no-progress"), timeout=300)
    assert res.returncode == 0, res.stderr
    since = registry.access_log(since_mark=True)
    assert [r for r in since if r.method in ("PATCH", "PUT") and "/blobs/" in r.path] == []
    assert [r.method for r in since if "/manifests/" in r.path] == ["PUT"]


def test_chunked_monolithic_and_mounted_uploads(registry):
    data = os.urandom(300_000)
    digest = sha256_digest(data)
    small = b"a small blob"
    small_digest = sha256_digest(small)
    with RegistryClient(registry.host, chunk_threshold=256_000, upload_chunk=100_000) as client:
        registry.mark()
        assert client.push_blob("up/chunked", digest, len(data), data) is True
        log = registry.access_log(since_mark=True)
        assert [r.status for r in log if r.method == "PATCH"] == [202, 202, 202]
        assert len(_uploads(log, digest)) == 1
        assert client.get_blob("up/chunked", digest, 1 << 20) == data

        registry.mark()
        assert client.push_blob("up/mono", small_digest, len(small), small) is True
        log = registry.access_log(since_mark=True)
        assert [r for r in log if r.method == "PATCH"] == []
        assert len(_uploads(log, small_digest)) == 1

        # Already there: HEAD only.
        registry.mark()
        assert client.push_blob("up/chunked", digest, len(data), data) is False
        assert [r.method for r in registry.access_log(since_mark=True)] == ["HEAD"]

        # Another repository of the same registry: mounted, not uploaded.
        registry.mark()
        assert client.push_blob("up/other", digest, len(data), data,
                                mount_from="up/chunked") is False
        log = registry.access_log(since_mark=True)
        assert [(r.method, r.status) for r in log] == [("HEAD", 404), ("POST", 201)]
        assert client.head_blob("up/other", digest) == len(data)


def test_an_index_resolves_to_this_platform_and_digests_are_checked(registry, rafs_python_ref):
    ref = parse_image_ref(rafs_python_ref)
    with RegistryClient.for_ref(ref) as client:
        manifest = client.resolve(ref)
        entry = {"mediaType": manifest.media_type, "digest": manifest.digest,
                 "size": len(manifest.raw)}
        index = json.dumps({"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": [
            {**entry, "platform": {"os": "linux", "architecture": "riscv64"}},
            {**entry, "platform": {"os": "linux", "architecture": "amd64"}},
        ]}).encode()
        index_digest = client.put_manifest(ref.repository, "multi", index, MEDIA_TYPE_OCI_INDEX)
        resolved = client.resolve(parse_image_ref(f"docker://{ref.path}:multi"))
        assert resolved.digest == manifest.digest
        by_digest = client.resolve(parse_image_ref(f"docker://{ref.path}@{index_digest}"))
        assert by_digest.digest == manifest.digest
        missing = "sha256:" + "0" * 64
        with pytest.raises(ImageError, match="not found"):
            client.resolve(parse_image_ref(f"docker://{ref.path}@{missing}"))
        with pytest.raises(ImageError, match="not found"):
            client.get_blob(ref.repository, missing, 100)
        with pytest.raises(ImageError, match="larger than"):  # a size cap holds
            client.get_blob(ref.repository, manifest.config.digest, manifest.config.size - 1)


def test_converts_a_docker_schema2_image_from_the_registry(registry, debian_image, tmp_path):
    src, tag = debian_image
    plain = registry.ref("plain/python", "v2s2")
    res = run(["skopeo", "copy", "--dest-tls-verify=false", "--format", "v2s2",
               f"oci:{src}:{tag}", plain], timeout=300)
    assert res.returncode == 0, res.stderr
    with RegistryClient(registry.host) as client:
        assert client.resolve(parse_image_ref(plain)).media_type == MEDIA_TYPE_DOCKER_MANIFEST
    out = tmp_path / "rafs"
    res = run(rafs_cmd("convert", plain, f"oci:{out}:x", "--no-progress"), timeout=300)
    assert res.returncode == 0, res.stderr
    res = run(rafs_cmd("check", f"oci:{out}:x"), timeout=300)
    assert res.returncode == 0, res.stderr


def test_a_missing_image_is_a_one_line_error(registry, tmp_path):
    res = run(rafs_cmd("convert", registry.ref("no/such", "image"), f"oci:{tmp_path}/o:x"),
              timeout=60)
    assert res.returncode == 1
    assert res.stderr.startswith("rafs: error: ") and "not found" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    (tmp_path / "mnt").mkdir()
    res = run(rafs_cmd("mount", registry.ref("no/such", "image"), tmp_path / "mnt",
                       "--cache-dir", tmp_path / "cache"), timeout=60)
    assert res.returncode == 1 and "not found" in res.stderr


@pytest.fixture(scope="module")
def python_rootfs(debian_image, tmp_path_factory) -> Path:
    src, tag = debian_image
    return umoci_unpack(src, tag, tmp_path_factory.mktemp("umoci") / "bundle")


@pytest.mark.fuse
@pytest.mark.root
def test_the_registry_mount_shows_what_umoci_unpacks(rafs_python_ref, python_rootfs, tmp_path):
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert compare_trees(python_rootfs, mnt, ignore={b"."}) == []


@pytest.mark.fuse
def test_one_small_file_costs_the_bootstrap_and_one_amplified_range(
    registry, rafs_python_ref, tmp_path
):
    ref = parse_image_ref(rafs_python_ref)
    with RegistryClient.for_ref(ref) as client:
        manifest = client.resolve(ref)
    bootstrap = manifest.layers[-1]
    registry.mark()
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache",
                 extra_args=["--no-prefetch"]) as mnt:
        assert (mnt / "etc/debian_version").read_text().startswith("12")
        stats = read_stats(mnt)["stats"]
    gets = registry.blob_gets()
    assert gets[0].path.endswith(bootstrap.digest)
    ranges = gets[1:]
    assert len(ranges) == 1 == stats["backend_requests"]
    assert stats["backend_bytes"] <= AMPLIFY
    assert sum(g.body_bytes for g in gets) <= bootstrap.size + AMPLIFY


@pytest.mark.fuse
def test_concurrent_readers_of_one_chunk_cause_one_range_request(
    registry, rafs_python_ref, tmp_path
):
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache",
                 extra_args=["--no-prefetch", "--amplify-bytes", "0"]) as mnt:
        path = mnt / "usr/bin/python3.11"
        registry.mark()
        barrier = threading.Barrier(4)
        results: list[bytes] = []

        def read() -> None:
            barrier.wait()
            with open(path, "rb") as f:
                results.append(f.read(4096))

        threads = [threading.Thread(target=read) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(results)) == 1 and results[0].startswith(b"\x7fELF")
        assert len(registry.blob_gets()) == 1
        assert read_stats(mnt)["stats"]["backend_requests"] == 1


@pytest.mark.fuse
def test_the_cli_pushes_to_and_mounts_from_the_registry(registry, rafs_python_ref, tmp_path):
    with mounted(rafs_python_ref, tmp_path / "mnt", tmp_path / "cache") as mnt:
        res = subprocess.run(["chroot", str(mnt), "python3", "-c", "print(6 * 7)"],
                             capture_output=True, text=True, check=False, timeout=120)
        assert res.stdout == "42\n", res.stderr
        stats = read_stats(mnt)
        assert stats["image"] == rafs_python_ref
        assert 0 < stats["stats"]["backend_bytes"] < 30 << 20


@pytest.mark.fuse
def test_a_chunk_dictionary_in_the_registry_is_mounted_not_uploaded(
    registry, rafs_python_ref, debian_numpy_image, tmp_path
):
    src, tag = debian_numpy_image
    dst = registry.ref("dict/numpy", "rafs")
    registry.mark()
    res = run(rafs_cmd("convert", f"oci:{src}:{tag}", dst, "--no-progress",
                       "--chunk-dict", rafs_python_ref), timeout=600)
    assert res.returncode == 0, res.stderr
    log = registry.access_log(since_mark=True)
    with RegistryClient(registry.host) as client:
        dictionary = client.resolve(parse_image_ref(rafs_python_ref))
        image = client.resolve(parse_image_ref(dst))
    reused = {d.digest for d in dictionary.layers[:-1]} & {d.digest for d in image.layers}
    assert reused, "the numpy image should reuse the dictionary's blobs"
    mounts = [r for r in log if r.method == "POST" and "mount=" in r.uri and r.status == 201]
    assert len(mounts) == len(reused)
    for digest in reused:
        assert _uploads(log, digest) == []
    with mounted(dst, tmp_path / "mnt", tmp_path / "cache") as mnt:
        res = subprocess.run(["chroot", str(mnt), "python3", "-c", "import numpy"],
                             capture_output=True, text=True, check=False, timeout=300)
        assert res.returncode == 0, res.stderr


def test_inspect_and_check_read_an_image_in_the_registry(rafs_python_ref):
    res = run(rafs_cmd("inspect", "--json", rafs_python_ref), timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    ref = parse_image_ref(rafs_python_ref)
    with RegistryClient.for_ref(ref) as client:
        assert info["manifest_digest"] == client.resolve(ref).digest
    assert info["files"] > 1000
    res = run(rafs_cmd("check", rafs_python_ref), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: bootstrap and ")
