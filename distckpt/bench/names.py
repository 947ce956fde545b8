"""The contenders of `distckpt bench` by name: ``KIND[:key=value,...]``, the kinds, and the
defaults for local disk and for ``s3://``.

Shared by the driver (:mod:`distckpt.bench.harness`), the figures
(:mod:`distckpt.bench.figures`) and the workers (:mod:`distckpt.bench.contenders`); imports
neither jax nor anything else heavy.
"""

from __future__ import annotations

CONTENDER_KINDS = ("raw", "orbax", "distckpt")
LOCAL_CONTENDERS = ("raw", "orbax", "distckpt")
S3_CONTENDERS = ("raw", "distckpt")


def default_contenders(directory: str | None) -> tuple[str, ...]:
    """raw, orbax, distckpt; on ``s3://`` raw and distckpt (plain Orbax cannot save there,
    see :mod:`distckpt.bench.harness`; ask for it explicitly to have that measured)."""
    from distckpt.bench import s3 as bench_s3

    return S3_CONTENDERS if bench_s3.is_url(directory) else LOCAL_CONTENDERS


def parse_contender(text: str) -> tuple[str, dict[str, str]]:
    """``KIND[:key=value,...]`` -> (kind, options); KIND is raw, orbax or distckpt.

    >>> parse_contender("orbax:ocdbt=0,zarr3=1")
    ('orbax', {'ocdbt': '0', 'zarr3': '1'})
    """
    kind, _, rest = text.partition(":")
    if kind not in CONTENDER_KINDS:
        raise ValueError(f"unknown contender {text!r}: the kind is one of "
                         f"{list(CONTENDER_KINDS)}, optionally with options, e.g. "
                         "orbax:ocdbt=0,zarr3=1")
    options: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"bad option {item!r} in contender {text!r}: expected key=value")
        options[key.strip()] = value.strip()
    return kind, options
