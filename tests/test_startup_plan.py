"""The start-up plan, pure: prefetch lists, trace ranges, chunk ranks, prefetch runs,
link estimates. No I/O, no converter run: each piece is fed what it would get."""

from __future__ import annotations

import json
import random
import stat

import pytest

from converter.startup import RANK_SHIFT, StartupOrder
from fused.fetcher import MIN_PREFETCH_DEPTH, LinkEstimate
from fused.trace import AccessTrace, ChunkTrace, page_runs
from rafs import builder
from rafs.bootstrap import Bootstrap
from rafs.model import Node
from rafs.prefetchlist import Entry, PrefetchListError, format_paths, format_ranges, parse
from tests.helpers.images import ImageParts

CS = 64 << 10


# -- the prefetch list ----------------------------------------------------------------


def test_a_path_list_parses_as_whole_files() -> None:
    text = b"# a comment\n/usr/bin/python3\n\n  /etc/hostname  \n/dir with blanks/x\n"
    assert parse(text) == [Entry(b"/usr/bin/python3"), Entry(b"/etc/hostname"),
                           Entry(b"/dir with blanks/x")]


def test_ranges_and_paths_mix_and_keep_their_order() -> None:
    text = b"0 4096 /usr/lib/libc.so.6\n/etc/passwd\n1048576 8192 /a b/c d\n"
    assert parse(text) == [Entry(b"/usr/lib/libc.so.6", 0, 4096), Entry(b"/etc/passwd"),
                           Entry(b"/a b/c d", 1048576, 8192)]


@pytest.mark.parametrize("line", [b"12 /x", b"1 2", b"1x 2 /p", b"1 -2 /p", b"0 1 rel/p",
                                  b"rel/p", b"/a/../../etc/passwd", b"0 1 /a/.."])
def test_a_bad_line_names_its_line(line: bytes) -> None:
    with pytest.raises(PrefetchListError, match=r"^list\.txt:2: "):
        parse(b"/ok\n" + line + b"\n", "list.txt")


def test_the_json_form_gives_ranges_or_else_paths() -> None:
    doc = {"paths": ["/a", "/b"], "ranges": [{"path": "/a", "offset": 0, "length": 10}],
           "chunk_size": CS, "truncated": False}
    assert parse(json.dumps(doc).encode()) == [Entry(b"/a", 0, 10)]
    del doc["ranges"]
    assert parse(json.dumps(doc).encode()) == [Entry(b"/a"), Entry(b"/b")]
    for bad in (b"{", b'{"ranges": [{"path": "/a", "offset": -1, "length": 1}]}',
                b'{"paths": [1]}', b'{"ranges": 3}', b'{"paths": ["rel"]}',
                b'{"ranges": [{"path": "/../x", "offset": 0, "length": 1}]}'):
        with pytest.raises(PrefetchListError):
            parse(bad)


def test_non_utf8_paths_survive_both_forms() -> None:
    raw = b"/caf\xe9"
    assert parse(format_paths([raw])) == [Entry(raw)]
    assert parse(format_ranges([(raw, 4096, 100)])) == [Entry(raw, 4096, 100)]
    import os
    doc = {"ranges": [{"path": os.fsdecode(raw), "offset": 0, "length": 1}]}
    assert parse(json.dumps(doc).encode()) == [Entry(raw, 0, 1)]


# -- the trace's ranges -----------------------------------------------------------------


def test_page_runs_are_the_runs_of_set_bits() -> None:
    assert list(page_runs(0)) == []
    assert list(page_runs(0b1)) == [(0, 1)]
    assert list(page_runs(0b1110_0110)) == [(1, 2), (5, 3)]
    assert list(page_runs(1 << 200 | 1 << 199)) == [(199, 2)]


def _image(files: dict[bytes, bytes]) -> Bootstrap:
    parts = ImageParts(Node.directory(0o755), chunk_size=CS)
    parts.new_blob()
    assert parts.root.children is not None
    for name, data in files.items():
        parts.root.children[name] = parts.file(data)
    return Bootstrap.from_bytes(parts.finish())


def _nid(boot: Bootstrap, name: bytes) -> int:
    nid = boot.lookup(boot.root, name)
    assert nid is not None
    return nid


def test_fuse_mode_trace_lists_pages_read_by_chunk_in_first_access_order() -> None:
    boot = _image({b"a": bytes(range(256)) * 1024, b"b": b"x" * 10_000})  # a: 4 chunks
    trace = AccessTrace(chunk_size=CS)
    a, b = _nid(boot, b"a"), _nid(boot, b"b")
    trace.touch(b)
    trace.read(a, 2 * CS + 100, 2 * CS + 5000)   # chunk 2, pages 0-1
    trace.read(b, 0, 10_000)                      # b, all of it (3 pages, clamped)
    trace.read(a, 0, 4096)                        # chunk 0, page 0
    trace.read(a, 2 * CS + 8192, 2 * CS + 8193)   # chunk 2 again, page 2: joins its run
    trace.read(a, CS - 1, CS + 1)                 # chunks 0 (last page) and 1 (first)
    out = trace.to_json(boot)
    assert out["paths"] == ["/b"]  # opens only
    assert out["chunk_size"] == CS and out["truncated"] is False
    assert [(r["path"], r["offset"], r["length"]) for r in out["ranges"]] == [
        ("/a", 2 * CS, 3 * 4096),      # chunk 2: pages 0-2
        ("/b", 0, 10_000),
        ("/a", 0, 4096),               # chunk 0: page 0 ...
        ("/a", CS - 4096, 2 * 4096),   # ... its last page, continued by chunk 1's first
    ]


