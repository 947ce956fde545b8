"""Where checkpoints live: a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

A :class:`Location` is parsed once from what the user typed plus the usual environment, and
every layer that touches storage is configured from it:

* **array data**: TensorStore's own ``file``/``s3``/``gcs`` kvstore drivers
  (:meth:`Location.kvstore_spec`); Orbax reaches ``s3://`` through the small adapter in
  :mod:`distckpt.storage.orbax_adapter`;
* **directories and Orbax's own metadata files**: etils ``epath`` (fsspec: ``s3fs`` for
  ``s3://``, ``gcsfs`` for ``gs://``; the ``s3`` extra pins s3fs, gcsfs is not pinned: ``pip install
  gcsfs``);
* **small files** distckpt writes itself (commit records, markers): etils ``epath`` too,
  one PUT each on object stores, write-to-temporary-then-rename on local disk
  (:func:`distckpt.checkpoint.committed.write_durable`).

Configuration, first match wins:

============  ==========================================  ================================
              s3://                                       gs://
============  ==========================================  ================================
endpoint      ``endpoint=``, ``AWS_ENDPOINT_URL_S3``,     (TensorStore's
              ``AWS_ENDPOINT_URL``, else AWS              ``TENSORSTORE_GCS_HTTP_URL``
                                                          for emulators)
region        ``region=``, ``AWS_REGION``,                n/a
              ``AWS_DEFAULT_REGION``, ``us-east-1`` when
              an endpoint is set, else the bucket's own
credentials   ``credentials=S3Credentials(...)``, then    Application Default Credentials
              ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_  (``GOOGLE_APPLICATION_
              KEY`` (+``AWS_SESSION_TOKEN``), then the    CREDENTIALS``, gcloud, metadata
              AWS default chain (profile, ECS, IMDS)      server)
============  ==========================================  ================================

Secrets never leave this module in text: ``str(location)`` is the bare URL,
``repr(location)`` and :meth:`Location.describe` (for logs, metadata and reports) name the
credential *source* only, URLs with embedded credentials are refused without echoing them,
and explicit credentials reach TensorStore through private (0600) AWS profile files and s3fs
through fsspec's in-memory configuration, never through a spec or the environment.

One S3 configuration per process: etils and fsspec cache one S3 filesystem per process, so
preparing a second ``s3://`` location with a different endpoint or credentials raises.
"""

from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from typing import Any, Literal

from etils import epath

Scheme = Literal["file", "s3", "gs"]
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)


class StorageConfigError(ValueError):
    """A location or its storage configuration is invalid or conflicts with another."""


@dataclasses.dataclass(frozen=True)
class S3Credentials:
    """Explicit S3 credentials (otherwise the environment / AWS default chain is used)."""

    access_key_id: str
    """Access key id (shown redacted to its first 4 characters)."""
    secret_access_key: str = dataclasses.field(repr=False)
    """Secret access key (never shown)."""
    session_token: str | None = dataclasses.field(default=None, repr=False)
    """Session token of temporary credentials (never shown)."""

    def __post_init__(self):
        if not self.access_key_id or not self.secret_access_key:
            raise StorageConfigError("S3Credentials needs a non-empty access key id and secret")

    def __repr__(self) -> str:
        return f"S3Credentials(access_key_id='{self.access_key_id[:4]}…', secret=<redacted>)"


def _redact_url(url: str | None) -> str | None:
    """Drop user info, query and fragment from a URL (they may carry secrets)."""
    if url is None:
        return None
    match = _URL.match(url)
    if not match:
        return "<unparsable URL>"
    rest = re.split(r"[?#]", match.group(2), maxsplit=1)[0]
    host, slash, path = rest.partition("/")
    host = host.rpartition("@")[2]
    return f"{match.group(1)}://{host}{slash}{path}"


