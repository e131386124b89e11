"""bench: reproducible benchmarks and the parts they are built from.

Parts: ``corpus`` (the Debian reference images), ``registry`` (a real
``docker-registry``), ``linkemu`` (a link emulator: latency and bandwidth),
``containerd_env`` (a private containerd), ``tools``. Benchmarks:
``coldstart`` (``rafs bench``: cold starts through containerd and ``rafs
run``), ``foundation`` (conversion, mount, reads), ``lazy``, ``modes``
(kernel vs fuse vs local disk), ``run_bench`` (``rafs run`` lazy vs eager),
``containerd``, ``profile_daemon`` (py-spy of the daemon), ``demo`` (``make demo``).
"""
