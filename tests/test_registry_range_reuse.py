"""Range reads from a registry reuse their connection: on a link with a round-trip
time, a new TCP connection per on-demand miss costs a handshake each time."""

from __future__ import annotations

import hashlib
import os

import trio

from bench.linkemu import LinkEmulator
from bench.registry import RegistryServer
from rafs.registry import AsyncRegistryClient, RegistryClient


def test_sequential_range_reads_share_one_connection(registry: RegistryServer) -> None:
    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with RegistryClient(registry.host) as client:
        client.push_blob("reuse/blob", digest, len(data), data)
    ranges = [(0, 4096), (1 << 20, 300_000), (2 << 20, 1 << 20), (17, 1)]

    with LinkEmulator(registry.host, profile="local") as link:
        async def read_all() -> list[bytes]:
            client = AsyncRegistryClient(link.host)
            try:
                out = []
                for offset, length in ranges:
                    out.append(b"".join([p async for p in client.stream_range(
                        "reuse/blob", digest, offset, length)]))
                return out
            finally:
                await client.aclose()

        got = trio.run(read_all)
        connections = link.wait_idle().connections

    assert got == [data[o:o + n] for o, n in ranges]
    assert connections == 1
