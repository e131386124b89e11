"""converter: OCI image -> RAFS image (tar streams, layer merge, chunking, blobs)."""
