"""`import distckpt`, the CLI's `--help` and its argument errors load no JAX (they took
~2 s each when they did); every public name still resolves, to the object its module
defines.

Each case runs in a fresh interpreter: this test process has imported JAX long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("jax", "flax", "orbax", "tensorstore")


def fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def loaded_after(statements: str) -> list[str]:
    """The heavy top-level packages a fresh interpreter holds after `statements`."""
    res = fresh(f"{statements}\nimport sys\n"
                f"import json; print(json.dumps(sorted(m for m in sys.modules\n"
                f"                             if m.split('.')[0] in {HEAVY!r})))")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_distckpt_loads_no_jax():
    assert loaded_after("import distckpt") == []


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["drill", "--help"],
    ["drill", "--frm", "4x2"],                        # an unknown flag
    ["drill", "--from", "3x"],                        # not a slice
    ["drill", "--from", "3x2:data=4"],                # a mesh that does not fit the slice
    ["drill", "--fault", "nope"],
    ["drill", "--dir", "/etc/passwd"],                # a file, not a directory
    ["launch", "--hosts", "0", "--", "true"],
], ids=lambda a: " ".join(a))
def test_cli_help_and_argument_errors_load_no_jax(argv):
    code = ("from distckpt.tools import cli\n"
            f"try:\n    rc = cli.main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "assert rc in (0, 2), rc")
    assert loaded_after(code) == []


def test_every_public_name_resolves_to_its_module_object():
    res = fresh(
        "import importlib, distckpt\n"
        "assert sorted(distckpt._LAZY) == sorted(distckpt.__all__), "
        "set(distckpt._LAZY) ^ set(distckpt.__all__)\n"
        "for name, module in distckpt._LAZY.items():\n"
        "    assert getattr(distckpt, name) is getattr(importlib.import_module(module), name)\n"
        "    assert name in dir(distckpt)\n"
        "from distckpt import CheckpointService, make_mesh\n"
        "try:\n    distckpt.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n")
    assert res.returncode == 0, res.stderr
    assert "has no attribute 'no_such_name'" in res.stdout


def test_type_checking_imports_match_the_lazy_table():
    # mypy and IDEs see the TYPE_CHECKING imports; the runtime sees _LAZY. Same names,
    # same modules, each imported "as" itself (an explicit re-export).
    import ast

    import distckpt

    tree = ast.parse((ROOT / "distckpt" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If)
                 and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom), ast.dump(node)
        for alias in node.names:
            assert alias.asname == alias.name, alias.name
            seen[alias.name] = node.module
    assert seen == distckpt._LAZY
