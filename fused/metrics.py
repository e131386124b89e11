"""Prometheus exposition of a mount's ``Stats``, through ``prometheus_client``.

``StatsCollector`` turns the live counters into metric families at scrape time
(so the hot path only bumps ints); ``render`` is the text the control socket's
``metrics`` command returns, and ``serve_http`` the ``--metrics-address``
endpoint (prometheus_client's own threaded HTTP server on a private registry).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from .errors import MountError
from .stats import HELP, KINDS, LATENCY_BUCKETS, Stats

__all__ = ["StatsCollector", "new_registry", "parse_address", "render", "serve_http"]

_PLAIN = ("read_requests", "read_bytes", "cache_hits", "cache_misses", "cache_corrupt",
          "cache_lost", "cache_refetched", "cache_enospc", "cache_write_errors",
          "cache_evictions", "cache_evicted_bytes", "dedup_hits", "dedup_bytes",
          "retries", "range_ignored", "prefetch_chunks", "digest_failures", "errors",
          "internal_errors")


class StatsCollector(Collector):
    def __init__(self, stats: Stats, labels: dict[str, str]) -> None:
        self.stats = stats
        self.names = sorted(labels)
        self.values = [labels[k] for k in self.names]

    def _counter(self, name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(f"rafs_{name}", doc, labels=[*self.names, *extra])

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        s = self.stats
        for name in _PLAIN:
            family = self._counter(name, HELP[name])
            family.add_metric(self.values, getattr(s, name))
            yield family
        for name, table, doc in (
            ("backend_requests", s.requests, HELP["backend_requests"]),
            ("backend_bytes", s.bytes, HELP["backend_bytes"]),
            ("backend_chunks", s.chunks, HELP["backend_chunks"]),
        ):
            family = self._counter(name, doc + ", by kind", ("kind",))
            for kind in KINDS:
                family.add_metric([*self.values, kind], table[kind])
            yield family
        family = self._counter("backend_errors", HELP["backend_errors"] + ", by class",
                               ("class",))
        for cls, n in sorted(s.error_classes.items()):
            family.add_metric([*self.values, cls], n)
        yield family
        family = self._counter("fuse_requests", HELP["fuse_requests"], ("op",))
        for op, n in sorted(s.fuse_requests.items()):
            family.add_metric([*self.values, op], n)
        yield family
        for name, value, doc in (
            ("rafs_cache_bytes", s.cache_bytes, "size of the chunk cache directory on disk, "
             "last measured"),
            ("rafs_cache_cap_bytes", s.cache_cap, "the cache's cap in force (0: none)"),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=self.names)
            gauge.add_metric(self.values, value)
            yield gauge
        yield from self._endpoints()
        gauge = GaugeMetricFamily("rafs_prefetch_planned_chunks",
                                  "chunks on the image's prefetch list", labels=self.names)
        gauge.add_metric(self.values, s.prefetch_planned)
        yield gauge
        buckets, total = [], 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], s.latency_counts,
                            strict=True):
            total += n
            buckets.append((bound, total))
        hist = HistogramMetricFamily("rafs_read_latency_seconds",
                                     "time to answer a read request", labels=self.names)
        hist.add_metric(self.values, buckets, s.latency_sum)
        yield hist


    def _endpoints(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """Per registry endpoint (mirrors and the registry): state and counters."""
        endpoints = self.stats.endpoints
        up = GaugeMetricFamily("rafs_endpoint_up", "1 while requests go to the registry "
                               "endpoint, 0 while it is down", labels=[*self.names, "endpoint"])
        for name, e in endpoints.items():
            up.add_metric([*self.values, name], 1 if e.up else 0)
        yield up
        for attr, doc in (("requests", "requests sent to the registry endpoint"),
                          ("errors", "failed requests to the registry endpoint"),
                          ("bytes", "bytes received from the registry endpoint"),
                          ("digest_errors", "ranges from the registry endpoint that did not "
                           "match their digest"),
                          ("stalls", "requests to the registry endpoint given up as stalled")):
            family = self._counter(f"endpoint_{attr}", doc, ("endpoint",))
            for name, e in endpoints.items():
                family.add_metric([*self.values, name], getattr(e, attr))
            yield family


def new_registry(stats: Stats, labels: dict[str, str]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, labels))
    return registry


def render(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6, ``:PORT`` for every address)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise MountError(f"bad metrics address {address!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_http(address: str, registry: CollectorRegistry) -> tuple[str, int]:
    """Serve ``/metrics`` on ``address`` from a daemon thread; returns the bound (host, port)."""
    host, port = parse_address(address)
    try:
        server, _thread = start_http_server(port, host, registry=registry)
    except OSError as e:
        raise MountError(f"cannot serve metrics on {address}: {e.strerror or e}") from None
    bound = server.server_address
    return str(bound[0]), int(bound[1])
