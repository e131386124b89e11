"""On-demand read-ahead: which chunks to fetch along with the ones a reader is missing.

A pure policy (no I/O, no trio): the fetcher feeds it every set of missing
chunks a read needs and gets back the extra chunks to fetch in the same go;
it then merges what lies back to back in a blob into Range requests.

Images converted without a recorded workload keep their files in tar order,
so a chunk's neighbours in the blob are whatever the tar held next: fetching
them costs bytes a start-up rarely reads. The policy follows the reader instead:

- **within a file**: a miss on chunk ``p`` of a file whose chunk ``p - 1`` was
  read before is a sequential read; each such miss doubles the file's window
  (1, 2, 4, ... chunks, at most ``window_bytes``) and the next chunks of the
  file up to the window come along. A miss elsewhere in a file (a random read,
  a page fault in a mapped library) resets the window and fetches only itself.
- **small files of one directory**: the first read of a small file (one chunk)
  takes along the small files of its directory stored right after it in the
  blob, up to ``first_batch_bytes`` of compressed data, or up to
  ``dir_batch_bytes`` where another small file of the directory was first
  read shortly before (the last ``dir_memory`` directories read): an
  interpreter importing a package reads many of them.
- **at most** ``amplify_bytes`` of compressed data per fetch, the missing
  chunks included (``--amplify-bytes``), whatever the rule.
- **other files**: never, unless the image was laid out by observed access
  (``placed_by_access``: the converter wrote a prefetch list, so the blob is in
  the recorded order); then the old rule holds, the chunks that follow in the
  blob come along up to ``amplify_bytes``.

Which file a chunk belongs to comes from ``FileMap`` (chunk-table index ->
file, position, directory), built from the bootstrap once, off the read path
(``FileMap.from_bootstrap``); until it is there the policy fetches only what is
missing. Fuse and kernel mode both speak chunk-table indices to the fetcher,
so the map serves both: in kernel mode the daemon sees only blob offsets and
this is how they are tied back to files.

**Speculation** (``Speculator``): what the reader may read next but did not ask
for goes in separate background requests the reader never waits for. After
each fetch for a reader, ``ReadAhead.speculate`` offers the chunks stored after
each of its back-to-back runs in the blob as long as they belong to the run's
file or its directory (tar order: the rest of the file, the directory's other
files), up to ``speculate_span`` bytes per run; the newest offers go first. The
fetcher issues them right after the reader's own request, in requests of at most
``speculate_request`` bytes, a few at a time (``fused.fetcher.SPECULATE_DEPTH``),
so a reader's miss never waits for speculation it does not need, and on the
link queues behind at most those few requests. Bytes fetched speculatively and
not yet read are at most ``speculate_budget``; a read of such a chunk gives its
bytes back to the budget, so good guesses keep speculation going and wrong
ones stop it: at most the budget of bytes is ever fetched for nothing. Images
laid out by access amplify in blob order already and do not speculate.
"""

from __future__ import annotations

import stat
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from rafs.bootstrap import Bootstrap
from rafs.model import Chunk

__all__ = ["FileMap", "ReadAhead", "ReadAheadConfig", "Speculator"]

Available = Callable[[int], bool]  # chunk index -> neither cached, in flight nor local


@dataclass(frozen=True, slots=True)
class ReadAheadConfig:
    window_bytes: int = 4 << 20  # uncompressed: the largest per-file window
    dir_batch_bytes: int = 256 << 10  # compressed: small files of a hot directory per miss
    first_batch_bytes: int = 64 << 10  # compressed: the same in a directory not read lately
    dir_memory: int = 4  # directories whose small files were first read lately
    # compressed: the most one fetch holds with its extras (missing chunks included),
    # whatever the rule; in images laid out by access, the blob-order amplification
    amplify_bytes: int = 1 << 20
    placed_by_access: bool = False
    # speculation (compressed bytes): unread speculative bytes at most (0: none), the
    # most offered after one run of a fetch, the most in one speculative request
    speculate_budget: int = 4 << 20
    speculate_span: int = 256 << 10
    speculate_request: int = 256 << 10


