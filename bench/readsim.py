"""Replay recorded reads through the read-ahead policy: bytes, requests, fraction read.

A ``Model`` is an image as the fetcher sees it (chunk table, which file holds
which chunk), taken from a bootstrap (``model_from_bootstrap``) or from a
recorded trace file (``bench.readtrace``, ``tests/data/readtrace``). ``replay``
feeds a trace of reads (kernel mode: blob offsets; fuse mode: file offsets)
to a ``fused.readahead.ReadAhead`` the way ``fused.fetcher`` does: per read,
the chunks it covers that are not cached are missing, the policy adds its
extras, and what lies back to back in a blob is one request. Every fetch is
taken to complete before the next read (the trace is serial), so the figures
are what the policy asks for, not what a link would make of it.

``python -m bench.readsim tests/data/readtrace/*.json.gz`` prints, per image
and mode, bytes fetched (compressed), requests, reads that waited, and the
fraction of fetched chunk bytes the workload read, for the policies
``tar`` (blob order, 1 MiB amplification: the fetcher before this policy),
``exact`` (only the chunks read) and ``follow`` (the daemon's default).
``--granularity`` prints instead what fetching exactly the pieces read would
take with fetch units of 4 KiB to 1 MiB (smaller chunks, or frames in a chunk).

**Time** (``simulate``, ``--time``): the same replay on a modelled link
(``Link``: rate, round trip, the daemon's cost per request and the reader's
own compute time spread evenly over its reads), with fetches that run while
the reader computes. The link is one FIFO of bytes as ``bench.linkemu`` makes
it (slots handed out in arrival order): a request leaves after the daemon's
per-request cost, its response starts ``rtt / 2`` later or when the link is
free, each chunk arrives ``rtt / 2`` after its last byte was sent. A read waits
for every chunk it covers (fetched for it, or already in flight). Policy
``speculate`` is ``follow`` plus the background requests of
``fused.readahead.Speculator``, issued as the fetcher issues them: right after
the reader's own requests, at most ``fused.fetcher.SPECULATE_DEPTH`` in
flight. The wall time is the reader's compute plus its waits;
``T_run ~ T_warm + waits`` is what ``rafs bench``'s run phase shows (see the
README's read-ahead section for how close).
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fused.fetcher import SPECULATE_DEPTH
from fused.readahead import FileMap, ReadAhead, ReadAheadConfig, Speculator
from fused.stats import Coverage
from rafs.bootstrap import Bootstrap
from rafs.model import Chunk

POLICIES = ("tar", "exact", "follow", "speculate")
MERGE = 8 << 20  # as fused.fetcher.ONDEMAND_MERGE


def model_from_bootstrap(boot: Bootstrap) -> dict[str, Any]:
    """The JSON form of a model: chunk table in columns, files with their chunks."""
    cols: dict[str, list[int]] = {k: [] for k in ("blob", "coff", "csize", "uoff", "usize")}
    for c in boot.chunks():
        for k, v in zip(cols, (c.blob_index, c.compressed_offset, c.compressed_size,
                               c.uncompressed_offset, c.uncompressed_size), strict=True):
            cols[k].append(v)
    files: list[list[Any]] = []
    dirs: dict[bytes, int] = {}
    seen: set[int] = set()
    for path, node in boot.walk():
        if node.is_dir:
            dirs[path] = node.nid
        elif stat.S_ISREG(node.mode) and node.size and node.nid not in seen:
            seen.add(node.nid)
            parent = path.rpartition(b"/")[0] or b"/"
            files.append([node.nid, dirs.get(parent, -1), boot.file_chunks(node)])
    return {"chunk_size": boot.chunk_size, "blobs": len(boot.blobs), "chunks": cols,
            "files": files, "prefetch": bool(boot.prefetch)}


@dataclass
class Model:
    chunk_size: int
    chunks: list[Chunk]
    files: FileMap
    file_chunks: dict[int, list[int | None]]
    blob_offsets: list[list[int]]  # per blob: uncompressed offsets of its chunks, ascending
    blob_indices: list[list[int]]  # per blob: the chunk indices in that order
    _next: dict[int, int] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        cols = data["chunks"]
        chunks = [Chunk(b, co, cs, uo, us, b"", 0) for b, co, cs, uo, us in
                  zip(cols["blob"], cols["coff"], cols["csize"], cols["uoff"], cols["usize"],
                      strict=True)]
        offsets: list[list[int]] = [[] for _ in range(data["blobs"])]
        indices: list[list[int]] = [[] for _ in range(data["blobs"])]
        for i, c in sorted(enumerate(chunks), key=lambda ic: (ic[1].blob_index,
                                                               ic[1].uncompressed_offset)):
            offsets[c.blob_index].append(c.uncompressed_offset)
            indices[c.blob_index].append(i)
        files = {f[0]: f[2] for f in data["files"]}
        model = cls(data["chunk_size"], chunks, FileMap((f[0], f[1], f[2]) for f in data["files"]),
                    files, offsets, indices)
        for order in indices:
            by_coff = sorted(order, key=lambda i: chunks[i].compressed_offset)
            for a, b in itertools.pairwise(by_coff):
                ca, cb = chunks[a], chunks[b]
                if cb.compressed_offset == ca.compressed_offset + ca.compressed_size:
                    model._next[a] = b
        return model

    def chunk(self, index: int) -> Chunk:
        return self.chunks[index]

    def successor(self, index: int) -> int | None:
        return self._next.get(index)

    def blob_pieces(self, blob: int, offset: int, size: int) -> list[tuple[int, int, int]]:
        """(chunk, offset in chunk, length) of the chunks a blob read covers."""
        offs, idx = self.blob_offsets[blob], self.blob_indices[blob]
        end = offset + size
        k = max(0, bisect.bisect_right(offs, offset) - 1)
        out = []
        while k < len(offs) and offs[k] < end:
            c = self.chunks[idx[k]]
            a, b = max(offset, offs[k]), min(end, offs[k] + c.uncompressed_size)
            if a < b:
                out.append((idx[k], a - offs[k], b - a))
            k += 1
        return out

    def file_pieces(self, nid: int, offset: int, size: int) -> list[tuple[int, int, int]]:
        table = self.file_chunks.get(nid)
        if not table:
            return []
        cs = self.chunk_size
        out = []
        pos, end = offset, offset + size
        while pos < end and pos // cs < len(table):
            k = pos // cs
            stop = min((k + 1) * cs, end)
            index = table[k]
            if index is not None:
                usize = self.chunks[index].uncompressed_size
                if pos - k * cs < usize:
                    out.append((index, pos - k * cs, min(stop - pos, usize - (pos - k * cs))))
            pos = stop
        return out


class TraceError(Exception):
    """A trace file that cannot be read; the message says which and why."""


def load(path: Path) -> dict[str, Any]:
    try:
        with gzip.open(path, "rt") as f:
            data = json.load(f)
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
        raise TraceError(f"{path}: not a readable trace ({e})") from None
    if not isinstance(data, dict) or not {"model", "traces"} <= data.keys():
        raise TraceError(f"{path}: not a trace of bench.readtrace (no model and traces)")
    return data


def policy(model: Model, name: str) -> ReadAhead:
    if name == "tar":
        return ReadAhead(model.chunk, model.successor,
                         ReadAheadConfig(placed_by_access=True), model.files)
    if name == "exact":
        return ReadAhead(model.chunk, model.successor, ReadAheadConfig(), None)
    if name in ("follow", "speculate"):
        return ReadAhead(model.chunk, model.successor, ReadAheadConfig(), model.files)
    raise ValueError(f"no policy {name!r}")


def plan(model: Model, indices: list[int]) -> list[list[int]]:
    """Back-to-back runs in blob order, at most MERGE bytes each (as Fetcher._plan)."""
    chunks = sorted(indices, key=lambda i: (model.chunks[i].blob_index,
                                            model.chunks[i].compressed_offset))
    runs: list[list[int]] = []
    for i in chunks:
        c = model.chunks[i]
        if runs:
            last, first = model.chunks[runs[-1][-1]], model.chunks[runs[-1][0]]
            if (c.blob_index == last.blob_index
                    and c.compressed_offset == last.compressed_offset + last.compressed_size
                    and c.compressed_offset + c.compressed_size - first.compressed_offset
                    <= MERGE):
                runs[-1].append(i)
                continue
        runs.append([i])
    return runs


def replay(model: Model, trace: list[list[int]], mode: str, ra: ReadAhead) -> dict[str, Any]:
    cached: set[int] = set()
    coverage = Coverage()
    fetched_bytes = requests = waits = 0
    pieces_of = model.blob_pieces if mode == "kernel" else model.file_pieces
    for key, offset, size in trace:
        pieces = pieces_of(key, offset, size)
        missing = list(dict.fromkeys(i for i, _, _ in pieces if i not in cached))
        if missing:
            waits += 1
            extra = ra.extra(missing, lambda i: i not in cached)
            todo = missing + extra
            for run in plan(model, todo):
                requests += 1
                for i in run:
                    fetched_bytes += model.chunks[i].compressed_size
                    coverage.fetched(i, model.chunks[i].uncompressed_size)
            cached.update(todo)
        for i, off, n in pieces:
            coverage.read(i, off, n)
    cov = coverage.snapshot()
    return {"fetched_bytes": fetched_bytes, "requests": requests, "waits": waits,
            "fraction_read": cov["fraction_read"], "coverage": cov, "fetched": sorted(cached)}


@dataclass(frozen=True)
class Link:
    """The modelled link and daemon: bytes per second, round trip, the daemon's cost
    per backend request (seconds), the reader's compute time in all (seconds)."""

    rate: float = 100e6 / 8
    rtt: float = 0.020
    request_cost: float = 0.008
    compute: float = 0.31


