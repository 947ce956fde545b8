"""The XLA digest kernel against its NumPy reference (``digest.numpy_digest``).

Hypothesis draws an array (0-d to 4-d, empty dims included, random raw bits, so NaN
payloads and -0.0 occur) and a sharding over 1, 2, 4 or 8 of the CPU devices
(tests/conftest.py), and checks that this process's digest of the sharded array, taken
both ways :func:`digest.dispatch` offers (on device, and deferred host views), equals
the NumPy digest of the whole array. A failure prints the drawn example and the
Hypothesis seed to reproduce it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distckpt.state import digest

DTYPES = ["float32", "bfloat16", "float16", "int8", "int32", "uint8", "bool", "int64"]


def _random_array(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    np_dtype = np.dtype(jnp.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np_dtype.itemsize, dtype=np.uint8)
    return raw.view(np_dtype).reshape(shape)


@st.composite
def _cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=0, max_size=4)))
    n = draw(st.sampled_from([1, 2, 4, 8]))
    mesh_shape = draw(st.sampled_from([(n,)] + ([(2, n // 2)] if n >= 4 else [])))
    # Each mesh axis shards one array dim it divides, or none (replicated over it).
    spec: list[str | None] = [None] * len(shape)
    for axis, size in zip("xy", mesh_shape, strict=False):
        dims = [d for d, length in enumerate(shape) if spec[d] is None and length % size == 0]
        d = draw(st.sampled_from([None, *dims]))
        if d is not None:
            spec[d] = axis
    return dtype, shape, mesh_shape, tuple(spec), draw(st.integers(0, 2**32 - 1))


def _kernel_digests(x: jax.Array) -> list[str]:
    """dispatch()'s digests of x, with and without defer, through both paths: the XLA
    kernel (every shard above the small-block size) and NumPy blocks at their global
    offsets (every shard below it)."""
    out = []
    saved = digest.SMALL_ELEMENTS
    try:
        for small in (0, 1 << 62):
            digest.SMALL_ELEMENTS = small
            out += [digest.to_hex(digest.dispatch([x], defer=defer).result()[0])
                    for defer in (False, True)]
    finally:
        digest.SMALL_ELEMENTS = saved
    return out


def _check(dtype, shape, mesh_shape, spec, seed) -> None:
    host = _random_array(dtype, shape, seed)
    devices = np.array(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
    mesh = Mesh(devices, ("x", "y")[:len(mesh_shape)])
    x = jax.device_put(host, NamedSharding(mesh, PartitionSpec(*spec)))
    assert x.dtype == host.dtype and x.shape == host.shape
    want = digest.numpy_digest(host)
    assert _kernel_digests(x) == [want] * 4, (dtype, shape, mesh_shape, spec, seed)
    if host.size:  # position matters: a moved element changes the digest
        flipped = np.flip(host)
        if flipped.tobytes() != host.tobytes():
            assert digest.numpy_digest(flipped) != want


@pytest.fixture(autouse=True)
def _x64():
    # int64 needs 64-bit JAX types; the other dtypes are unaffected by the flag.
    with jax.enable_x64(True):
        yield


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=_cases())
def test_kernel_matches_numpy_reference(case):
    _check(*case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_single_and_sharded(dtype):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed={seed}")  # rerun a failure with this seed
    for shape, mesh_shape, spec in [((), (1,), ()), ((0, 3), (2,), (None, None)),
                                    ((8, 3), (8,), ("x", None)),
                                    ((2, 4, 3, 2), (2, 4), ("x", "y", None, None))]:
        _check(dtype, shape, mesh_shape, spec, seed)


@pytest.mark.fast
@pytest.mark.parametrize("shape", [(300, 700), (200_003,), (3, 70_001), (1, 90_000)])
def test_host_lanes_in_rows_equal_the_kernel(shape):
    """host_lanes works on large blocks a few rows at a time; the sum is the kernel's."""
    rng = np.random.default_rng(7)
    host = rng.standard_normal(shape).astype(np.float32)
    starts = np.array([5 * (d + 1) for d in range(len(shape))], dtype=np.uint32)
    want = tuple(int(v) for v in np.asarray(digest._shard_lanes(jnp.asarray(host), starts)))
    assert digest.host_lanes(host, starts) == want


@st.composite
def _blocks(draw):
    dtype = draw(st.sampled_from(DTYPES + ["float64", "complex64"]))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
    starts = draw(st.lists(st.integers(0, 2**32 - 1), min_size=max(1, len(shape)),
                           max_size=max(1, len(shape))))
    chunk = draw(st.sampled_from([1, 2, 3, 7, 64, 1 << 16]))
    return dtype, shape, starts, chunk, draw(st.integers(0, 2**32 - 1))


@pytest.mark.fast
@settings(max_examples=200, deadline=None)
@given(case=_blocks())
def test_host_lanes_equal_the_reference_definition(case):
    """The fast NumPy path (a hash per row for the leading coordinates, buffers of at most
    `chunk` elements, split in rows and in columns) computes the reference's lanes, for
    any dtype, shape (empty and 0-d included) and global start, wrapping past 2**32."""
    dtype, shape, starts, chunk, seed = case
    if dtype == "complex64":
        host = _random_array("float32", (*shape, 2), seed).view(np.complex64).reshape(shape)
    else:
        host = _random_array(dtype, shape, seed)
    saved = digest._HOST_ROWS_ELEMENTS
    try:
        digest._HOST_ROWS_ELEMENTS = chunk
        got = digest.host_lanes(host, np.array(starts, np.uint32))
    finally:
        digest._HOST_ROWS_ELEMENTS = saved
    assert got == digest._reference_lanes(host, np.array(starts, np.uint32)), case