def test_kernel_mode_trace_maps_chunks_back_to_files() -> None:
    boot = _image({b"a": random.Random(1).randbytes(4 * CS), b"b": b"y" * 5000})
    a_chunks = boot.file_chunks(boot.inode(_nid(boot, b"a")))
    b_chunks = boot.file_chunks(boot.inode(_nid(boot, b"b")))
    trace = ChunkTrace()
    trace.read(b_chunks[0], 0, 5000)
    trace.read(a_chunks[3], 0, CS)
    trace.read(a_chunks[1], 4096, 8192)
    out = trace.to_json(boot)
    assert out["paths"] == ["/b", "/a"]
    assert [(r["path"], r["offset"], r["length"]) for r in out["ranges"]] == [
        ("/b", 0, 5000), ("/a", 3 * CS, CS), ("/a", CS + 4096, 4096)]


def test_a_trace_is_capped() -> None:
    trace = ChunkTrace(limit=2)
    for i in range(5):
        trace.read(i, 0, 1)
    assert len(trace) == 2 and trace.truncated


# -- ranks of chunks --------------------------------------------------------------------


def test_ranks_follow_the_first_entry_that_reads_each_chunk() -> None:
    order = StartupOrder([Entry(b"/lib/big", 3 * CS, 10), Entry(b"/etc/a"),
                          Entry(b"/lib/big", 0, CS + 1), Entry(b"/lib/big", 3 * CS + 5, 1)], CS)
    size = 5 * CS
    ranks = order.ranks((b"lib", b"big"), size)
    assert ranks == [2 << RANK_SHIFT | 0, 2 << RANK_SHIFT | 1, None, 0 << RANK_SHIFT | 3, None]
    assert order.ranks((b"etc", b"a"), 10) == [1 << RANK_SHIFT]
    assert order.ranks((b"etc", b"b"), 10) is None
    assert order.paths() == [b"/lib/big", b"/etc/a"]


def test_a_directory_entry_ranks_what_is_below_it_and_ranges_past_the_end_are_cut() -> None:
    order = StartupOrder([b"/usr/lib", Entry(b"/x", 10 * CS, CS)], CS)
    assert order.ranks((b"usr", b"lib", b"deep", b"f"), 2 * CS) == [0, 1]
    assert order.ranks((b"usr", b"libexec"), CS) is None
    assert order.ranks((b"x",), CS) is None or order.ranks((b"x",), CS) == [None]


def _tree(files: dict[bytes, list[int | None]]) -> Node:
    root = Node.directory()
    for path, chunks in files.items():
        node = root
        parts = path.strip(b"/").split(b"/")
        for part in parts[:-1]:
            assert node.children is not None
            node = node.children.setdefault(part, Node.directory())
        assert node.children is not None
        node.children[parts[-1]] = Node(mode=stat.S_IFREG | 0o644, size=len(chunks) * CS,
                                        chunks=chunks)
    return root


def test_the_startup_set_is_the_chunks_read_in_first_access_order() -> None:
    root = _tree({b"/lib/big": [10, 11, 12, 13], b"/etc/a": [20], b"/etc/b": [21, None, 10],
                  b"/usr/x": [30]})
    order = StartupOrder([Entry(b"/lib/big", 2 * CS, 1), Entry(b"/etc"), Entry(b"/gone"),
                          Entry(b"/lib/big", 0, 2 * CS)], CS)
    assert order.chunk_order(root) == [12, 20, 21, 10, 11]


# -- the bootstrap's prefetch runs --------------------------------------------------------


def test_prefetch_runs_keep_access_order_and_merge_neighbours() -> None:
    remap = {old: new for new, old in enumerate([5, 6, 7, 8, 1, 2, 3])}  # sorted position
    runs = builder._prefetch_ranges([5, 6, 7, 1, 2, 8, 6, 3], remap, 7)
    assert runs == [(0, 3), (4, 2), (3, 1), (6, 1)]
    with pytest.raises(ValueError):
        builder._prefetch_ranges([99], remap, 7)


# -- how many prefetch requests in flight ------------------------------------------------


def test_depth_covers_the_bandwidth_delay_product() -> None:
    link = LinkEstimate()
    assert link.depth(4 << 20, cap=7) == MIN_PREFETCH_DEPTH  # not measured yet
    link.response(first_byte=0.020, body_seconds=0.5, received=6_250_000)  # 12.5 MB/s
    link.response(first_byte=0.050, body_seconds=0.1, received=100_000)  # too small for rate
    assert link.rtt == 0.020 and link.rate == pytest.approx(12.5e6)
    assert link.depth(4 << 20, cap=7) == MIN_PREFETCH_DEPTH  # 250 kB in flight: 1 + 1
    fast = LinkEstimate()
    fast.response(first_byte=0.100, body_seconds=0.1, received=12_500_000)  # 125 MB/s, 100 ms
    assert fast.depth(4 << 20, cap=7) == 4  # 12.5 MB / 4 MiB -> 3, plus the one receiving
    assert fast.depth(1 << 20, cap=7) == 7  # capped
    assert fast.depth(1 << 20, cap=1) == 1