class FileMap:
    """Chunk-table index -> (file, position in the file), and each file's directory.

    Files are identified by any distinct int (EROFS nids for a bootstrap). A
    chunk shared by several files (dedup) belongs to the first one given.
    """

    def __init__(self, files: Iterable[tuple[int, int, Sequence[int | None]]]) -> None:
        """``files``: (file id, directory id, chunk-table index of each chunk)."""
        self._owner: dict[int, tuple[int, int]] = {}
        self._chunks: dict[int, Sequence[int | None]] = {}
        self._dir: dict[int, int] = {}
        owner = self._owner
        for file, directory, chunks in files:
            if file in self._chunks:
                continue  # a hardlink seen again
            self._chunks[file] = chunks
            self._dir[file] = directory
            for pos, index in enumerate(chunks):
                if index is not None and index not in owner:
                    owner[index] = (file, pos)

    @classmethod
    def from_bootstrap(cls, bootstrap: Bootstrap) -> FileMap:
        """One walk of the bootstrap's tree (about 0.1 s per 10 000 inodes)."""
        def files() -> Iterable[tuple[int, int, Sequence[int | None]]]:
            dirs: dict[bytes, int] = {}
            for path, node in bootstrap.walk():
                if node.is_dir:
                    dirs[path] = node.nid
                elif stat.S_ISREG(node.mode) and node.size:
                    parent = path.rpartition(b"/")[0] or b"/"
                    yield node.nid, dirs.get(parent, -1), bootstrap.file_chunks(node)
        return cls(files())

    def owner(self, index: int) -> tuple[int, int] | None:
        """(file, position of the chunk in the file), or None if no file has it."""
        return self._owner.get(index)

    def chunks(self, file: int) -> Sequence[int | None]:
        return self._chunks[file]

    def directory(self, file: int) -> int:
        return self._dir[file]

    def __len__(self) -> int:
        return len(self._chunks)


