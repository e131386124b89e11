"""`rafs inspect` says what is stored and what dedup saves, in numbers that add up.

One image whose every byte is accounted for: two files with the same contents
(dedup), a hardlink (counted once), a file of zeros (holes), and a file that the
upper layer deletes (stored, but no file of the merged tree uses it).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.mounts import rafs_cmd
from tests.helpers.ocibuild import Entry, build_oci_image, file_entry, whiteout
from tests.helpers.procs import run

MIB = 1 << 20
PATTERN = bytes(range(256)) * 4096  # one MiB: one chunk, however often it repeats


def test_inspect_accounts_for_dedup_holes_and_shadowed_files(tmp_path: Path) -> None:
    build_oci_image(tmp_path / "src", "t", [
        [file_entry("a", PATTERN * 3), file_entry("b", PATTERN * 3),
         Entry("h", "hardlink", linkname="a"), file_entry("zeros", bytes(2 * MIB)),
         file_entry("old", b"o" * MIB + b"tail")],
        [whiteout("old")],
    ])
    ref = f"oci:{tmp_path / 'rafs'}:t"
    res = run(rafs_cmd("convert", f"oci:{tmp_path / 'src'}:t", ref, "--no-progress"),
              timeout=120)
    assert res.returncode == 0, res.stderr
    res = run(rafs_cmd("inspect", "--json", ref), timeout=60)
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert s["files"] == 3 and s["file_bytes"] == 8 * MIB  # a, b, zeros; h is a's inode
    assert s["hole_bytes"] == 2 * MIB
    assert (s["referenced_chunks"], s["referenced_chunk_bytes"]) == (1, MIB)
    assert s["dedup_saved_bytes"] == 5 * MIB
    assert s["file_bytes"] == s["referenced_chunk_bytes"] + s["dedup_saved_bytes"] + \
        s["hole_bytes"]
    assert s["unreferenced_chunk_bytes"] == MIB + 4  # "old": stored in layer 1, deleted in 2
    assert s["stored_chunk_bytes"] == s["referenced_chunk_bytes"] + s["unreferenced_chunk_bytes"]
    assert s["chunks"] == 3 and s["chunk_refs"] == 6
    assert "dedup_ratio" not in s
    text = run(rafs_cmd("inspect", ref), timeout=60).stdout
    assert "8.0 MiB of data in the merged tree" in text
    assert "= 1.0 MiB in 1 chunks + 5.0 MiB (62.5%) saved by dedup + 2.0 MiB of holes" in text
    assert "2.0 MiB in 3 chunks = those 1.0 MiB + 1.0 MiB that no file of the merged tree" \
        in text
    assert "upper layers replace or delete" in text
