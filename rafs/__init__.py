"""rafs: the format and the image.

On-disk structures (EROFS bootstrap and the RAFS section), blob chunk framing,
codecs, digests and OCI image plumbing. No FUSE and no containers here.
"""
