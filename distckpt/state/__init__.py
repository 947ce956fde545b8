"""What a checkpoint holds: NNX state flattened to named leaves, meshes and sharding rules, content digests, provenance, per-process state."""
