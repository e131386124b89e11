"""rafs: the format and the image.

On-disk structures (EROFS bootstrap and the RAFS section), blob chunk framing,
codecs, digests and OCI image plumbing. No FUSE and no containers here.

``version()`` is the one place that says which rafs this is (``rafs
--version``, ``rafs ls``, the daemon's state and metrics).
"""

from __future__ import annotations

import functools

__all__ = ["version"]


@functools.cache
def version() -> str:
    """The installed rafs version, from the package metadata (``0+unknown`` when the
    package is not installed, e.g. a checkout on PYTHONPATH without ``pip install``)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("rafs")
    except PackageNotFoundError:
        return "0+unknown"
