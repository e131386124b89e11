"""OCI image plumbing: media types, descriptors, manifests, references, image layouts.

This module owns everything about *where image bytes live and what they are
called*: the media types and annotations of a RAFS image, the descriptor and
manifest records, skopeo-style image references (``oci:DIR[:TAG]``,
``docker-archive:FILE[:REF]``, ``docker://HOST/REPO:TAG``) and the OCI image
layout on disk (``oci-layout``, ``index.json``, ``blobs/sha256/...``).

No FUSE and no conversion logic. Everything written here is canonical JSON
(sorted keys, compact separators) so the same input gives the same digests.
Digests are validated before they are used to build a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import DigestError, ImageError, MediaTypeError

log = logging.getLogger(__name__)

__all__ = [
    "ANNOTATION_RAFS_BLOB",
    "ANNOTATION_RAFS_BOOTSTRAP",
    "ANNOTATION_RAFS_BOOTSTRAP_DIGEST",
    "ANNOTATION_RAFS_SOURCE_CONFIG",
    "ANNOTATION_RAFS_SOURCE_DIGEST",
    "ANNOTATION_RAFS_VERSION",
    "ANNOTATION_REF_NAME",
    "MEDIA_TYPE_RAFS_BLOB",
    "MEDIA_TYPE_RAFS_BOOTSTRAP",
    "Descriptor",
    "ImageRef",
    "Manifest",
    "OCILayout",
    "bootstrap_descriptor",
    "canonical_json",
    "check_digest",
    "host_platform",
    "is_rafs",
    "parse_image_ref",
    "parse_manifest",
]

# -- media types --------------------------------------------------------------

# Both start with "application/vnd.oci.image.layer." on purpose: containerd
# (images.IsLayerType) treats only such types as layers. Layers are what its
# unpacker offers to a remote snapshotter (with the labels ctr-remote and CRI
# add) before fetching them; any other type is fetched whole as a "non-layer"
# and then fails to unpack.
MEDIA_TYPE_RAFS_BLOB = "application/vnd.oci.image.layer.rafs.blob.v1"
MEDIA_TYPE_RAFS_BOOTSTRAP = "application/vnd.oci.image.layer.rafs.bootstrap.v1.erofs+zstd"

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_TYPE_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

MANIFEST_TYPES = frozenset({MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST})
INDEX_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})

# Layer media type -> compression it announces ("gzip", "zstd" or "none").
LAYER_TYPES: dict[str, str] = {
    MEDIA_TYPE_OCI_LAYER: "none",
    MEDIA_TYPE_OCI_LAYER_GZIP: "gzip",
    MEDIA_TYPE_OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    MEDIA_TYPE_DOCKER_LAYER: "none",
    MEDIA_TYPE_DOCKER_LAYER_GZIP: "gzip",
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN: "gzip",
}

# -- annotations --------------------------------------------------------------

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_RAFS_VERSION = "io.rafs.version"  # on the manifest; value "1"
ANNOTATION_RAFS_SOURCE_DIGEST = "io.rafs.source.digest"  # source manifest digest, if any
ANNOTATION_RAFS_SOURCE_CONFIG = "io.rafs.source.config-digest"  # source config digest
ANNOTATION_RAFS_BLOB = "io.rafs.blob"  # on blob layers; value "true"
ANNOTATION_RAFS_BOOTSTRAP = "io.rafs.bootstrap"  # on the bootstrap layer; value "true"
ANNOTATION_RAFS_BOOTSTRAP_DIGEST = "io.rafs.bootstrap.uncompressed-digest"

RAFS_VERSION = "1"

DEFAULT_MAX_BLOB = 64 << 20  # read_blob limit: manifests, configs and bootstraps
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_LAYOUT_VERSION = "1.0.0"

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
         "i686": "386", "i386": "386"}


def canonical_json(value: Any) -> bytes:
    """The one JSON encoding rafs writes: sorted keys, compact, UTF-8.

    Strings holding lone surrogates (legal ``\\udcff`` escapes in the JSON we
    read) cannot be UTF-8: such a document is written with ASCII escapes instead.
    """
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: object) -> str:
    """Return ``digest`` if it is ``sha256:`` + 64 lowercase hex, else raise DigestError."""
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise DigestError(f"unsupported or malformed digest {digest!r}")
    return digest


def host_platform() -> tuple[str, str]:
    """(os, architecture) in OCI terms for this machine."""
    machine = platform.machine().lower()
    return "linux", _ARCH.get(machine, machine)


# -- records ------------------------------------------------------------------


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting
        raise ImageError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what} is not a JSON object")
    return value


@dataclass
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    urls: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        if self.urls:
            out["urls"] = list(self.urls)
        return out

    @classmethod
    def from_json(cls, value: object) -> Descriptor:
        if not isinstance(value, dict):
            raise ImageError("descriptor is not a JSON object")
        media_type = value.get("mediaType")
        size = value.get("size")
        annotations = value.get("annotations") or {}
        if not isinstance(media_type, str):
            raise ImageError("descriptor has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ImageError(f"descriptor of {media_type} has a bad size {size!r}")
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise ImageError(f"descriptor of {media_type} has bad annotations")
        plat = value.get("platform")
        urls = value.get("urls")
        return cls(
            media_type=media_type,
            digest=check_digest(value.get("digest")),
            size=size,
            annotations=dict(annotations),
            platform=dict(plat) if isinstance(plat, dict) else None,
            urls=list(urls) if isinstance(urls, list) else None,
        )


@dataclass
class Manifest:
    """An image manifest, with the exact bytes it was read from or written as."""

    media_type: str
    config: Descriptor
    layers: list[Descriptor]
    annotations: dict[str, str]
    raw: bytes
    digest: str


def parse_manifest(raw: bytes, digest: str | None = None) -> Manifest:
    """Parse an OCI or Docker v2 image manifest; ``digest`` defaults to its sha256."""
    value = _load_json(raw, "manifest")
    media_type = value.get("mediaType") or MEDIA_TYPE_OCI_MANIFEST
    if media_type not in MANIFEST_TYPES:
        raise MediaTypeError(f"not an image manifest: media type {media_type}")
    if value.get("schemaVersion") != 2:
        raise ImageError(f"unsupported manifest schemaVersion {value.get('schemaVersion')!r}")
    layers = value.get("layers")
    if not isinstance(layers, list):
        raise ImageError("manifest has no layers list")
    annotations = value.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ImageError("manifest has bad annotations")
    return Manifest(
        media_type=media_type,
        config=Descriptor.from_json(value.get("config")),
        layers=[Descriptor.from_json(d) for d in layers],
        annotations=dict(annotations),
        raw=raw,
        digest=digest or sha256_digest(raw),
    )


def select_platform(raw: bytes, digest: str) -> Descriptor:
    """The entry of the image index ``raw`` for this machine's platform."""
    index = _load_json(raw, f"image index {digest}")
    manifests = index.get("manifests")
    if not isinstance(manifests, list):
        raise ImageError(f"image index {digest} has no manifests list")
    want_os, want_arch = host_platform()
    for child in map(Descriptor.from_json, manifests):
        plat = child.platform or {}
        if plat.get("os") == want_os and plat.get("architecture") == want_arch:
            return child
    raise ImageError(f"image index {digest} has no {want_os}/{want_arch} image")


