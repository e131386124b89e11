"""snapshotter: containerd proxy snapshotter and mount management (not built yet)."""