def _clean_prefix(raw: str, shown: str) -> str:
    parts = [p for p in raw.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StorageConfigError(f"{shown}: '.' and '..' are not allowed in a bucket prefix")
    return "/".join(parts)


@dataclasses.dataclass(frozen=True, repr=False)
class Location:
    """A checkpoint location. Build it with :meth:`parse`."""

    scheme: Scheme
    """'file' (local or network filesystem), 's3' or 'gs'."""
    bucket: str
    """Bucket name ('' for 'file')."""
    path: str
    """Absolute local path ('file'), or the key prefix in the bucket without slashes."""
    endpoint: str | None = None
    """S3 endpoint URL (None: AWS)."""
    region: str | None = None
    """S3 region to sign for (None: the bucket's own, looked up by TensorStore)."""
    credentials: S3Credentials | None = dataclasses.field(default=None, compare=False)
    """Explicit S3 credentials; None uses the environment or the AWS default chain."""
    credential_source: Literal["none", "explicit", "environment", "default"] = "none"
    """Where S3 credentials come from (what logs and reports show instead of them)."""

    def __post_init__(self):
        if self.scheme == "file":
            if self.bucket or not os.path.isabs(self.path):
                raise StorageConfigError(f"a local location needs an absolute path, got "
                                         f"{self.path!r}")
        elif self.scheme in ("s3", "gs"):
            rule = _S3_BUCKET if self.scheme == "s3" else _GS_BUCKET
            if not rule.match(self.bucket):
                raise StorageConfigError(
                    f"invalid {self.scheme} bucket name {self.bucket!r}: 3-63 lowercase letters, "
                    "digits, dots and hyphens, starting and ending with a letter or digit")
        else:
            raise StorageConfigError(f"unsupported scheme {self.scheme!r}")
        if self.scheme != "s3" and (self.endpoint or self.region or self.credentials):
            raise StorageConfigError(
                f"endpoint, region and credentials apply to s3:// only; {self.scheme} "
                "locations use " + ("Application Default Credentials" if self.scheme == "gs"
                                    else "the local filesystem"))
        if self.endpoint is not None and not re.match(r"^https?://[^/?#]+/?$", self.endpoint):
            raise StorageConfigError(
                f"S3 endpoint must be http(s)://HOST[:PORT], got {_redact_url(self.endpoint)}")
        if self.endpoint is not None and "@" in self.endpoint:
            raise StorageConfigError("put S3 credentials in S3Credentials or the environment, "
                                     "not in the endpoint URL")

    @classmethod
    def parse(cls, text: str | os.PathLike, *, endpoint: str | None = None,
              region: str | None = None, credentials: S3Credentials | None = None,
              environ: Mapping[str, str] | None = None) -> Location:
        """Parse a local path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

        Options left None are taken from `environ` (default ``os.environ``) as the module
        docstring's table says.

        >>> str(Location.parse("s3://ckpts/run-1/", environ={}))
        's3://ckpts/run-1'
        >>> Location.parse("gs://ckpts", environ={}).kvstore_spec()
        {'driver': 'gcs', 'bucket': 'ckpts', 'path': ''}
        """
        env = os.environ if environ is None else environ
        text = os.fspath(text)
        match = _URL.match(text)
        if match is None or match.group(1) == "file":
            local = match.group(2) if match else text
            if not local:
                raise StorageConfigError("empty checkpoint location")
            return cls("file", "", os.path.abspath(os.path.expanduser(local)),
                       endpoint=endpoint, region=region, credentials=credentials)
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme not in ("s3", "gs"):
            raise StorageConfigError(
                f"unsupported checkpoint location scheme {scheme}://; use a local path, "
                "s3://bucket/prefix or gs://bucket/prefix")
        if "?" in rest or "#" in rest:
            raise StorageConfigError(f"{scheme}:// locations take no query or fragment")
        bucket, _, prefix = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            raise StorageConfigError(  # the text may hold a secret: do not echo it
                f"{scheme}:// location with user info or a port in the bucket name; put "
                "credentials in S3Credentials or the environment, never in the URL")
        shown = f"{scheme}://{bucket}/{prefix}"
        prefix = _clean_prefix(prefix, shown)
        if scheme == "gs":
            return cls("gs", bucket, prefix, endpoint=endpoint, region=region,
                       credentials=credentials)
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        endpoint = endpoint.rstrip("/") if endpoint else None
        region = (region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
                  or ("us-east-1" if endpoint else None))
        source: Literal["explicit", "environment", "default"]
        if credentials is not None:
            source = "explicit"
        elif env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            source = "environment"
        else:
            source = "default"
        return cls("s3", bucket, prefix, endpoint=endpoint, region=region,
                   credentials=credentials, credential_source=source)

    # ------------------------------------------------------------------ naming
    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def url(self) -> str:
        """The location as a string: the local path, or ``scheme://bucket[/prefix]``."""
        if self.is_local:
            return self.path
        return f"{self.scheme}://{self.bucket}" + (f"/{self.path}" if self.path else "")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in (
            ("endpoint", _redact_url(self.endpoint)), ("region", self.region)) if v)
        if self.scheme == "s3":
            extra += f", credentials={self.credential_source!r}"
        return f"Location({self.url!r}{extra})"

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for logs, metadata and reports (no secrets)."""
        out: dict[str, Any] = {"url": self.url, "scheme": self.scheme}
        if self.scheme == "s3":
            out.update(endpoint=_redact_url(self.endpoint), region=self.region,
                       credentials=self.credential_source)
        return out

    def joinpath(self, *parts: str) -> Location:
        """A location below this one (same endpoint and credentials)."""
        extra = _clean_prefix("/".join(parts), f"{self.url}/{'/'.join(parts)}")
        if self.is_local:
            return dataclasses.replace(self, path=os.path.join(self.path, extra))
        return dataclasses.replace(self, path="/".join(p for p in (self.path, extra) if p))

    def epath(self) -> epath.Path:
        """The etils path (call :func:`prepare` first for object stores)."""
        return epath.Path(self.url)

    # ------------------------------------------------------------------ TensorStore
    def s3_driver_fields(self) -> dict[str, Any]:
        """Endpoint, region and credentials members of an ``s3`` kvstore spec."""
        if self.scheme != "s3":
            raise StorageConfigError(f"{self} is not an s3:// location")
        fields: dict[str, Any] = {}
        if self.endpoint:
            fields["endpoint"] = self.endpoint
        if self.region:
            fields["aws_region"] = self.region
        if self.credentials is not None:
            fields["aws_credentials"] = {"type": "profile", "profile": "distckpt",
                                         **_profile_files(self.credentials)}
        elif self.credential_source == "environment":
            # The default chain would find them too, after logging failed profile lookups.
            fields["aws_credentials"] = {"type": "environment"}
        return fields

    def kvstore_spec(self, key_prefix: str = "") -> dict[str, Any]:
        """TensorStore kvstore spec rooted at this location (plus `key_prefix`)."""
        loc = self.joinpath(key_prefix) if key_prefix else self
        if loc.is_local:
            return {"driver": "file", "path": loc.path.rstrip("/") + "/"}
        path = f"{loc.path}/" if loc.path else ""
        if loc.scheme == "gs":
            return {"driver": "gcs", "bucket": loc.bucket, "path": path}
        return {"driver": "s3", "bucket": loc.bucket, "path": path, **loc.s3_driver_fields()}


# ---------------------------------------------------------------------- credentials
_PRIVATE_DIR: list[str] = []
_PROFILE_FILES: dict[S3Credentials, dict[str, str]] = {}
_PROFILE_LOCK = threading.Lock()


def _profile_files(credentials: S3Credentials) -> dict[str, str]:
    """Write explicit credentials to a private AWS profile for TensorStore.

    Two files, as the AWS SDK expects them: the credentials file (section ``[distckpt]``)
    holds the keys; the config file only declares ``[profile distckpt]``. (One file for
    both made the SDK parse ``[distckpt]`` as a config file too and log a warning naming
    the file for every line of it.)

    One pair per distinct credentials per process, under a lock: Orbax builds kvstore
    specs on several threads at once, and an unlocked cache let two first calls pick the
    same file name (CI failed on ``FileExistsError: credentials-0``).
    """
    with _PROFILE_LOCK:
        if credentials in _PROFILE_FILES:
            return dict(_PROFILE_FILES[credentials])
        if not _PRIVATE_DIR:
            _PRIVATE_DIR.append(tempfile.mkdtemp(prefix="distckpt-aws-"))  # mode 0700
            atexit.register(shutil.rmtree, _PRIVATE_DIR[0], True)
        n = len(_PROFILE_FILES)
        lines = ["[distckpt]", f"aws_access_key_id = {credentials.access_key_id}",
                 f"aws_secret_access_key = {credentials.secret_access_key}"]
        if credentials.session_token:
            lines.append(f"aws_session_token = {credentials.session_token}")
        files = {"credentials_file": os.path.join(_PRIVATE_DIR[0], f"credentials-{n}"),
                 "config_file": os.path.join(_PRIVATE_DIR[0], f"config-{n}")}
        for key, text in (("credentials_file", "\n".join(lines)),
                          ("config_file", "[profile distckpt]")):
            fd = os.open(files[key], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text + "\n")
        _PROFILE_FILES[credentials] = files
        return dict(files)


# ---------------------------------------------------------------------- prepare
_FSSPEC_S3: list[dict[str, Any]] = []


def _require(module: str, install: str, scheme: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{scheme}:// checkpoints need the `{module}` package (etils epath "
                          f"uses it for directories); install it with pip install {install}")


def _configure_fsspec_s3(location: Location) -> None:
    import fsspec.config

    # No listings cache: s3fs would otherwise keep serving a directory listing it made
    # earlier, blind to objects other processes (or TensorStore in this one) wrote or
    # deleted since, and commit records would appear and vanish late (measured).
    kwargs: dict[str, Any] = {"use_listings_cache": False}
    if location.endpoint:
        kwargs["endpoint_url"] = location.endpoint
    if location.region:
        kwargs["client_kwargs"] = {"region_name": location.region}
    if location.credentials is not None:
        kwargs.update(key=location.credentials.access_key_id,
                      secret=location.credentials.secret_access_key,
                      token=location.credentials.session_token)
    if _FSSPEC_S3 and _FSSPEC_S3[0] != kwargs:
        raise StorageConfigError(
            f"this process already uses another S3 endpoint or credentials; {location!r} "
            "needs a process of its own (etils/fsspec keep one S3 filesystem per process)")
    if not _FSSPEC_S3:
        _FSSPEC_S3.append(kwargs)
        fsspec.config.conf["s3"] = dict(kwargs)


def prepare(location: Location | str) -> epath.Path:
    """Make epath and Orbax work on `location` in this process; return its epath.Path.

    Idempotent. Local paths need nothing. ``s3://``: configures s3fs (for epath) with the
    location's endpoint, region and credentials and installs :mod:`distckpt.storage.orbax_adapter`.
    ``gs://``: checks that gcsfs is installed (Orbax handles gs:// itself).
    """
    loc = location if isinstance(location, Location) else Location.parse(location)
    if loc.scheme == "s3":
        _require("s3fs", "'distckpt[s3]'", "s3")
        _configure_fsspec_s3(loc)
        from distckpt.storage import orbax_adapter as orbax_s3

        orbax_s3.install()
        orbax_s3.register(loc)
    elif loc.scheme == "gs":
        _require("gcsfs", "gcsfs (no distckpt extra pins it yet)", "gs")
    return loc.epath()


_BACKENDS = {"s3": ("s3fs", "tensorstore"), "gs": ("gcsfs", "tensorstore")}
"""What an object-store directory's first use imports (etils epath reaches ``s3://``
through fsspec's s3fs: aiobotocore and aiohttp, ~0.7 s of a process start here)."""


