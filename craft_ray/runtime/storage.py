"""Storage: one set of file operations for local paths and object-store URIs.

A *location* is a local path (``runs/demo``, ``/data/c4``) or a URI of an object store
(``s3://bucket/prefix``, ``gs://bucket/prefix``), always passed around as a string. Every
stage reads and writes its run directory through these functions, so the same code runs on a
laptop's disk and on a bucket every node of a cluster reaches.

- Local paths behave exactly as before: writes go through :func:`craft_ray.runtime.atomic_path`
  (a temporary sibling, then a rename).
- On an object store a PUT is atomic (an object appears whole or not at all, multipart uploads
  included), so there is no rename: every output is written once, and a stage's ``_SUCCESS``
  marker is written last (see :mod:`craft_ray.runtime.stagedir`).
- Filesystems come from ``pyarrow.fs``; credentials only from the environment (the standard
  ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` for MinIO-style stores, instance/workload
  identity, Google's application-default credentials). A URI that carries credentials
  (``s3://KEY:SECRET@bucket``, ``?secret_key=``) is refused, so none can reach a config dump,
  a log or a Ray runtime_env.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from craft_ray.config import ConfigError
from craft_ray.runtime.files import atomic_path

_MANGLED_URI = re.compile(r"^(s3|gs|gcs):/(?!/)")
SECRET_QUERY_KEYS = ("access_key", "secret_key", "session_token", "secret", "token",
                     "password", "credentials")


class StorageError(ConfigError):
    """A storage location is unusable (no such bucket, credentials refused, unreachable);
    a user error: its message names the location and what to check."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    s = str(location)
    return "://" in s and not s.startswith("file://")


def check_no_credentials(location: str) -> None:
    """Refuse a URI that carries credentials: they belong in the environment only."""
    if not is_uri(location):
        return
    parts = urlsplit(location)
    if parts.scheme not in ("s3", "gs", "gcs"):
        return
    query = parts.query.lower()
    if "@" in parts.netloc or any(f"{k}=" in query for k in SECRET_QUERY_KEYS):
        raise StorageError(
            f"{redact(location)}: a storage URI must not carry credentials; set them in the "
            "environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an IAM role for "
            "s3://, application-default credentials for gs://)")


def refuse_uris(command: str, paths: dict[str, str | None], allowed: str = "") -> None:
    """ValueError naming every object-store URI among ``paths`` (field -> value) of a
    command that works on local or mounted paths only; ``allowed``: what of it may be one."""
    uris = [f"{k}={v}" for k, v in paths.items() if v and is_uri(v)]
    if uris:
        raise ValueError(f"{command} reads and writes local or mounted paths only, not object "
                         f"storage: {', '.join(uris)}. Copy the data to a local folder (e.g. "
                         "`aws s3 sync`, `gcloud storage rsync`)"
                         + (f"; {allowed}" if allowed else "") + ".")


def redact(location: str | Path) -> str:
    """``location`` safe to print: user info and query string of a URI dropped."""
    s = str(location)
    if not is_uri(s):
        return s
    parts = urlsplit(s)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{host}{parts.path}"


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _gcs_endpoint() -> str | None:
    """A GCS emulator (fake-gcs-server, gcp-storage-emulator), named the way Google's client
    libraries take it: ``STORAGE_EMULATOR_HOST=http://host:port``."""
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


def _endpoint(scheme: str) -> str | None:
    return _s3_endpoint() if scheme == "s3" else _gcs_endpoint()