def is_rafs(manifest: Manifest) -> bool:
    """Whether ``manifest`` describes a RAFS image (a bootstrap layer plus blobs)."""
    return ANNOTATION_RAFS_VERSION in manifest.annotations or any(
        d.media_type == MEDIA_TYPE_RAFS_BOOTSTRAP for d in manifest.layers
    )


def bootstrap_descriptor(manifest: Manifest) -> Descriptor:
    """The bootstrap layer of a RAFS image (the last layer); ImageError otherwise."""
    if not manifest.layers or manifest.layers[-1].media_type != MEDIA_TYPE_RAFS_BOOTSTRAP:
        raise ImageError(f"image {manifest.digest} is not a RAFS image (no bootstrap layer)")
    return manifest.layers[-1]


# -- references ---------------------------------------------------------------

TRANSPORTS = ("oci", "docker-archive", "docker")


@dataclass(frozen=True)
class ImageRef:
    """A skopeo-style image reference.

    ``oci``: ``path`` is the layout directory, ``tag`` the ref name (or None).
    ``docker-archive``: ``path`` is the tar file, ``tag`` an optional repo:tag inside it.
    ``docker``: ``path`` is ``HOST/REPO``, ``tag`` the tag, ``digest`` a pinned digest.
    """

    transport: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        """``HOST[:PORT]`` of a ``docker`` reference."""
        return self.path.partition("/")[0]

    @property
    def repository(self) -> str:
        """The repository name within the registry of a ``docker`` reference."""
        return self.path.partition("/")[2]

    def __str__(self) -> str:
        if self.transport == "docker":
            return f"docker://{self.path}" + (f"@{self.digest}" if self.digest else
                                              f":{self.tag}" if self.tag else "")
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


