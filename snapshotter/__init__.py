"""snapshotter: the containerd proxy snapshotter (``rafs snapshotter``).

Modules: ``store`` (SQLite metadata), ``snapshots`` (the snapshot operations
and the mounts they hand out), ``labels`` and ``remote`` (RAFS layers: from
Prepare labels to a fused mount), ``filters`` (containerd filter expressions),
``service`` (the gRPC server), ``imageproxy`` and ``keychain`` (CRI's image
service in front of containerd's, keeping the kubelet's pull credentials),
``cli``; ``api`` holds the containerd and CRI protos and the stubs ``make
protos`` generates from them.
"""
