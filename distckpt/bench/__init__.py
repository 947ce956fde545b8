"""`distckpt bench`: distckpt against plain Orbax and the raw disk."""
