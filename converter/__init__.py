"""converter: OCI image -> RAFS image (``rafs convert``).

Modules, in the order data flows through them:

- ``source``       open ``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``: config + layer streams
- ``tarstream``    one layer as verified ``Entry`` objects (compression sniffed, digests checked)
- ``layermodel``   OCI layer semantics, once (whiteouts, links, paths): also runtime's unpack
- ``layers``       the model's tree as the image, file data to the chunker
- ``chunker``      file data -> chunks: dedup, holes, compression, one blob per layer
- ``imageconfig``  the converted image's config (rootfs.diff_ids, history)
- ``convert``      orchestration, temp files, all-or-nothing placement into the target layout
- ``progress``     the stderr progress line; ``cli`` the ``convert`` subcommand
- ``errors``       the ConvertError tree
"""
