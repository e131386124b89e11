"""Test utilities; import them as ``tests.helpers.<module>``.

The reference helpers are written independently of the product code, because
they are what rafs is compared against; none of them imports rafs, converter or
fused:

- ``ocibuild``: synthetic OCI image layouts and ``docker save`` archives from tar entries.
- ``treecmp``: a full metadata + content record of a directory tree, and a diff of two.
- ``umoci``: unpack an OCI layout tag with umoci (the reference unpacker).
- ``procs``: run commands with a timeout; assert a clean one-line CLI error.

``images`` and ``kernel`` serve the format tests (in-memory RAFS images built
straight through the bootstrap writer; kernel EROFS mounts). ``mutate`` and
``fuzzing`` are the fuzzer (mutations that know the format, resealing, the
case runners); ``treeread`` is its reader of mounted trees (independent of rafs).
"""