class ReadAhead:
    """Decides the chunks to fetch along with a reader's missing ones; see the module doc.

    ``chunk(i)`` gives the chunk record, ``successor(i)`` the chunk stored right
    after chunk ``i`` in its blob (or None). State is a few small dicts: the
    per-file windows and chunks read, bounded by the files the workload reads.
    """

    def __init__(self, chunk: Callable[[int], Chunk], successor: Callable[[int], int | None],
                 config: ReadAheadConfig | None = None, files: FileMap | None = None) -> None:
        self.chunk = chunk
        self.successor = successor
        self.config = config or ReadAheadConfig()
        self.files = files
        self._read: dict[int, set[int]] = {}  # file -> positions asked for
        self._window: dict[int, int] = {}  # file -> chunks of its current window
        self._dirs: OrderedDict[int, None] = OrderedDict()  # directories lately hot

    def extra(self, missing: Sequence[int], available: Available) -> list[int]:
        """The chunks to fetch with ``missing`` (which a reader waits for), in order,
        none of them in ``missing``; ``available(i)`` says a chunk may be fetched."""
        taken = set(missing)
        out: list[int] = []
        # the most one fetch holds, missing chunks included (as the blob-order rule)
        budget = [self.config.amplify_bytes
                  - sum(self.chunk(i).compressed_size for i in missing)]

        def take(index: int) -> bool:
            if index in taken or not available(index):
                return False
            size = self.chunk(index).compressed_size
            if size > budget[0]:
                return False
            budget[0] -= size
            taken.add(index)
            out.append(index)
            return True

        def take_run(index: int) -> bool:  # blob order: each run has its own limit
            if index in taken or not available(index):
                return False
            taken.add(index)
            out.append(index)
            return True

        if self.config.placed_by_access:
            for start, last in self._runs(missing):
                self._amplify(start, last, take_run)
            return out
        if self.files is None:
            return out
        for index in missing:
            self._follow(self.files, index, take)
        return out

    def speculate(self, fetched: Sequence[int], available: Available) -> list[int]:
        """The chunks worth fetching in the background after ``fetched`` (the chunks of
        a fetch for a reader): those stored after each of its back-to-back runs that
        belong to the run's last file or to files of its directory (the rest of the
        file, the directory's other files), up to ``speculate_span`` bytes per run, in
        blob order; none in images laid out by access (their fetches are amplified in
        blob order already)."""
        if (self.config.placed_by_access or self.config.speculate_budget <= 0
                or self.files is None or not fetched):
            return []
        out: list[int] = []
        taken = set(fetched)
        span = self.config.speculate_span
        files = self.files
        for _start, last in self._runs(fetched):
            owner = files.owner(last)
            if owner is None:
                continue
            file, directory = owner[0], files.directory(owner[0])
            size = 0
            current = last
            while True:
                nxt = self.successor(current)
                if nxt is None or nxt in taken or not available(nxt):
                    break
                other = files.owner(nxt)
                if other is None or (other[0] != file
                                     and files.directory(other[0]) != directory):
                    break  # only the rest of the file and of its directory
                size += self.chunk(nxt).compressed_size
                if size > span:
                    break
                taken.add(nxt)
                out.append(nxt)
                current = nxt
        return out

    def _follow(self, files: FileMap, index: int, take: Callable[[int], bool]) -> None:
        """The within-file window and the directory batch for one missing chunk."""
        owner = files.owner(index)
        if owner is None:
            return
        file, pos = owner
        read = self._read.setdefault(file, set())
        sequential = pos - 1 in read
        read.add(pos)
        chunks = files.chunks(file)
        if sequential:
            self._grow(file, chunks, pos, take)
        else:
            self._window[file] = 0
        if len(chunks) == 1:
            self._batch_directory(file, index, take)

    def _grow(self, file: int, chunks: Sequence[int | None], pos: int,
              take: Callable[[int], bool]) -> None:
        cap = max(1, self.config.window_bytes // max(1, self._chunk_size(chunks)))
        window = min(cap, max(1, 2 * self._window.get(file, 0)))
        self._window[file] = window
        read = self._read[file]
        for p in range(pos + 1, min(len(chunks), pos + 1 + window)):
            index = chunks[p]
            if index is not None and take(index):
                read.add(p)  # fetched ahead: a miss on the next one is sequential too

    def _chunk_size(self, chunks: Sequence[int | None]) -> int:
        first = next((i for i in chunks if i is not None), None)
        return 0 if first is None else self.chunk(first).uncompressed_size

    def _batch_directory(self, file: int, index: int, take: Callable[[int], bool]) -> None:
        files = self.files
        assert files is not None
        directory = files.directory(file)
        dirs = self._dirs
        hot = directory in dirs
        dirs[directory] = None
        dirs.move_to_end(directory)
        while len(dirs) > self.config.dir_memory:
            dirs.popitem(last=False)
        budget = self.config.dir_batch_bytes if hot else self.config.first_batch_bytes
        current = index
        while True:
            nxt = self.successor(current)
            if nxt is None:
                return
            owner = files.owner(nxt)
            if owner is None or owner[1] != 0:
                return
            other = owner[0]
            if files.directory(other) != directory or len(files.chunks(other)) != 1:
                return
            budget -= self.chunk(nxt).compressed_size
            if budget < 0 or not take(nxt):
                return
            self._read.setdefault(other, set()).add(0)
            current = nxt

    def _runs(self, missing: Sequence[int]) -> list[tuple[int, int]]:
        """(compressed offset of the first chunk, last chunk) of each back-to-back run
        of ``missing`` in blob order."""
        ordered = sorted(missing, key=lambda i: (self.chunk(i).blob_index,
                                                 self.chunk(i).compressed_offset))
        runs: list[tuple[int, int]] = []
        for index in ordered:
            if runs and self.successor(runs[-1][1]) == index:
                runs[-1] = (runs[-1][0], index)
            else:
                runs.append((self.chunk(index).compressed_offset, index))
        return runs

    def _amplify(self, start: int, index: int, take: Callable[[int], bool]) -> None:
        """Chunks after ``index`` while the run from ``start`` stays within amplify_bytes."""
        limit = self.config.amplify_bytes
        current = index
        while True:
            nxt = self.successor(current)
            if nxt is None:
                return
            c = self.chunk(nxt)
            if c.compressed_offset + c.compressed_size - start > limit or not take(nxt):
                return
            current = nxt


class Speculator:
    """The queue of speculative chunks and the budget of their unread bytes.

    Pure bookkeeping for the fetcher (and ``bench.readsim``): ``offer`` the
    chunks ``ReadAhead.speculate`` gives, take ``next_request`` when a request
    may go out, tell ``read`` every chunk a reader asks for and ``failed`` every
    speculative chunk that could not be fetched. At most ``budget`` compressed
    bytes fetched speculatively are unread at any time.
    """

    def __init__(self, chunk: Callable[[int], Chunk], successor: Callable[[int], int | None],
                 budget: int, request_bytes: int, queue_chunks: int = 512) -> None:
        self.chunk = chunk
        self.successor = successor
        self.budget = budget
        self.request_bytes = request_bytes
        self.queue_chunks = queue_chunks
        self._queue: deque[int] = deque()
        self._unread: dict[int, int] = {}  # speculative chunk -> compressed size
        self.unread_bytes = 0
        self.fetched_bytes = 0  # every speculative byte asked for (requests made)
        self.read_bytes = 0  # of those, the bytes a reader then asked for

    def offer(self, indices: Sequence[int]) -> None:
        """Candidates, the most wanted first; they go before the older ones."""
        if not indices:
            return
        self._queue.extendleft(reversed(indices))
        while len(self._queue) > self.queue_chunks:
            self._queue.pop()

    def next_request(self, available: Available) -> list[int]:
        """The chunks of the next speculative request (back to back in one blob, at most
        ``request_bytes``, within the budget), now counted as unread; [] for none."""
        queue = self._queue
        out: list[int] = []
        size = 0
        while queue:
            index = queue[0]
            if out and index != self.successor(out[-1]):
                break
            if index in self._unread or not available(index):
                queue.popleft()
                if out:
                    break
                continue
            c = self.chunk(index).compressed_size
            if (out and size + c > self.request_bytes) or self.unread_bytes + c > self.budget:
                break
            queue.popleft()
            out.append(index)
            size += c
            self._unread[index] = c
            self.unread_bytes += c
        self.fetched_bytes += size
        return out

    def read(self, index: int) -> bool:
        """A reader asked for chunk ``index``; True if that gave bytes back to the budget."""
        size = self._unread.pop(index, None)
        if size is None:
            return False
        self.unread_bytes -= size
        self.read_bytes += size
        return True

    def failed(self, index: int) -> None:
        """A speculative chunk that was not fetched: its bytes go back to the budget."""
        size = self._unread.pop(index, None)
        if size is not None:
            self.unread_bytes -= size
            self.fetched_bytes -= size

    @property
    def idle(self) -> bool:
        return not self._queue
