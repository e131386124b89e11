"""bench: reproducible benchmarks and the parts they are built from.

Parts, shared with the tests (``tests/conftest.py`` and ``tests/helpers``
import them; bench never imports a test fixture, only the generators of the
longer property and fuzz runs): ``corpus`` (the Debian reference images in
``/var/cache/rafs``, with ``parentdirs``), ``registry`` (a real
``docker-registry``: ``RegistryServer``, its auth), ``linkemu`` (a link
emulator: latency and bandwidth), ``containerd_env`` (a private containerd),
``tools`` (the benchmarks' helpers and their synthetic images:
``oci_layout_of_tar``, ``many_files_tar``, ``big_file_tar``).

Benchmarks: ``coldstart`` (``rafs bench``: cold starts through containerd and
``rafs run``, against ``peers`` such as eStargz), ``node`` (a node's image
pulls under a cache cap), ``foundation`` (conversion, mount, reads),
``cacheread`` (reads through the chunk cache), ``lazy``, ``modes`` (kernel vs
fuse vs local disk), ``run_bench`` (``rafs run`` lazy vs eager),
``containerd``, ``profile_daemon`` (py-spy of the daemon), ``demo`` (``make
demo``); longer runs of two tests: ``layers_property`` (the layer-semantics
property test, ``tests.helpers.layerprop``) and ``fuzz`` (the bootstrap
fuzzer, ``tests.helpers.fuzzing``).
"""
