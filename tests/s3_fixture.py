"""pytest fixtures: one real SeaweedFS S3 server per test session (no mocks of S3).

Loaded from tests/conftest.py with ``pytest_plugins = ["tests.s3_fixture"]``.

* ``s3_server``: the running :class:`distckpt.tools.s3server.S3Server` (session scope;
  started on first use, so sessions that never touch S3 never start it). A missing
  ``weed`` binary fails the test with the install hint; it is never skipped silently.
* ``s3_env``: sets ``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` for the test (and the processes it starts), then restores them.
* ``s3_url``: a fresh ``s3://<bucket>/<test name>-<random>`` prefix for the test.
"""

from __future__ import annotations

import re
import secrets

import pytest

from distckpt.tools import s3server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    missing = None
    try:
        s3server.find_weed()
    except s3server.WeedNotFoundError as e:
        missing = str(e)
    if missing:
        pytest.fail(missing, pytrace=False)
    with s3server.seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()


@pytest.fixture
def s3_url(s3_server, request) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return s3_server.url(f"{name}-{secrets.token_hex(4)}")