def _docker_ref(rest: str, original: str) -> ImageRef:
    name, digest = rest, None
    if "@" in rest:
        name, digest = rest.split("@", 1)
        if not _DIGEST_RE.fullmatch(digest):
            raise ImageError(f"bad digest in image reference {original!r}")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
            raise ImageError(f"bad tag in image reference {original!r}")
    first, _, remainder = name.partition("/")
    repo = remainder or first
    if not name or repo != repo.lower() or not re.fullmatch(r"[a-z0-9._/-]+", repo):
        raise ImageError(f"bad image reference {original!r}")
    if not remainder or ("." not in first and ":" not in first and first != "localhost"):
        # Docker Hub short names: alpine -> docker.io/library/alpine.
        name = "docker.io/" + (name if remainder else "library/" + name)
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef("docker", name, tag, digest)


def parse_image_ref(s: str) -> ImageRef:
    """Parse ``oci:DIR[:TAG]``, ``docker-archive:FILE[:REF]`` or ``docker://HOST/REPO:TAG``.

    As skopeo does, the path ends at the first ``:`` after the transport, so
    directory names cannot contain a colon but tags may (``oci:d:reg/repo:1``).
    """
    if s.startswith("docker://"):
        return _docker_ref(s[len("docker://"):], s)
    transport, sep, rest = s.partition(":")
    if not sep or transport not in ("oci", "docker-archive"):
        raise ImageError(
            f"bad image reference {s!r}: expected oci:DIR[:TAG], docker-archive:FILE "
            "or docker://HOST/REPO:TAG"
        )
    path, _, tag = rest.partition(":")
    if not path:
        raise ImageError(f"bad image reference {s!r}: no path")
    return ImageRef(transport, path, tag or None)


