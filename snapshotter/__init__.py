"""snapshotter: the containerd proxy snapshotter (``rafs snapshotter``).

Modules: ``store`` (SQLite metadata), ``snapshots`` (the snapshot operations
and the mounts they hand out), ``labels`` and ``remote`` (RAFS layers: from
Prepare labels to a fused mount), ``filters`` (containerd filter expressions),
``service`` (the gRPC server), ``cli``; ``api`` holds the containerd protos
and the stubs ``make protos`` generates from them.
"""
