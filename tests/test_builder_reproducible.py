"""The bootstrap writer is deterministic and its output does not change by accident.

``build_bootstrap`` of one fixed model (``test_bootstrap.rich_image``: every node
kind and layout, inline and block directories and symlinks, chunk-based files
with holes and dedup over two blobs, compact and extended inodes, xattrs,
devices, hardlinks; and a prefetch list) must give the same bytes every time,
and the bytes recorded here: a refactoring of the writer must keep them.
Change ``GOLDEN`` only with a deliberate format change, and say so in the commit.
"""

from __future__ import annotations

import hashlib

from rafs.bootstrap import Bootstrap
from tests.test_bootstrap import rich_image

GOLDEN = "sha256:53142b12bf6553d7253c7122098c84fe9ba65dcfe2186e45128df1702b6c5f9d"


def test_the_same_model_gives_the_same_bytes_as_recorded() -> None:
    first = rich_image().finish(prefetch=(b"/etc/one", b"/wide", b"/missing"))
    again = rich_image().finish(prefetch=(b"/etc/one", b"/wide", b"/missing"))
    assert first == again
    Bootstrap.from_bytes(first)  # and our reader takes it
    assert "sha256:" + hashlib.sha256(first).hexdigest() == GOLDEN