def speculator(model: Model, config: ReadAheadConfig) -> Speculator:
    return Speculator(model.chunk, model.successor, config.speculate_budget,
                      config.speculate_request)


class _LinkSim:
    """The state of one ``simulate`` run: the link's FIFO, chunk arrivals, counters."""

    def __init__(self, model: Model, link: Link, spec: Speculator | None, depth: int) -> None:
        self.model, self.link, self.spec = model, link, spec
        self.arrival: dict[int, float] = {}  # chunk -> when it is cached (fetched or in flight)
        self.link_free = 0.0
        self.slots = [0.0] * depth  # when each speculative request slot is free
        self.last_change = 0.0  # the reader last changed what speculation may do
        self.bytes = self.spec_bytes = self.requests = self.spec_requests = 0

    def available(self, index: int) -> bool:
        return index not in self.arrival

    def issue(self, run: list[int], at: float, speculative: bool = False) -> float:
        """One request for ``run`` at ``at``; when its last chunk has arrived."""
        link, chunks = self.link, self.model.chunks
        sent = max(at + link.request_cost + link.rtt / 2, self.link_free)
        for i in run:
            sent += chunks[i].compressed_size / link.rate
            self.arrival[i] = sent + link.rtt / 2
        self.link_free = sent
        size = sum(chunks[i].compressed_size for i in run)
        self.bytes += size
        self.requests += 1
        if speculative:
            self.spec_bytes += size
            self.spec_requests += 1
        return sent + link.rtt / 2

    def speculate(self, until: float) -> None:
        """Issue the speculative requests a free slot would have sent by ``until``."""
        if self.spec is None:
            return
        slots = self.slots
        while True:
            slot = min(range(len(slots)), key=slots.__getitem__)
            at = max(slots[slot], self.last_change)
            if at > until:
                return
            run = self.spec.next_request(self.available)
            if not run:
                return
            slots[slot] = self.issue(run, at, speculative=True)