def warm(directory: str | os.PathLike | Location | None) -> threading.Thread | None:
    """Start importing what `directory`'s storage needs in a background thread and return
    it (None for a local path): call it early, e.g. before
    :func:`distckpt.multihost.coordinator.initialize` (which waits for every host), so that
    opening the checkpoint service does not pay for the import. Measured on a 4-host job
    on SeaweedFS: every host spent ~0.7 s importing s3fs inside the service's first
    barrier-separated steps (the primary's look at the directory, the others' probe).

    Nothing is configured or contacted; a missing package or a bad path is left for
    :func:`prepare` and :func:`open_directory` to report where they always have."""
    if directory is None:
        return None
    try:
        location = directory if isinstance(directory, Location) else Location.parse(directory)
    except Exception:  # noqa: BLE001 - reported later, by open_directory, in one line
        return None
    scheme = location.scheme
    modules = _BACKENDS.get(scheme)
    if not modules:
        return None

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - prepare() says what is missing, and how
                return

    thread = threading.Thread(target=load, name=f"distckpt-warm-{scheme}", daemon=True)
    thread.start()
    return thread


def open_directory(directory: str | os.PathLike | Location) -> tuple[Location, epath.Path]:
    """The location of a checkpoint directory as a user gave it, and its prepared path.

    A local path is resolved once, here, against this process's working directory (and
    ``~`` expanded): Orbax refuses relative paths, and a path kept relative would change
    meaning if the working directory did. ``s3://`` and ``gs://`` are parsed with the
    environment and prepared (:func:`prepare`) in this process. An ``s3://`` path at or
    below a location this process already prepared (e.g. one with explicit credentials)
    uses that location's endpoint and credentials, as the array data below it does.
    """
    if isinstance(directory, Location):
        return directory, prepare(directory)
    location = Location.parse(directory)
    if location.is_local:
        return location, epath.Path(location.path)
    if location.scheme == "s3":
        from distckpt.storage import orbax_adapter as orbax_s3

        location = dataclasses.replace(orbax_s3.location_for(location.url),
                                       path=location.path)
    return location, prepare(location)