@lru_cache(maxsize=16)
def _object_store(scheme: str, bucket: str, endpoint: str | None) -> Any:
    """The pyarrow filesystem of a bucket (cached: each one opens connections)."""
    import pyarrow.fs as pafs

    if scheme == "s3" and endpoint:
        # A MinIO/moto-style endpoint: path-style requests, scheme taken from the URL.
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return pafs.S3FileSystem(endpoint_override=ep.netloc, scheme=ep.scheme,
                                 region=region or "us-east-1", connect_timeout=5,
                                 request_timeout=30)
    if scheme == "gs" and endpoint:
        # An emulator: plain requests, no credentials (real GCS: application-default ones).
        ep = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=ep.netloc,
                                  scheme=ep.scheme, retry_time_limit=timedelta(seconds=30))
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def clear_cache() -> None:
    """Forget the filesystems made so far (the environment they were made from changed)."""
    _object_store.cache_clear()


def filesystem(location: str | Path) -> tuple[Any, str]:
    """``(pyarrow filesystem, path within it)`` of a location (Ray Data, pyarrow and Ray
    Train take both). A local path is made absolute."""
    import pyarrow.fs as pafs

    s = str(location)
    if not is_uri(s):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(_local(
            s.removeprefix("file://"))))
    check_no_credentials(s)
    parts = urlsplit(s)
    scheme = "gs" if parts.scheme == "gcs" else parts.scheme
    if scheme not in ("s3", "gs"):
        raise StorageError(f"{redact(s)}: unsupported storage scheme {parts.scheme!r}; use a "
                           "local path, s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    try:
        fs = _object_store(scheme, parts.netloc, _endpoint(scheme))
    except OSError as exc:
        raise StorageError(_explain(s, exc)) from None
    return fs, f"{parts.netloc}{parts.path}".rstrip("/")


def ray_storage(location: str | Path) -> tuple[Any, str]:
    """``(storage_filesystem, storage_path)`` for Ray Train / Tune's RunConfig: an object
    store through this module's pyarrow filesystem (so AWS_ENDPOINT_URL applies), a local
    path as Ray takes it (absolute, no filesystem)."""
    if is_uri(location):
        return filesystem(location)
    return None, str(Path(location).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` (``/`` between the parts of a URI, os.path.join locally)."""
    s = str(location)
    if is_uri(s):
        return posixpath.join(s.rstrip("/"), *parts)
    return os.path.join(str(_local(s)), *parts)


def _local(location: str | Path) -> Path:
    """A local location as a Path; refuses a URI that went through ``Path()``."""
    s = str(location)
    if _MANGLED_URI.match(s):
        # Path("s3://b/x") is "s3:/b/x": a local folder named "s3:" would be written silently
        raise StorageError(
            f"{s!r} is an object-store URI turned into a local path (Path() drops one '/'); "
            "this code path does not support object storage yet: use a local run_dir here")
    return Path(s)


def parent(location: str | Path) -> str:
    """The folder holding ``location``."""
    s = str(location).rstrip("/")
    return posixpath.dirname(s) if is_uri(s) else os.path.dirname(s)


def name(location: str | Path) -> str:
    """The last part of ``location``."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def _info(location: str | Path) -> Any:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(_explain(str(location), exc)) from None


def exists(location: str | Path) -> bool:
    """True when a file or a folder (a prefix holding objects) is there."""
    import pyarrow.fs as pafs

    return bool(_info(location).type != pafs.FileType.NotFound)


def is_file(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    return bool(_info(location).type == pafs.FileType.File)


def read_bytes(location: str | Path) -> bytes:
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path, compression=None) as fh:
            return bytes(fh.read())
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(_explain(str(location), exc)) from None


def read_table(location: str | Path, columns: list[str] | None = None) -> Any:
    """A Parquet file as an Arrow table."""
    import pyarrow.parquet as pq

    fs, path = filesystem(location)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_file(location: str | Path) -> Any:
    """A ``pyarrow.parquet.ParquetFile`` of ``location`` (read in ranges from object stores)."""
    import pyarrow.parquet as pq

    if not is_uri(location):
        return pq.ParquetFile(location)
    fs, path = filesystem(location)
    return pq.ParquetFile(fs.open_input_file(path))


def mtime(location: str | Path) -> float:
    """Last modification time of a file (seconds since the epoch)."""
    if not is_uri(location):
        return os.stat(location).st_mtime
    info = _info(location)
    if info.mtime is None:
        return 0.0
    return float(info.mtime.timestamp())


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def read_json(location: str | Path) -> Any:
    return json.loads(read_bytes(location))


def write_bytes(location: str | Path, data: bytes) -> None:
    """Write ``data`` whole: a rename locally, one PUT on an object store."""
    if not is_uri(location):
        _local(location).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(location) as tmp:
            Path(tmp).write_bytes(data)
        return
    fs, path = filesystem(location)
    # compression=None everywhere: bytes as they are (pyarrow would gzip a "*.gz" name again)
    with fs.open_output_stream(path, compression=None) as out:
        out.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def write_json(location: str | Path, obj: Any) -> None:
    """JSON (sorted keys, indented), written whole."""
    write_text(location, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def append_text(location: str | Path, text: str) -> None:
    """Append ``text`` to a file. An object cannot be appended to: it is read and written
    whole again (one PUT), so keep such files small and give them a single writer."""
    if not is_uri(location):
        _local(location).parent.mkdir(parents=True, exist_ok=True)
        with open(location, "a", encoding="utf-8") as fh:
            fh.write(text)
        return
    old = read_text(location) if is_file(location) else ""
    write_text(location, old + text)


@contextmanager
def write_once(location: str | Path) -> Iterator[Path]:
    """Yield a local path to write ``location`` through (a file or a folder), for writers
    that want a path (pyarrow, h5py, HF ``save_pretrained``).

    Locally it is :func:`atomic_path` (renamed into place). For a URI it is a temporary local
    file or folder uploaded when the block ends, each file in one PUT; nothing is uploaded if
    the block raises.
    """
    if not is_uri(location):
        _local(location).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(location) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="craft_ray_put_") as tmpdir:
        tmp = Path(tmpdir) / name(location)
        yield tmp
        upload(tmp, location)


def write_parquet(location: str | Path, table: Any) -> None:
    """An Arrow table as one Parquet file, written whole (see :func:`write_once`)."""
    import pyarrow.parquet as pq

    with write_once(location) as tmp:
        pq.write_table(table, tmp)


def upload(local: str | Path, location: str | Path) -> None:
    """Copy a local file or folder tree to ``location``."""
    local = Path(local)
    if not is_uri(location):
        if local.is_dir():
            shutil.copytree(local, _local(location), dirs_exist_ok=True)
        else:
            write_bytes(location, local.read_bytes())
        return
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        rel = f.relative_to(local).as_posix() if f != local else ""
        dest = join(location, rel) if rel else str(location)
        fs, path = filesystem(dest)
        with f.open("rb") as src, fs.open_output_stream(path, compression=None) as out:
            shutil.copyfileobj(src, out, 8 << 20)


def list_files(location: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Files under the folder ``location`` (sorted locations); empty when it is not there."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    sel = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    try:
        infos = fs.get_file_info(sel)
    except OSError as exc:
        raise StorageError(_explain(str(location), exc)) from None
    base = str(location).rstrip("/")
    out = [join(base, posixpath.relpath(i.path, path)) for i in infos
           if i.type == pafs.FileType.File and i.path.endswith(suffix)]
    return sorted(out)


def remove(location: str | Path) -> None:
    """Delete a file or a folder tree; nothing there is fine."""
    if not is_uri(location):
        p = _local(location)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        fs.delete_file(path)
    elif list_files(location, recursive=True):
        fs.delete_dir_contents(path, missing_dir_ok=True)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)


def makedirs(location: str | Path) -> None:
    """Create a local folder; a no-op on object stores (prefixes need no creation)."""
    if not is_uri(location):
        _local(location).mkdir(parents=True, exist_ok=True)


@contextmanager
def open_input(location: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object to read ``location`` from (streamed from object stores)."""
    if not is_uri(location):
        with open(location, "rb") as fh:
            yield fh
        return
    fs, path = filesystem(location)
    with fs.open_input_file(path) as fh:
        yield fh


def cache_root() -> Path:
    """Where downloaded folders (adapters, datasets) are cached on this machine."""
    return Path(os.environ.get("CRAFT_RAY_STORAGE_CACHE",
                               Path.home() / ".cache" / "craft_ray" / "storage"))


def _listing(location: str) -> list[tuple[str, int, float]]:
    """``(path relative to location, size, mtime)`` of a file or of every file under a
    prefix (empty when nothing is there)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(
        pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sorted((posixpath.relpath(i.path, path) if i.path != path else "", i.size or 0,
                   i.mtime.timestamp() if i.mtime else 0.0)
                  for i in infos if i.type == pafs.FileType.File)


def local_copy(location: str | Path) -> Path:
    """A local path holding ``location`` (a file or folder): itself when local, else a
    download into this machine's cache (``$CRAFT_RAY_STORAGE_CACHE``) keyed by the URI and the
    objects' sizes and times, for readers that need a local folder (``from_pretrained``,
    ``load_from_disk``). A changed object is downloaded again; several processes of one node
    share a download (each writes a temporary folder, the first rename wins).
    """
    if not is_uri(location):
        return Path(location)
    listing = _listing(str(location))
    if not listing:
        raise FileNotFoundError(f"{redact(location)} does not exist (no such object or prefix)")
    key = hashlib.sha256(json.dumps([redact(location), listing]).encode()).hexdigest()[:20]
    dest = cache_root() / key / name(location)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest.parent))
    try:
        for rel, _size, _mtime in listing:
            target = tmp / "x" / rel if rel else tmp / "x"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(join(location, rel) if rel else location))
        try:
            os.replace(tmp / "x", dest)
        except OSError:  # another process of this node finished first
            if not dest.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _explain(location: str, exc: BaseException) -> str:
    """A storage error as one message: the URI, what went wrong, what to check."""
    msg = str(exc)
    low = msg.lower()
    if any(k in low for k in ("network_connection", "curlcode", "couldn't connect",
                              "could not resolve", "timed out", "timeout")):
        hint = ("the store cannot be reached: check AWS_ENDPOINT_URL (MinIO-style stores) and "
                "the network")
    elif any(k in low for k in ("access_denied", "accessdenied", "invalidaccesskeyid",
                                "signaturedoesnotmatch", "expiredtoken", "forbidden",
                                "credentials", "403")):
        hint = ("the credentials were refused: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                "/ AWS_SESSION_TOKEN or the node's IAM role (gs://: application-default "
                "credentials), and the bucket's policy")
    elif "nosuchbucket" in low or "bucket does not exist" in low or (
            "bucket" in low and "not found" in low):  # region lookup of a missing bucket
        hint = "the bucket does not exist: create it, or fix the bucket name"
    else:
        hint = "check the URI, the credentials in the environment and AWS_ENDPOINT_URL"
    detail = msg.splitlines()[0][:300] if msg else type(exc).__name__
    return f"storage {redact(location)}: {hint} ({detail})"


def check_location(location: str | Path, what: str = "run_dir") -> None:
    """Fail with one :class:`StorageError` before any work when an object-store location
    cannot be used: its bucket is missing, the credentials are refused, the store is
    unreachable. Local paths are not checked (they are created as needed)."""
    import pyarrow.fs as pafs

    if not is_uri(location):
        return
    s = str(location)
    fs, path = filesystem(s)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
        if info.type == pafs.FileType.NotFound:
            raise StorageError(
                f"{what} {redact(s)}: bucket {bucket!r} does not exist (or these credentials "
                "cannot see it): create it, fix the name, or check the credentials in the "
                "environment (AWS_* / AWS_ENDPOINT_URL, or the node's role)")
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{what}: {_explain(s, exc)}") from None
