"""bench: reproducible benchmarks (corpus, conversion, mount, read throughput)."""
