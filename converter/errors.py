"""The converter's exception tree (a branch of rafs.errors).

    RafsError
    └── ConvertError          converting an image failed
        ├── OptionError       a bad option (chunk size, compression level, target)
        ├── BadTarError       a layer is not a readable tar: truncated, garbage,
        │   │                 bad compression, unknown entry type, impossible tree
        │   ├── UnsafePathError  an entry or hardlink name escapes the root
        │   └── LinkTargetError  a hardlink names a missing or unlinkable target
        └── LayerDigestError  a layer's bytes do not match its descriptor digest or
                              its diff_id (also a rafs.errors.DigestError)

Every message is one line naming the layer and entry it is about.
"""

from __future__ import annotations

import errno

from rafs.errors import DigestError, RafsError


class ConvertError(RafsError):
    """Converting an image failed."""

    errno = errno.EINVAL


class OptionError(ConvertError):
    """A conversion option is out of range or inconsistent."""


class BadTarError(ConvertError):
    """A layer is not a tar archive we can apply."""


class UnsafePathError(BadTarError):
    """An entry or hardlink name escapes the image root."""


class LinkTargetError(BadTarError):
    """A hardlink names a target that does not exist or cannot be linked."""


class LayerDigestError(ConvertError, DigestError):
    """A layer does not match the digest that vouches for it."""
