"""The README quickstart (examples/quickstart.py) runs as written, on one and two hosts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

QUICKSTART = str(Path(__file__).parent.parent / "examples" / "quickstart.py")


@pytest.mark.multiprocess
def test_quickstart_on_two_hosts(tmp_path, run_hosts):
    job = run_hosts(2, 4, command=[sys.executable, QUICKSTART, str(tmp_path)]).check()
    for host in (0, 1):
        assert f"[host {host}] committed steps: [20, 30] best: 30" in job.output
        assert f"[host {host}] restored step 30 kernel sharding P('fsdp',)" in job.output


@pytest.mark.fast
def test_readme_quickstart_is_the_example():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    body = Path(QUICKSTART).read_text()
    start = body.index("class MLP")
    end = body.index('if __name__ == "__main__":')
    assert body[start:end].strip() in readme, "README quickstart drifted from examples/"