def simulate(model: Model, trace: list[list[int]], mode: str, ra: ReadAhead, link: Link,
             spec: Speculator | None = None, depth: int = 1) -> dict[str, Any]:
    """Replay ``trace`` on ``link``: bytes, requests, waits and wall time (module doc)."""
    sim = _LinkSim(model, link, spec, depth)
    pieces_of = model.blob_pieces if mode == "kernel" else model.file_pieces
    think = link.compute / max(1, len(trace))
    t = waited = 0.0
    waits = 0
    for key, offset, size in trace:
        t += think
        sim.speculate(t)
        wanted = list(dict.fromkeys(i for i, _, _ in pieces_of(key, offset, size)))
        for i in wanted if spec is not None else ():
            spec.read(i)
        missing = [i for i in wanted if sim.available(i)]
        if missing:
            extra = ra.extra(missing, sim.available)
            for run in plan(model, missing + extra):
                sim.issue(run, t)
            if spec is not None:
                spec.offer(ra.speculate(missing + extra, sim.available))
                sim.last_change = t
                sim.speculate(t)
        ready = max((sim.arrival[i] for i in wanted), default=t)
        if ready > t:
            waits += 1
            waited += ready - t
            t = ready
        sim.last_change = t
    return {"fetched_bytes": sim.bytes, "requests": sim.requests,
            "speculative_bytes": sim.spec_bytes, "speculative_requests": sim.spec_requests,
            "waits": waits, "waited": waited, "wall": t}


