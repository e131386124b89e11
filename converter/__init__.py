"""converter: OCI image -> RAFS image (``rafs convert``).

Modules, in the order data flows through them:

- ``source``       open ``oci:DIR[:TAG]``, ``docker-archive:FILE[:REF]`` or
                   ``docker://HOST/REPO[:TAG|@DIGEST]``: config + layer streams
- ``tarstream``    one layer as verified ``Entry`` objects (compression sniffed, digests checked)
- ``layermodel``   OCI layer semantics, once (whiteouts, links, paths): also runtime's unpack
- ``layers``       the model's tree as the image, file data to the chunker
- ``chunkdict``    chunks of an earlier RAFS image (``--chunk-dict``) to reference, not store
- ``chunker``      file data -> chunks: dedup, holes, compression, one blob per layer
- ``imageconfig``  the converted image's config (rootfs.diff_ids, history)
- ``convert``      orchestration, temp files, all-or-nothing placement into the target layout
                   (for a ``docker://`` target, a private staging layout)
- ``push``         the push access check before converting, and the upload of the result
- ``progress``     the stderr progress line; ``cli`` the ``convert`` subcommand
- ``errors``       the ConvertError tree
"""
