"""`bench.parentdirs`: layers get an entry for every parent directory, copied from the
layers below, and the image is otherwise unchanged."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from bench.parentdirs import add_parent_dirs


def _entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
           uid: int = 0, mtime: int = 1_700_000_000,
           xattrs: dict[str, str] | None = None) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.mtime, info.size = kind, mode, uid, mtime, len(data)
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
    return info, data


def _layer(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _put(layout: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return digest


def _layout(path: Path, layers: list[bytes]) -> None:
    (path / "blobs" / "sha256").mkdir(parents=True)
    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
              "digest": _put(path, gzip.compress(t, mtime=0)),
              "size": len(gzip.compress(t, mtime=0))} for t in layers]
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers",
                         "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]}}
    cdata = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": _put(path, cdata), "size": len(cdata)},
                "layers": descs}
    mdata = json.dumps(manifest).encode()
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": manifest["mediaType"], "digest": _put(path, mdata), "size": len(mdata),
         "annotations": {"org.opencontainers.image.ref.name": "t"}}]}))


def _read(layout: Path) -> tuple[dict, dict, list[list[tarfile.TarInfo]]]:
    index = json.loads((layout / "index.json").read_text())
    blob = lambda d: layout / "blobs" / "sha256" / d[7:]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    members = []
    for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        data = blob(layer["digest"]).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
        assert len(data) == layer["size"]
        tar = gzip.decompress(data)
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            members.append(t.getmembers())
    return manifest, config, members


def test_missing_parents_are_copied_from_the_layers_below(tmp_path: Path) -> None:
    lower = _layer([_entry("usr/", tarfile.DIRTYPE, mode=0o755),
                    _entry("usr/lib/", tarfile.DIRTYPE, mode=0o750, uid=7, mtime=1_600_000_000,
                           xattrs={"user.k": "v"}),
                    _entry("usr/lib/a", data=b"a")])
    upper = _layer([_entry("usr/lib/b", data=b"bb"),
                    _entry("opt/x/y", data=b"y")])  # opt exists nowhere below
    _layout(tmp_path / "src", [lower, upper])
    fixes = add_parent_dirs(tmp_path / "src", "t", tmp_path / "dst", "fixed")
    assert [f.added for f in fixes] == [0, 4]
    src_manifest, _, _ = _read(tmp_path / "src")
    manifest, _, (_first, second) = _read(tmp_path / "dst")
    assert manifest["layers"][0] == src_manifest["layers"][0]  # complete layer kept as is
    names = [m.name for m in second]
    assert names == ["usr", "usr/lib", "usr/lib/b", "opt", "opt/x", "opt/x/y"]
    lib = second[1]
    assert lib.isdir() and lib.mode == 0o750 and lib.uid == 7 and lib.mtime == 1_600_000_000
    assert lib.pax_headers.get("SCHILY.xattr.user.k") == "v"
    assert second[3].isdir() and second[3].mode == 0o755
    index = json.loads((tmp_path / "dst" / "index.json").read_text())
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "fixed"


def test_a_whited_out_directory_is_not_copied_back(tmp_path: Path) -> None:
    layers = [
        _layer([_entry("d/", tarfile.DIRTYPE, mode=0o700), _entry("d/f", data=b"f")]),
        _layer([_entry(".wh.d")]),  # removes d
        _layer([_entry("d/g", data=b"g")]),  # a new d: not the removed one's 0700
    ]
    _layout(tmp_path / "src", layers)
    assert [f.added for f in add_parent_dirs(tmp_path / "src", "t", tmp_path / "dst")] == \
        [0, 0, 1]
    _, _, members = _read(tmp_path / "dst")
    d = members[2][0]
    assert d.name == "d" and d.isdir() and d.mode == 0o755


def test_a_non_gzip_layer_is_refused(tmp_path: Path) -> None:
    _layout(tmp_path / "src", [_layer([_entry("a", data=b"a")])])
    index = json.loads((tmp_path / "src" / "index.json").read_text())
    mpath = tmp_path / "src" / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]
    manifest = json.loads(mpath.read_text())
    manifest["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+zstd"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a gzip layer"):
        add_parent_dirs(tmp_path / "src", "t", tmp_path / "dst")
