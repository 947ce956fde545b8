"""Test infrastructure that ships with distckpt (real servers for tests and benchmarks)."""
