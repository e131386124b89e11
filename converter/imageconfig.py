"""The config of a converted image: the source config with a RAFS root filesystem.

Everything a runtime uses (``config``, ``os``, ``architecture``, ``created``,
history text, unknown fields) is kept as is. What changes:

- ``rootfs.diff_ids`` lists the RAFS layers: one per data blob (a blob is not
  compressed as far as OCI is concerned, so its diff_id is its digest), then
  the bootstrap (the sha256 of the uncompressed bootstrap).
- Blobs reused from a chunk dictionary come first (``dict_blobs`` of them),
  each with a history entry of its own.
- ``history``: the OCI spec ties each history entry without ``empty_layer`` to
  one layer, in order, and Docker/BuildKit check that the counts agree. When
  the source history is consistent with its layers, a source layer that gave
  no blob (it added no new data) has its entry marked ``empty_layer``, and one
  entry for the bootstrap is appended. When the source history was already
  inconsistent (or has entries we cannot read), every source entry is marked
  empty and one entry per blob plus one for the bootstrap are appended. A
  source without history gets none. Appended entries carry the source's
  ``created`` time, never the conversion time, so output stays reproducible.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

log = logging.getLogger(__name__)

CREATED_BY = "rafs convert"


def rafs_config(
    source: dict[str, Any], layer_has_blob: list[bool], blob_diff_ids: list[str],
    bootstrap_diff_id: str, dict_blobs: int = 0,
) -> dict[str, Any]:
    """The config for the converted image (a new dict; ``source`` is not changed)."""
    out = copy.deepcopy(source)
    rootfs = out.get("rootfs") if isinstance(out.get("rootfs"), dict) else {}
    rootfs = dict(rootfs)
    rootfs["type"] = "layers"
    rootfs["diff_ids"] = [*blob_diff_ids, bootstrap_diff_id]
    out["rootfs"] = rootfs
    history = out.get("history")
    if not isinstance(history, list) or not history:
        return out

    def entry(comment: str) -> dict[str, Any]:
        h: dict[str, Any] = {"created_by": CREATED_BY, "comment": comment}
        if isinstance(source.get("created"), str):
            h["created"] = source["created"]
        return h

    readable = all(isinstance(h, dict) for h in history)
    non_empty = [i for i, h in enumerate(history) if readable and not h.get("empty_layer")]
    if readable and len(non_empty) == len(layer_has_blob):
        for i, has_blob in zip(non_empty, layer_has_blob, strict=True):
            if not has_blob:
                history[i]["empty_layer"] = True
        history[:0] = [entry("rafs chunk dictionary blob") for _ in range(dict_blobs)]
        history.append(entry("rafs bootstrap"))
    else:
        log.warning("source history has %d layer entries for %d layers; marking them all "
                    "empty and adding entries for the RAFS layers",
                    len(non_empty), len(layer_has_blob))
        history[:] = [{**h, "empty_layer": True} if isinstance(h, dict) else h for h in history]
        history.extend(entry("rafs data blob") for _ in blob_diff_ids)
        history.append(entry("rafs bootstrap"))
    return out