GRAINS = (4 << 10, 64 << 10, 256 << 10, 1 << 20)


def granularity(model: Model, trace: list[list[int]], mode: str, grain: int) -> dict[str, int]:
    """Bytes a fetch of exactly the ``grain``-sized pieces of chunks that were read would
    take (each piece's share of its chunk's compressed size: an estimate for chunks
    smaller than the image's, or frames inside them), and how many pieces that is."""
    pieces_of = model.blob_pieces if mode == "kernel" else model.file_pieces
    touched: set[tuple[int, int]] = set()
    for key, offset, size in trace:
        for index, off, n in pieces_of(key, offset, size):
            touched.update((index, k) for k in range(off // grain, (off + n - 1) // grain + 1))
    total = 0.0
    for index, k in touched:
        c = model.chunks[index]
        part = min(grain, c.uncompressed_size - k * grain)
        total += c.compressed_size * part / c.uncompressed_size
    return {"bytes": round(total), "pieces": len(touched)}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except TraceError as e:
        print(f"readsim: error: {e}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.readsim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--time", action="store_true",
                   help="instead: the replay's wall time on a modelled link (Link)")
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--request-ms", type=float, default=Link.request_cost * 1e3,
                   help="the daemon's cost per backend request")
    p.add_argument("--compute", type=float, default=Link.compute,
                   help="the reader's own time in all, seconds (a warm start)")
    p.add_argument("--granularity", action="store_true",
                   help="instead: bytes and pieces of exactly what was read, per fetch unit")
    args = p.parse_args(argv)
    traces = [load(path) for path in args.traces]
    if args.granularity:
        print("| Image | Mode | Read-ahead KiB | " + " | ".join(
            f"{g >> 10} KiB units: MB (pieces)" for g in GRAINS) + " |")
        print("|---|---|---:|" + "---:|" * len(GRAINS))
        for data in traces:
            model = Model.from_json(data["model"])
            for mode, trace in data["traces"].items():
                cells = [granularity(model, trace, mode, g) for g in GRAINS]
                print(f"| {data['image']} | {mode} | {data.get('readahead_kb') or 'default'} | "
                      + " | ".join(f"{c['bytes'] / 1e6:.1f} ({c['pieces']})" for c in cells)
                      + " |")
        return 0
    if args.time:
        link = Link(args.rate_mbit * 1e6 / 8, args.rtt_ms / 1e3, args.request_ms / 1e3,
                    args.compute)
        print(f"Link: {args.rate_mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT, "
              f"{args.request_ms:g} ms per request, {args.compute:g} s compute")
        print("| Image | Mode | Policy | Fetched MB (speculative) | Requests (speculative) "
              "| Reads that waited | Waited s | Wall s |")
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for data in traces:
            model = Model.from_json(data["model"])
            for mode, trace in data["traces"].items():
                for name in args.policies:
                    ra = policy(model, name)
                    spec = speculator(model, ra.config) if name == "speculate" else None
                    r = simulate(model, trace, mode, ra, link, spec, SPECULATE_DEPTH)
                    print(f"| {data['image']} | {mode} | {name} | {r['fetched_bytes'] / 1e6:.1f}"
                          f" ({r['speculative_bytes'] / 1e6:.1f}) | {r['requests']} "
                          f"({r['speculative_requests']}) | {r['waits']} | {r['waited']:.2f} "
                          f"| {r['wall']:.2f} |")
        return 0
    print("| Image | Mode | Policy | Fetched MB | Requests | Reads that waited "
          "| Fraction of fetched bytes read |")
    print("|---|---|---|---:|---:|---:|---:|")
    for data in traces:
        model = Model.from_json(data["model"])
        for mode, trace in data["traces"].items():
            for name in args.policies:
                r = replay(model, trace, mode, policy(model, name))
                print(f"| {data['image']} | {mode} | {name} | {r['fetched_bytes'] / 1e6:.1f} "
                      f"| {r['requests']} | {r['waits']} | {r['fraction_read']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
