"""runtime: the `rafs` command line (``cli``, ``console``) and the container runtime:
`rafs run` on runc (``run``), `ps`/`rm` (``manage``), `optimize`, and the unpacked plain
images (``unpack``, ``unpacked``)."""