def temporary_path_base(location: Location) -> type:
    """The Orbax TemporaryPath class to subclass for commits at `location`.

    Local and network filesystems: ``AtomicRenameTemporaryPath`` (write to
    ``<step>.orbax-checkpoint-tmp``, rename). Object stores have no atomic rename:
    ``CommitFileTemporaryPath`` (write in place; a marker written last says committed).
    """
    from orbax.checkpoint.path import atomicity

    if location.is_local:
        return atomicity.AtomicRenameTemporaryPath
    return atomicity.CommitFileTemporaryPath


# ---------------------------------------------------------------------- object trees
def _object_fs(path: epath.Path | str) -> tuple[Any, str]:
    """The fsspec filesystem epath uses for an object-store path, and the path in it."""
    import fsspec

    text = os.fspath(path)
    if "://" not in text:
        raise StorageConfigError(f"{text} is a local path, not an object-store URL")
    fs, inner = fsspec.core.url_to_fs(text)
    return fs, inner.rstrip("/")


def list_files(path: epath.Path | str) -> dict[str, int]:
    """Relative path -> size of every file (object) below `path`, in one listing.

    Local paths walk the tree. Object stores list every key under the prefix at once
    (no per-file requests); "directories" (SeaweedFS keeps emptied ones, AWS S3 never
    lists them) are not files and are left out. A missing path gives ``{}``.
    """
    text = os.fspath(path)
    out: dict[str, int] = {}
    if "://" not in text:
        for dirpath, _, filenames in os.walk(text):
            for name in filenames:
                full = os.path.join(dirpath, name)
                out[os.path.relpath(full, text)] = os.stat(full).st_size
        return out
    fs, root = _object_fs(text)
    try:
        found = fs.find(root, detail=True, withdirs=False)
    except FileNotFoundError:
        return {}
    for key, info in found.items():
        if info.get("type") != "file" or key.endswith("/") or not key.startswith(root + "/"):
            continue
        out[key[len(root) + 1:]] = int(info.get("size") or 0)
    return out


