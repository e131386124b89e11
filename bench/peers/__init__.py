"""The systems ``rafs bench`` measures rafs against (``--against``).

``bench.peers.estargz`` is eStargz: Debian's stargz-snapshotter library, built
into a small snapshotter daemon (Go source in ``estargz-snapshotter/``) on first
use and cached, and the images ``ctr-remote`` converts and optimizes.
"""
