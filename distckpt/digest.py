"""Content digests of sharded arrays that do not depend on how they are sharded.

To prove a restore onto another mesh (or another number of hosts) is exact,
the digest of an array must be the same whichever devices hold which pieces.
distckpt hashes every element together with its *global* flat index and adds
the hashes modulo 2**64:

    digest(a) = sum over i of mix(mix(i ^ SEED) ^ bits(a[i]))   (mod 2**64)

* Addition is commutative, so each process sums the shards it holds (only the
  first replica of each shard, so replicated data counts once) and the partial
  sums are added across processes: no gather of array data.
* Keying by the global index catches moved elements (a transposed or shifted
  shard), which a plain sum of element hashes would not.
* ``mix`` is the SplitMix64 finaliser, a bijection on 64-bit words with full
  avalanche, so one flipped bit changes the digest except with probability
  about 2**-64. This is a corruption and mismatch check, not a defence against
  an adversary.

Element bits are the raw bytes (1, 2, 4 or 8) widened to 64 bits, so -0.0 and
0.0 or NaN payloads differ: the check is bit-exact. Typed PRNG keys are hashed
through their key data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from distckpt import coordinator

_SEED = np.uint64(0x5D1C_C7E4_A0B3_2F19)
_C1 = np.uint64(0xBF58_476D_1CE4_E5B9)
_C2 = np.uint64(0x94D0_49BB_1331_11EB)
_ROWS_PER_BLOCK = 1 << 20  # bounds the temporary index array


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * _C1
    x = x ^ (x >> np.uint64(27))
    x = x * _C2
    return x ^ (x >> np.uint64(31))


def _bits(block: np.ndarray) -> np.ndarray:
    if block.dtype == np.bool_:
        block = block.astype(np.uint8)
    width = block.dtype.itemsize
    if width not in (1, 2, 4, 8):
        raise TypeError(f"cannot digest dtype {block.dtype} ({width}-byte elements)")
    return np.ascontiguousarray(block).view(f"u{width}").astype(np.uint64)


def _strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return list(reversed(strides))


def _block_sum(data: np.ndarray, starts: tuple[int, ...], global_shape: tuple[int, ...]) -> int:
    """Sum of element hashes of `data`, whose [0,...] element sits at `starts` globally."""
    if data.size == 0:
        return 0
    if data.ndim == 0:
        index = np.array([0], dtype=np.uint64)
        h = _mix(_mix(index ^ _SEED) ^ _bits(data.reshape(1)))
        return int(h.sum(dtype=np.uint64))
    strides = _strides(global_shape)
    total = np.uint64(0)
    rows = data.shape[0]
    inner = int(np.prod(data.shape[1:], dtype=np.int64)) or 1
    step = max(1, _ROWS_PER_BLOCK // inner)
    # Offsets of the inner dimensions, shared by every row block.
    inner_index = np.zeros(data.shape[1:], dtype=np.uint64)
    for d in range(1, data.ndim):
        shape = [1] * (data.ndim - 1)
        shape[d - 1] = data.shape[d]
        axis = (np.arange(data.shape[d], dtype=np.uint64) + np.uint64(starts[d])) * \
            np.uint64(strides[d])
        inner_index = inner_index + axis.reshape(shape)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        row = (np.arange(r0, r1, dtype=np.uint64) + np.uint64(starts[0])) * np.uint64(strides[0])
        index = row.reshape((-1,) + (1,) * (data.ndim - 1)) + inner_index[None]
        h = _mix(_mix(index ^ _SEED) ^ _bits(data[r0:r1]))
        total = total + h.sum(dtype=np.uint64)
    return int(total)


def local_partial(array: jax.Array) -> int:
    """This process's share of the digest of a (possibly sharded, multi-host) array."""
    if jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    shape = tuple(array.shape)
    total = 0
    for shard in array.addressable_shards:
        if shard.replica_id != 0:
            continue
        starts = tuple(0 if s.start is None else s.start for s in shard.index)
        total = (total + _block_sum(np.asarray(shard.data), starts, shape)) % (1 << 64)
    return total


def numpy_digest(array: np.ndarray) -> int:
    """The digest of a whole host array (equals the sharded digest of the same contents)."""
    array = np.asarray(array)
    return _block_sum(array, (0,) * array.ndim, tuple(array.shape))


def digests(arrays: Mapping[str, jax.Array] | Iterable[tuple[str, jax.Array]],
            name: str = "digest") -> dict[str, str]:
    """Digests of named arrays, identical on every process (hex strings).

    Collective over processes (every process calls it with the same names); `name`
    must identify the call (e.g. ``"drill:step=8"``).
    """
    pairs = list(arrays.items() if isinstance(arrays, Mapping) else arrays)
    mine = [str(local_partial(a)) for _, a in pairs]
    gathered = coordinator.all_gather(f"digest:{name}", mine)
    out = {}
    for i, (key, array) in enumerate(pairs):
        total = sum(int(p[i]) for p in gathered) % (1 << 64)
        out[key] = f"{total:016x}:{array.dtype}:{'x'.join(map(str, array.shape)) or 'scalar'}"
    return out