LIST_TIMEOUT_S = 30.0
"""How long :func:`check_empty` waits for an object store's listing."""


def list_objects(directory: str | Location, timeout_s: float | None = None) -> list[str]:
    """The keys of every object below an object-store `directory`, relative to it,
    sorted, through TensorStore (which writes the array data). With `timeout_s`,
    TimeoutError once that many seconds have passed: an endpoint that never answers, or
    AWS looked up where it cannot be reached, otherwise waits for ever."""
    import time

    import tensorstore as ts

    loc = directory if isinstance(directory, Location) else Location.parse(directory)
    deadline = None if timeout_s is None else time.time() + timeout_s
    store = ts.KvStore.open(loc.kvstore_spec()).result(deadline=deadline)
    keys = store.list().result(deadline=deadline)
    # SeaweedFS lists emptied "directories" as keys ending in '/'; they hold no data.
    return sorted(k.decode() for k in keys if not k.endswith(b"/"))


def remove_objects(directory: str | Location) -> None:
    """Delete every object below the object-store `directory`, through TensorStore (the
    object-store form of ``shutil.rmtree``; for what a command wrote there itself, after
    :func:`check_empty` said the prefix was empty)."""
    import tensorstore as ts

    loc = directory if isinstance(directory, Location) else Location.parse(directory)
    store = ts.KvStore.open(loc.kvstore_spec()).result()
    store.delete_range(ts.KvStore.KeyRange()).result()


