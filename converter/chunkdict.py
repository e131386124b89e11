"""Chunk dictionaries: dedup a conversion against the chunks of an earlier RAFS image.

``rafs convert --chunk-dict IMAGE`` loads IMAGE's verified bootstrap and seeds
the chunk store with its blobs and chunk table, so every chunk the new image
shares with IMAGE is referenced in IMAGE's blob instead of being stored again.
After the conversion, dictionary blobs that no file uses are dropped again
(``prune``) so the new image references only what it reads.

The new image's manifest lists the dictionary blobs it uses as its own layers,
so those blobs must be present where the image goes: ``ChunkDict.blob_source``
tells the target where to copy (or cross-mount) them from.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rafs.bootstrap import Bootstrap
from rafs.codec import Dictionary
from rafs.image import open_local_image
from rafs.model import Blob, Chunk, Node
from rafs.oci import ImageRef, parse_image_ref

from .errors import OptionError

if TYPE_CHECKING:
    from rafs.registry import RegistryClient

__all__ = ["ChunkDict", "load_chunk_dict", "prune_unused_blobs"]

log = logging.getLogger(__name__)


@dataclass
class ChunkDict:
    ref: ImageRef
    chunk_size: int
    blobs: list[Blob]
    chunks: list[Chunk]
    dictionaries: dict[int, Dictionary] = dataclasses.field(default_factory=dict)  # by blob


def load_chunk_dict(ref: ImageRef | str,
                    client_for: Callable[[ImageRef], RegistryClient] | None = None) -> ChunkDict:
    """The blobs and chunk table of the RAFS image ``ref`` (bootstrap verified)."""
    ref = parse_image_ref(ref) if isinstance(ref, str) else ref
    if ref.transport == "docker":
        from rafs.registry import RegistryClient, fetch_bootstrap

        client_for = client_for or RegistryClient.for_ref
        with client_for(ref) as client:
            _, raw = fetch_bootstrap(client, ref)
    else:
        raw = open_local_image(str(ref)).bootstrap
    boot = Bootstrap.from_bytes(raw)
    try:
        chunks = list(boot.chunks())
        blobs = list(boot.blobs)
        chunk_size = boot.chunk_size
        dictionaries = {k: d for k in range(len(blobs)) if (d := boot.dictionary(k))}
    finally:
        boot.close()
    log.info("chunk dictionary %s: %d blobs, %d chunks", ref, len(blobs), len(chunks))
    return ChunkDict(ref, chunk_size, blobs, chunks, dictionaries)


def check_chunk_size(d: ChunkDict, chunk_size: int) -> None:
    if d.chunk_size != chunk_size:
        raise OptionError(f"the chunk dictionary {d.ref} uses {d.chunk_size}-byte chunks; "
                          f"convert with --chunk-size {d.chunk_size} to dedup against it")


def _files(root: Node) -> Iterator[Node]:
    stack = [root]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.children is not None:
            stack.extend(node.children.values())
        elif node.chunks:
            yield node


def prune_unused_blobs(root: Node, blobs: list[Blob], chunks: list[Chunk],
                       candidates: int) -> tuple[list[Blob], list[Chunk], list[int]]:
    """Drop the first ``candidates`` blobs (the dictionary's) that no file uses.

    Returns the new blob list, the new chunk table (every blob's chunks still
    contiguous) and the indices (into the old list) of the blobs kept. Node
    chunk indices are rewritten in place.
    """
    used = {chunks[i].blob_index for node in _files(root) for i in node.chunks if i is not None}
    keep = [b for b in range(len(blobs)) if b >= candidates or b in used]
    if len(keep) == len(blobs):
        return blobs, chunks, keep
    new_blob = {old: new for new, old in enumerate(keep)}
    remap: dict[int, int] = {}
    new_chunks: list[Chunk] = []
    new_blobs: list[Blob] = []
    for old in keep:
        b = blobs[old]
        start = len(new_chunks)
        for i in range(b.chunk_start, b.chunk_start + b.chunk_count):
            remap[i] = len(new_chunks)
            new_chunks.append(dataclasses.replace(chunks[i], blob_index=new_blob[old]))
        new_blobs.append(dataclasses.replace(b, chunk_start=start))
    for node in _files(root):
        node.chunks = [None if i is None else remap[i] for i in node.chunks]
    log.info("chunk dictionary: %d of %d blobs used", sum(k < candidates for k in keep),
             candidates)
    return new_blobs, new_chunks, keep
