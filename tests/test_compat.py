"""distckpt.compat: the one module that may use Orbax's and JAX's private internals."""

from __future__ import annotations

import ast
import importlib.metadata
import logging
import re
from pathlib import Path

import pytest

from distckpt import compat

PACKAGE = Path(compat.__file__).parent
# Attributes of Orbax/JAX objects that are private; only compat.py may name them.
PRIVATE_NAMES = {"_checkpoint_deleter", "_finalize_thread", "_maybe_create_base_dir", "_impl"}
# A dotted module path through a private package, e.g. "jax._src.distributed".
PRIVATE_MODULE = re.compile(r"[\w.]*\b_src(\.[\w.]+)?")


def _private_uses(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    """Every private use in `path`'s code (docstrings and comments may mention them)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ImportFrom) and "._src" in f".{node.module or ''}.":
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if "._src" in f".{a.name}."]
        elif isinstance(node, ast.Attribute) and (node.attr in PRIVATE_NAMES
                                                  or node.attr == "_src"):
            found.append(f"{where} .{node.attr}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                node.name in PRIVATE_NAMES):
            found.append(f"{where} def {node.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (
                node.value in PRIVATE_NAMES or PRIVATE_MODULE.fullmatch(node.value)):
            found.append(f"{where} {node.value!r}")  # getattr(x, "_finalize_thread"), ...
    return found


def test_private_internals_are_used_only_in_compat():
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "compat.py"
            for use in _private_uses(path)]
    assert uses == [], "private Orbax/JAX use outside distckpt/compat.py: " + ", ".join(uses)


def test_the_static_check_sees_each_kind_of_use(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from orbax.checkpoint._src.path import atomicity\n"
        "import jax._src.distributed\n"
        "m._checkpoint_deleter = None\n"
        "getattr(m, '_finalize_thread', None)\n"
        "class S:\n    async def _maybe_create_base_dir(self, d): ...\n"
        "k.dtype._impl.name\n"
        '"""Docstrings may name orbax.checkpoint._src.path and _finalize_thread."""\n')
    assert len(_private_uses(sample, tmp_path)) == 6


def test_the_tested_versions_are_the_pinned_and_installed_ones():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    assert f'"jax=={compat.TESTED_JAX}"' in pyproject
    assert f'"orbax-checkpoint=={compat.TESTED_ORBAX}"' in pyproject
    assert importlib.metadata.version("jax") == compat.TESTED_JAX
    assert importlib.metadata.version("orbax-checkpoint") == compat.TESTED_ORBAX
    compat.check_versions(compat.TESTED_JAX, compat.TESTED_ORBAX, env={})


def test_an_untested_version_fails_with_what_to_do():
    with pytest.raises(ImportError) as raised:
        compat.check_versions(compat.TESTED_JAX, "0.11.0", env={})
    message = str(raised.value)
    assert "orbax-checkpoint 0.11.0 (tested: 0.12.8)" in message
    assert f"jax {compat.TESTED_JAX}" in message  # both versions are named
    assert f"orbax-checkpoint=={compat.TESTED_ORBAX}" in message
    assert "DISTCKPT_ALLOW_UNTESTED_VERSIONS=1" in message

    with pytest.raises(compat.UntestedVersionError, match=r"jax 0\.9\.0 \(tested: 0\.10\.2\)"):
        compat.check_versions("0.9.0", compat.TESTED_ORBAX, env={})


def test_the_env_override_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger=compat.__name__):
        compat.check_versions("0.9.0", "0.11.0",
                              env={"DISTCKPT_ALLOW_UNTESTED_VERSIONS": "1"})
    assert "jax 0.9.0 (tested: 0.10.2)" in caplog.text
    assert "trying anyway" in caplog.text
    with pytest.raises(ImportError):  # any other value is not an override
        compat.check_versions("0.9.0", compat.TESTED_ORBAX,
                              env={"DISTCKPT_ALLOW_UNTESTED_VERSIONS": "0"})