def check_empty(directory: str | Location, label: str,
                timeout_s: float = LIST_TIMEOUT_S) -> None:
    """Raise ValueError, one line led by `label` (the flag the user gave, e.g. ``--dir
    s3://b/p``), if any object exists below the object-store `directory`, if the store
    does not answer a listing within `timeout_s`, or if the listing fails (endpoint,
    credentials, network). Nothing is written. Commands that write below a prefix they
    then remove (bench, drill, goodput) call it first, so they never touch objects they
    did not write."""
    try:
        found = list_objects(directory, timeout_s=timeout_s)
    except TimeoutError as e:
        raise ValueError(f"{label}: no answer to a listing in {timeout_s:g} s; check the "
                         "AWS_* endpoint and that it is reachable, or use --s3-server "
                         "local") from e
    except Exception as e:  # noqa: BLE001 - any failure to list is the user's to fix
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{label}: cannot list it ({first}); check the AWS_* endpoint "
                         "and credentials, or use --s3-server local") from e
    if found:
        raise ValueError(f"{label} is not empty ({len(found)} object(s), e.g. {found[0]}); "
                         "give a new or empty prefix (distckpt never touches objects it "
                         "did not write)")


def copy_files(src: epath.Path | str, dst: epath.Path | str, names: list[str]) -> None:
    """Copy the files `names` (relative paths) from below `src` to below `dst`.

    Object stores copy on the server (no data passes through this process); local
    paths copy through the filesystem.
    """
    if not names:
        return
    if "://" not in os.fspath(src):
        for rel in names:
            target = epath.Path(dst) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(os.fspath(src), rel), os.fspath(target))
        return
    fs, root = _object_fs(src)
    _, dest = _object_fs(dst)
    fs.copy([f"{root}/{rel}" for rel in names], [f"{dest}/{rel}" for rel in names])


def remove_files(path: epath.Path | str, names: list[str]) -> None:
    """Delete the files `names` (relative paths) below an object-store `path`, in bulk
    requests (missing ones are ignored)."""
    if not names:
        return
    fs, root = _object_fs(path)
    try:
        fs.rm([f"{root}/{rel}" for rel in names])
    except FileNotFoundError:
        pass
