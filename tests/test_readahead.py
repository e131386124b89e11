"""The read-ahead policy (fused.readahead): windows within a file, directory batches,
no amplification across files unless the blob was laid out by access; unit tests on
small layouts, a property test on random ones, and the recorded workloads of
tests/data/readtrace (numpy, gcc, postgres; ``bench.readtrace``) replayed through it."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.readsim import Link, Model, load, policy, replay, simulate, speculator
from fused.readahead import FileMap, ReadAhead, ReadAheadConfig, Speculator
from fused.stats import COVERAGE_BUCKETS, Coverage
from rafs.model import Chunk

CS = 1 << 20
TRACES = sorted((Path(__file__).parent / "data" / "readtrace").glob("*.json.gz"))


class Layout:
    """Files laid out back to back in one blob, in the order given.

    ``files``: (file id, directory id, chunk count, compressed size per chunk).
    """

    def __init__(self, files: list[tuple[int, int, int, int]]) -> None:
        self.chunks: list[Chunk] = []
        self.file_chunks: dict[int, list[int | None]] = {}
        entries = []
        off = 0
        for file, directory, count, csize in files:
            indices: list[int | None] = []
            for _ in range(count):
                indices.append(len(self.chunks))
                self.chunks.append(Chunk(0, off, csize, len(self.chunks) * CS, CS, b"", 0))
                off += csize
            self.file_chunks[file] = indices
            entries.append((file, directory, indices))
        self.map = FileMap(entries)
        self.cached: set[int] = set()

    def successor(self, index: int) -> int | None:
        return index + 1 if index + 1 < len(self.chunks) else None

    def policy(self, with_map: bool = True, **config: object) -> ReadAhead:
        return ReadAhead(self.chunks.__getitem__, self.successor,
                         ReadAheadConfig(**config),  # type: ignore[arg-type]
                         self.map if with_map else None)

    def miss(self, ra: ReadAhead, *indices: int) -> list[int]:
        """What a read of ``indices`` fetches along with them; all of it is then cached."""
        missing = [i for i in indices if i not in self.cached]
        extra = ra.extra(missing, lambda i: i not in self.cached)
        self.cached.update(missing, extra)
        return extra

    def of(self, file: int, *positions: int) -> list[int]:
        chunks = self.file_chunks[file]
        return [chunks[p] for p in positions]  # type: ignore[misc]


def test_a_first_read_and_a_random_read_fetch_only_themselves():
    lay = Layout([(1, 10, 8, 400_000), (2, 10, 3, 400_000)])
    ra = lay.policy(first_batch_bytes=0)
    assert lay.miss(ra, *lay.of(1, 0)) == []
    assert lay.miss(ra, *lay.of(1, 5)) == []  # random: 4 was never read
    assert lay.miss(ra, *lay.of(2, 2)) == []


def test_sequential_reads_grow_a_window_within_the_file_and_never_past_it():
    lay = Layout([(1, 10, 12, 300_000), (2, 10, 4, 300_000)])
    ra = lay.policy(amplify_bytes=8 * CS)
    assert lay.miss(ra, *lay.of(1, 0)) == []
    assert lay.miss(ra, *lay.of(1, 1)) == lay.of(1, 2)  # window 1
    assert lay.miss(ra, *lay.of(1, 3)) == lay.of(1, 4, 5)  # 2
    assert lay.miss(ra, *lay.of(1, 6)) == lay.of(1, 7, 8, 9, 10)  # 4 (= 4 MiB cap)
    assert lay.miss(ra, *lay.of(1, 11)) == []  # the file ends: nothing of file 2
    assert lay.miss(ra, *lay.of(2, 0)) == []


def test_the_window_is_capped_by_window_bytes_and_reset_by_a_random_read():
    lay = Layout([(1, 10, 40, 300_000)])
    ra = lay.policy(window_bytes=2 * CS, amplify_bytes=8 * CS)
    lay.miss(ra, *lay.of(1, 0))
    assert lay.miss(ra, *lay.of(1, 1)) == lay.of(1, 2)
    assert lay.miss(ra, *lay.of(1, 3)) == lay.of(1, 4, 5)
    assert lay.miss(ra, *lay.of(1, 6)) == lay.of(1, 7, 8)  # capped at 2
    assert lay.miss(ra, *lay.of(1, 20)) == []  # random: the window starts again
    assert lay.miss(ra, *lay.of(1, 21)) == lay.of(1, 22)


def test_no_fetch_grows_past_amplify_bytes_whatever_the_rule():
    lay = Layout([(1, 10, 12, 300_000)] + [(n, 11, 1, 100_000) for n in range(2, 12)])
    ra = lay.policy(amplify_bytes=1_000_000, dir_batch_bytes=10**9, first_batch_bytes=10**9)
    lay.miss(ra, *lay.of(1, 0))
    assert lay.miss(ra, *lay.of(1, 1)) == lay.of(1, 2)
    assert lay.miss(ra, *lay.of(1, 3)) == lay.of(1, 4, 5)  # 900 kB with the missing one
    assert lay.miss(ra, *lay.of(1, 6)) == lay.of(1, 7, 8)  # window 4, budget 3
    assert lay.miss(ra, *lay.of(2, 0)) == [lay.of(n, 0)[0] for n in range(3, 12)]  # 1 MB


def test_first_reads_of_small_files_of_one_directory_batch_their_neighbours():
    files = [(n, 10, 1, 20_000) for n in range(1, 21)] + [(99, 11, 1, 20_000)]
    lay = Layout(files)
    ra = lay.policy(dir_batch_bytes=100_000, first_batch_bytes=0)
    assert lay.miss(ra, *lay.of(3, 0)) == []  # one file of the directory: no batch yet
    # the second small file of the directory: its next neighbours, within 100 kB
    assert lay.miss(ra, *lay.of(7, 0)) == [lay.of(n, 0)[0] for n in range(8, 13)]
    # the batch stops at the last file of the directory
    assert lay.miss(ra, *lay.of(18, 0)) == [lay.of(n, 0)[0] for n in (19, 20)]


def test_a_first_read_in_a_directory_takes_a_smaller_batch():
    lay = Layout([(n, 10, 1, 20_000) for n in range(1, 21)])
    ra = lay.policy(dir_batch_bytes=100_000, first_batch_bytes=45_000)
    assert lay.miss(ra, *lay.of(3, 0)) == lay.of(4, 0) + lay.of(5, 0)  # 40 kB of 45
    assert lay.miss(ra, *lay.of(9, 0)) == [lay.of(n, 0)[0] for n in range(10, 15)]


def test_a_directory_batch_stops_at_a_big_file_and_at_a_cached_chunk():
    lay = Layout([(1, 10, 1, 10_000), (2, 10, 1, 10_000), (3, 10, 1, 10_000),
                  (4, 10, 3, 10_000), (5, 10, 1, 10_000), (6, 10, 1, 10_000),
                  (7, 10, 1, 10_000)])
    ra = lay.policy(first_batch_bytes=0)
    lay.miss(ra, *lay.of(1, 0))
    assert lay.miss(ra, *lay.of(2, 0)) == lay.of(3, 0)  # file 4 has three chunks
    lay.cached.update(lay.of(7, 0))
    assert lay.miss(ra, *lay.of(5, 0)) == lay.of(6, 0)  # 7 is cached already


def test_directories_are_forgotten_after_dir_memory_others():
    files = [(d * 100 + n, d, 1, 10_000) for d in range(1, 5) for n in range(5)]
    lay = Layout(files)
    ra = lay.policy(dir_memory=2, first_batch_bytes=0)
    lay.miss(ra, *lay.of(100, 0))  # directory 1
    lay.miss(ra, *lay.of(200, 0))  # 2
    lay.miss(ra, *lay.of(300, 0))  # 3: directory 1 is forgotten
    assert lay.miss(ra, *lay.of(102, 0)) == []
    assert lay.miss(ra, *lay.of(302, 0)) == lay.of(303, 0) + lay.of(304, 0)


def test_no_file_map_no_extra_chunks():
    lay = Layout([(1, 10, 8, 100_000), (2, 10, 1, 100), (3, 10, 1, 100)])
    ra = lay.policy(with_map=False)
    for pos in range(8):
        assert lay.miss(ra, *lay.of(1, pos)) == []
    assert lay.miss(ra, *lay.of(2, 0)) == []
    assert lay.miss(ra, *lay.of(3, 0)) == []


def test_an_image_laid_out_by_access_is_amplified_across_files_in_blob_order():
    lay = Layout([(1, 10, 1, 300_000), (2, 11, 2, 300_000), (3, 12, 4, 300_000)])
    ra = lay.policy(placed_by_access=True, amplify_bytes=1_000_000)
    # 300 kB asked for, then the chunks that follow while the run is ≤ 1 MB
    assert lay.miss(ra, *lay.of(1, 0)) == lay.of(2, 0, 1)
    assert lay.miss(ra, *lay.of(3, 0)) == lay.of(3, 1, 2)


layouts = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 200_000)),
                   min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(layouts, st.lists(st.integers(0, 10_000), max_size=60), st.data())
def test_extras_stay_in_the_files_and_directories_being_read(spec, reads, data):
    files = [(n, d, count, csize) for n, (d, count, csize) in enumerate(spec)]
    lay = Layout(files)
    limit = data.draw(st.integers(0, 4_000_000))
    ra = lay.policy(dir_batch_bytes=data.draw(st.integers(0, 1_000_000)),
                    first_batch_bytes=data.draw(st.integers(0, 100_000)),
                    window_bytes=data.draw(st.integers(0, 8 * CS)), amplify_bytes=limit)
    total = len(lay.chunks)
    for r in reads:
        index = r % total
        missing = [] if index in lay.cached else [index]
        before = set(lay.cached)
        extra = lay.miss(ra, *missing)
        assert len(extra) == len(set(extra)), "a chunk planned twice"
        assert not set(extra) & before, "a cached chunk planned"
        assert index not in extra
        if extra:
            fetch = [*missing, *extra]
            assert sum(lay.chunks[i].compressed_size for i in fetch) <= limit
        for e in extra:
            file, pos = lay.map.owner(e)  # type: ignore[misc]
            if missing:
                own, own_pos = lay.map.owner(index)  # type: ignore[misc]
                same_file = file == own and pos > own_pos
                small_sibling = (pos == 0 and len(lay.file_chunks[file]) == 1
                                 and len(lay.file_chunks[own]) == 1
                                 and lay.map.directory(file) == lay.map.directory(own))
                assert same_file or small_sibling, (e, index)


def test_coverage_counts_pages_read_of_fetched_chunks_only():
    cov = Coverage()
    cov.fetched(1, CS)
    cov.fetched(2, 10_000)
    cov.read(1, 0, 1)  # one page
    cov.read(1, 4095, 2)  # pages 0 and 1
    cov.read(3, 0, CS)  # not fetched here: not followed
    cov.read(2, 0, 10_000)  # all of it (3 pages, clamped to its size)
    snap = cov.snapshot()
    assert snap["chunks"] == 2 and snap["fetched_bytes"] == CS + 10_000
    assert snap["read_bytes"] == 2 * 4096 + 10_000
    counts = dict(zip(COVERAGE_BUCKETS, snap["counts"], strict=True))  # type: ignore[arg-type]
    assert counts[0.1] == 1 and counts[1.0] == 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, CS - 1), st.integers(1, CS)), max_size=30))
def test_coverage_read_bytes_are_the_union_of_the_pages_read(reads):
    cov = Coverage()
    cov.fetched(0, CS)
    pages: set[int] = set()
    for off, n in reads:
        n = min(n, CS - off)
        cov.read(0, off, n)
        pages.update(range(off // 4096, (off + n - 1) // 4096 + 1))
    assert cov.snapshot()["read_bytes"] == len(pages) * 4096


# -- recorded workloads --------------------------------------------------------------


def test_the_recorded_traces_are_there():
    assert {p.name for p in TRACES} >= {"numpy.json.gz", "gcc.json.gz", "postgres.json.gz"}


@pytest.fixture(scope="module", params=[p.name for p in TRACES])
def recorded(request: pytest.FixtureRequest) -> tuple[str, Model, dict[str, list[list[int]]]]:
    data = load(Path(__file__).parent / "data" / "readtrace" / request.param)
    return data["image"], Model.from_json(data["model"]), data["traces"]


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
def test_on_recorded_workloads_following_the_reader_fetches_less_than_tar_order(
        recorded, mode):
    _image, model, traces = recorded
    trace = traces[mode]
    tar = replay(model, trace, mode, policy(model, "tar"))
    exact = replay(model, trace, mode, policy(model, "exact"))
    follow = replay(model, trace, mode, policy(model, "follow"))
    assert exact["fetched_bytes"] <= follow["fetched_bytes"] < tar["fetched_bytes"]
    # fewer requests than fetching each chunk read on its own
    assert follow["requests"] < exact["requests"]
    assert follow["fraction_read"] > tar["fraction_read"]


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
def test_on_recorded_workloads_every_chunk_fetched_unread_is_a_window_or_a_sibling(
        recorded, mode):
    """A chunk fetched but never read belongs to a file that was read (the window) or is
    a small file in the directory of a small file that was read (a directory batch)."""
    _image, model, traces = recorded
    trace = traces[mode]
    result = replay(model, trace, mode, policy(model, "follow"))
    read_chunks: set[int] = set()
    pieces = model.blob_pieces if mode == "kernel" else model.file_pieces
    for key, off, n in trace:
        read_chunks.update(i for i, _, _ in pieces(key, off, n))
    files_read = {model.files.owner(i)[0] for i in read_chunks if model.files.owner(i)}
    small_dirs = {model.files.directory(f) for f in files_read
                  if len(model.files.chunks(f)) == 1}
    fetched = set(result["fetched"])
    for index in fetched - read_chunks:
        owner = model.files.owner(index)
        assert owner is not None
        file, _pos = owner
        assert file in files_read or (len(model.files.chunks(file)) == 1
                                      and model.files.directory(file) in small_dirs), index


def test_recorded_kernel_reads_stay_within_one_file_each(recorded):
    """The kernel's EROFS mount asks the blob files for one file's blocks at a time
    (blob files are direct_io: no readahead across files below the policy)."""
    _image, model, traces = recorded
    for blob, off, n in traces["kernel"]:
        owners = {model.files.owner(i)[0] for i, _, _ in model.blob_pieces(blob, off, n)
                  if model.files.owner(i) is not None}
        assert len(owners) <= 1, (blob, off, n, owners)


# -- speculation (Speculator) and the time model (bench.readsim.simulate) ------------


def speculator_of(lay: Layout, budget: int, request: int) -> Speculator:
    return Speculator(lay.chunks.__getitem__, lay.successor, budget, request)


def test_speculation_offers_the_rest_of_the_file_and_directory_after_the_fetch():
    lay = Layout([(1, 10, 4, 100_000), (2, 10, 1, 100_000), (3, 11, 3, 100_000)])
    ra = lay.policy(speculate_span=450_000)
    lay.miss(ra, *lay.of(1, 0))
    offered = ra.speculate(lay.of(1, 0), lambda i: i not in lay.cached)
    assert offered == lay.of(1, 1, 2, 3) + lay.of(2, 0)  # tar order, up to the span
    # the rest of the file and of its directory only, not what the tar held next
    wide = lay.policy(speculate_span=10 << 20)
    assert wide.speculate(lay.of(1, 0), lambda i: i not in lay.cached) == offered
    assert wide.speculate(lay.of(3, 1), lambda i: True) == lay.of(3, 2)
    assert ra.speculate([], lambda i: True) == []
    # laid out by access: the fetch is amplified in blob order already, no speculation
    assert lay.policy(placed_by_access=True).speculate(lay.of(3, 0), lambda i: True) == []
    assert lay.policy(speculate_budget=0).speculate(lay.of(3, 0), lambda i: True) == []


def test_speculation_stops_at_its_budget_and_a_read_gives_bytes_back():
    lay = Layout([(1, 10, 10, 100_000)])
    spec = speculator_of(lay, budget=350_000, request=200_000)
    spec.offer(lay.of(1, *range(1, 10)))
    available = lambda i: i not in lay.cached  # noqa: E731
    first = spec.next_request(available)
    assert first == lay.of(1, 1, 2)  # back to back, at most `request` bytes
    lay.cached.update(first)
    second = spec.next_request(available)
    assert second == lay.of(1, 3)  # the budget: 350 000 unread bytes at most
    lay.cached.update(second)
    assert spec.next_request(available) == []
    assert spec.unread_bytes == 300_000
    assert spec.read(lay.of(1, 2)[0]) and not spec.read(lay.of(1, 2)[0])
    assert spec.next_request(available) == lay.of(1, 4)
    spec.failed(lay.of(1, 4)[0])  # not fetched: not counted, budget back
    assert spec.unread_bytes == 200_000 and spec.fetched_bytes == 300_000


def test_newer_offers_go_first_and_unavailable_chunks_are_skipped():
    lay = Layout([(1, 10, 6, 100_000)])
    spec = speculator_of(lay, budget=10 << 20, request=1 << 20)
    spec.offer(lay.of(1, 1, 2))
    spec.offer(lay.of(1, 4, 5))
    lay.cached.add(lay.of(1, 4)[0])
    assert spec.next_request(lambda i: i not in lay.cached) == lay.of(1, 5)
    assert spec.next_request(lambda i: i not in lay.cached) == lay.of(1, 1, 2)
    assert spec.idle


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 39), min_size=1, max_size=60), st.integers(1, 8))
def test_unread_speculative_bytes_never_exceed_the_budget(reads, budget_chunks):
    """Whatever the reads, speculative chunks not yet read stay within the budget, and
    the extras a reader waits for are the same with speculation as without."""
    lay = Layout([(f, f // 4, 4, 50_000) for f in range(10)])
    budget = budget_chunks * 50_000
    ra, plain = lay.policy(speculate_budget=budget), lay.policy(speculate_budget=0)
    plain_cached: set[int] = set()
    spec = speculator_of(lay, budget, 120_000)
    for index in reads:
        spec.read(index)
        missing = [index] if index not in lay.cached else []
        if missing:
            extra = ra.extra(missing, lambda i: i not in lay.cached)
            lay.cached.update(missing, extra)
            spec.offer(ra.speculate(missing + extra, lambda i: i not in lay.cached))
        if index not in plain_cached:
            plain_extra = plain.extra([index], lambda i: i not in plain_cached)
            plain_cached.update([index], plain_extra)
        while run := spec.next_request(lambda i: i not in lay.cached):
            assert len(run) <= 3
            lay.cached.update(run)
        assert spec.unread_bytes <= budget
        assert spec.fetched_bytes - spec.read_bytes <= budget


@pytest.mark.parametrize("mode", ["kernel", "fuse"])
def test_on_recorded_workloads_speculation_costs_at_most_its_budget_in_bytes(recorded, mode):
    _image, model, traces = recorded
    trace = traces[mode]
    link = Link()
    follow = simulate(model, trace, mode, policy(model, "follow"), link)
    ra = policy(model, "speculate")
    spec = speculator(model, ra.config)
    specd = simulate(model, trace, mode, ra, link, spec, depth=2)
    assert specd["speculative_requests"] > 0
    assert spec.fetched_bytes - spec.read_bytes <= ra.config.speculate_budget
    assert specd["fetched_bytes"] <= follow["fetched_bytes"] + ra.config.speculate_budget
    # no read waits for more than what it reads: the waits are at most follow's
    assert specd["waits"] <= follow["waits"]


def test_the_time_model_charges_a_round_trip_per_serial_miss():
    """One file read chunk by chunk with no read-ahead: each miss is one request and
    waits a round trip, the request cost and its bytes; compute is spread over reads."""
    lay = Layout([(1, 10, 3, 125_000)])
    model = Model(CS, lay.chunks, lay.map, lay.file_chunks,
                  [[c.uncompressed_offset for c in lay.chunks]], [[0, 1, 2]])
    link = Link(rate=1e6, rtt=0.02, request_cost=0.005, compute=0.3)
    trace = [[0, k * CS, 4096] for k in range(3)]
    r = simulate(model, trace, "kernel", lay.policy(with_map=False), link)
    assert r["requests"] == r["waits"] == 3
    assert r["wall"] == pytest.approx(0.3 + 3 * (0.02 + 0.005 + 0.125))
