"""fused: the daemon that serves a RAFS image over FUSE with a verified chunk cache."""