# -- the layout on disk -------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; layouts are world-readable like skopeo's
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise index.json updates between processes (flock on the layout directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class OCILayout:
    """An OCI image layout directory."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            marker = _load_json((self.path / "oci-layout").read_bytes(), "oci-layout")
        except FileNotFoundError:
            raise ImageError(f"{self.path} is not an OCI image layout (no oci-layout)") from None
        except OSError as e:
            raise ImageError(f"{self.path}: {e.strerror}") from None
        if marker.get("imageLayoutVersion") != _LAYOUT_VERSION:
            raise ImageError(
                f"{self.path}: unsupported imageLayoutVersion {marker.get('imageLayoutVersion')!r}"
            )
        if not (self.path / "index.json").is_file():
            raise ImageError(f"{self.path} is not an OCI image layout (no index.json)")

    @classmethod
    def create(cls, path: Path | str) -> OCILayout:
        """Open the layout at ``path``; write ``oci-layout`` and ``index.json`` if missing."""
        path = Path(path)
        try:
            (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            if not (path / "oci-layout").exists():
                _write_atomic(path / "oci-layout",
                              canonical_json({"imageLayoutVersion": _LAYOUT_VERSION}))
            if not (path / "index.json").exists():
                _write_atomic(path / "index.json", canonical_json(
                    {"schemaVersion": 2, "mediaType": MEDIA_TYPE_OCI_INDEX, "manifests": []}))
        except OSError as e:
            raise ImageError(f"cannot create OCI layout {path}: {e.strerror or e}") from None
        return cls(path)

    # blobs

    def blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.path / "blobs" / "sha256" / digest[len("sha256:"):]

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        """Open a blob for streaming; the caller verifies what it reads."""
        path = self.blob_path(digest)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise ImageError(f"{self.path}: blob {digest} is missing") from None
        except OSError as e:
            raise ImageError(f"{self.path}: blob {digest}: {e.strerror}") from None

    def read_blob(self, digest: str, max_size: int = DEFAULT_MAX_BLOB) -> bytes:
        """Read a whole (small) blob and verify its sha256."""
        with self.open_blob(digest) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_size:
                raise ImageError(f"blob {digest} is {size} bytes, more than {max_size} allowed")
            data = f.read(max_size + 1)
        if sha256_digest(data) != digest:
            raise DigestError(f"blob {digest} in {self.path} does not match its digest")
        return data

    def put_blob_bytes(
        self, data: bytes, media_type: str, annotations: dict[str, str] | None = None
    ) -> Descriptor:
        digest = sha256_digest(data)
        path = self.blob_path(digest)
        if not path.is_file():
            _write_atomic(path, data)
        return Descriptor(media_type, digest, len(data), dict(annotations or {}))

    def put_blob_file(
        self,
        tmp_path: Path,
        digest: str,
        size: int,
        media_type: str,
        annotations: dict[str, str] | None = None,
    ) -> Descriptor:
        """Move a finished, already verified temp file into place (same filesystem)."""
        path = self.blob_path(digest)
        if path.is_file():
            os.unlink(tmp_path)
        else:
            with open(tmp_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        return Descriptor(media_type, digest, size, dict(annotations or {}))

    # index and manifests

    def _index(self) -> dict[str, Any]:
        try:
            raw = (self.path / "index.json").read_bytes()
        except OSError as e:
            raise ImageError(f"{self.path}/index.json: {e.strerror}") from None
        index = _load_json(raw, f"{self.path}/index.json")
        if not isinstance(index.get("manifests", []), list):
            raise ImageError(f"{self.path}/index.json has no manifests list")
        return index

    def index_entries(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self._index().get("manifests", [])]

    def tags(self) -> list[str]:
        return [d.annotations[ANNOTATION_REF_NAME] for d in self.index_entries()
                if ANNOTATION_REF_NAME in d.annotations]

    def resolve(self, tag: str | None) -> Manifest:
        """The image manifest tagged ``tag`` (None: the only image in the layout)."""
        entries = self.index_entries()
        if tag is None:
            if len(entries) != 1:
                raise ImageError(
                    f"{self.path} holds {len(entries)} images; name one with oci:DIR:TAG"
                )
            desc = entries[0]
        else:
            found = [d for d in entries if d.annotations.get(ANNOTATION_REF_NAME) == tag]
            if not found:
                raise ImageError(f"{self.path} has no image tagged {tag!r}")
            desc = found[-1]
        return self._follow(desc)

    def _follow(self, desc: Descriptor, depth: int = 0) -> Manifest:
        if desc.media_type in MANIFEST_TYPES:
            raw = self.read_blob(desc.digest)
            return parse_manifest(raw, desc.digest)
        if desc.media_type not in INDEX_TYPES:
            raise MediaTypeError(f"unexpected media type {desc.media_type} in image index")
        if depth > 4:
            raise ImageError(f"{self.path}: image indexes nested too deeply")
        return self._follow(select_platform(self.read_blob(desc.digest), desc.digest), depth + 1)

    def put_manifest(
        self, manifest: dict[str, Any], tag: str, platform: dict[str, Any] | None = None
    ) -> Manifest:
        """Store ``manifest`` and point ``tag`` at it, replacing that tag atomically."""
        raw = canonical_json(manifest)
        parsed = parse_manifest(raw)
        desc = self.put_blob_bytes(raw, parsed.media_type, {ANNOTATION_REF_NAME: tag})
        desc.platform = platform
        _fsync_dir(self.path / "blobs" / "sha256")  # every blob named before the index is
        with _locked(self.path):
            index = self._index()
            kept = [d for d in index.get("manifests", [])
                    if not (isinstance(d, dict)
                            and (d.get("annotations") or {}).get(ANNOTATION_REF_NAME) == tag)]
            index["manifests"] = [*kept, desc.to_json()]
            index.setdefault("schemaVersion", 2)
            index.setdefault("mediaType", MEDIA_TYPE_OCI_INDEX)
            _write_atomic(self.path / "index.json", canonical_json(index))
            _fsync_dir(self.path)
        log.debug("tagged %s as %s in %s", parsed.digest, tag, self.path)
        return parsed

    def iter_blobs(self) -> Iterator[str]:
        """Every blob digest present in the layout."""
        root = self.path / "blobs" / "sha256"
        for p in sorted(root.iterdir()) if root.is_dir() else ():
            if re.fullmatch(r"[0-9a-f]{64}", p.name):
                yield "sha256:" + p.name
