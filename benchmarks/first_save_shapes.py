"""First save of a state with many distinct small shapes: stall and time to committed.

    python benchmarks/first_save_shapes.py [--leaves 100] [--kernel]

Digests compile an XLA kernel per shard shape; shards of at most
``distckpt.state.digest.SMALL_ELEMENTS`` elements are digested in NumPy instead.
``--kernel`` forces the XLA kernel for every shard (the behaviour before), for comparison.
One process, on whatever devices JAX has.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

import distckpt
from distckpt.state import digest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--leaves", type=int, default=100, help="distinct shapes (default 100)")
    p.add_argument("--kernel", action="store_true", help="digest every shard with XLA")
    args = p.parse_args(argv)
    if args.leaves < 1:
        p.error("--leaves must be at least 1")
    if args.kernel:
        digest.SMALL_ELEMENTS = 0
    items = {"s": {f"a{i}": jnp.full((i + 1, 7 + i % 5), float(i)) for i in range(args.leaves)}}
    with tempfile.TemporaryDirectory() as d, distckpt.CheckpointService(d) as ckpt:
        for step in (1, 2):
            t = time.perf_counter()
            ckpt.save(step, items)
            stall = time.perf_counter() - t
            ckpt.wait()
            print(f"save {step}: stall {stall:.2f} s, committed after {time.perf_counter() - t:.2f} s")
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                             sharding=a.sharding), items)
        t = time.perf_counter()
        restored = ckpt.restore(target)
        print(f"restore: {time.perf_counter() - t:.2f} s, verified={restored.verified}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
