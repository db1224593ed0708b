"""One small API over local paths and ``s3://bucket/prefix`` URIs.

Every stage reads and writes artifacts through these functions, so a workspace can live on a laptop
disk or in S3 without the stage knowing. Writes are atomic: local files go through a temp file and
``os.replace``; S3 objects are single PUTs, which S3 makes visible only when complete. Ray gets a
``pyarrow.fs`` filesystem plus path from :func:`Storage.arrow_fs` (pyarrow does not read
``AWS_ENDPOINT_URL``, so the endpoint is passed as ``endpoint_override``).

Credentials come from the standard AWS chain (env, profile, instance profile) and are never logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["Storage", "StorageError", "NotFound", "join", "is_s3", "split_s3", "s3_segments"]


# Model downloads (download_dir): files fetched at once, and per file the ranged-GET size and the
# parts fetched at once. boto3's defaults (8 MiB, 10 threads) with a few files in flight.
DOWNLOAD_FILES = 4
DOWNLOAD_PARTS = 8
DOWNLOAD_CHUNK = 8 * 1024 * 1024

_BUCKET_REGIONS: dict[tuple[str | None, str], str] = {}  # (endpoint, bucket) -> region, per process


class StorageError(RuntimeError):
    """An I/O failure on a workspace URI; the message names the URI."""


class NotFound(StorageError, FileNotFoundError):
    """The URI does not exist."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``: raydb's only S3 URI parser.

    The URI is not parsed as a URL: everything after the bucket's ``/`` is the key, byte for byte,
    ``?`` and ``#`` included (S3 keys may hold both). So the object a caller checks — a photo URI
    against its tenant's prefixes, say — is the object that is read; a URL parser would have cut
    ``t1/a?b.png`` to ``t1/a``. StorageError for anything that is not ``s3://<bucket>[/<key>]``.
    """
    bucket, _, key = str(uri).removeprefix("s3://").partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"not an s3:// URI: {uri!r}")
    return bucket, key


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")


def s3_segments(uri: str) -> tuple[str, list[str]]:
    """``s3://bucket/a/b/`` -> ``("bucket", ["a", "b"])`` for a *plain* S3 URI, else ValueError
    saying why: a valid bucket name, a key of at most 1024 bytes without backslashes or control
    characters, and no empty, ``.`` or ``..`` segment. S3 keys are literal (``t1/../t2/a.png`` is a
    key of its own), but a proxy or an S3-compatible server on the way may normalise a path, so a
    check made on segments holds only for URIs that no normalising can change. Parsed by
    :func:`split_s3`, so a checked URI is read as it was checked."""
    try:
        bucket, key = split_s3(uri)
    except StorageError:
        raise ValueError("not an s3:// URI") from None
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"bad bucket name {bucket!r}")
    if len(key.encode("utf-8")) > 1024 or _KEY_BAD_CHARS.search(key):
        raise ValueError("the key is over 1024 bytes or has a backslash or control character")
    segments = key.removesuffix("/").split("/") if key else []
    if any(s in ("", ".", "..") for s in segments):
        raise ValueError("empty, '.' and '..' path segments are not allowed")
    return bucket, segments


def join(base: str, *parts: str) -> str:
    """Join URI segments with '/', for local paths and s3:// alike."""
    out = str(base).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


class Storage:
    """Read/write bytes and JSON on local paths or S3.

    ``endpoint_url`` overrides the S3 endpoint (MinIO, moto, …); by default the standard
    ``AWS_ENDPOINT_URL`` environment variable is used, as boto3 does.
    """

    def __init__(self, endpoint_url: str | None = None) -> None:
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._lock = threading.Lock()
        self._s3 = None
        self._arrow_s3: dict[str, Any] = {}  # region -> pyarrow S3FileSystem

    # -- clients ---------------------------------------------------------------------------
    def _client(self):
        with self._lock:
            if self._s3 is None:
                import boto3
                from botocore.config import Config

                # room for every thread of a parallel download (files x parts) without waiting
                pool = Config(max_pool_connections=DOWNLOAD_FILES * DOWNLOAD_PARTS)
                self._s3 = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=pool)
            return self._s3

    def bucket_region(self, bucket: str) -> str | None:
        """The region ``bucket`` lives in, as S3 itself says (None when S3 cannot be asked).

        S3 names it in the ``x-amz-bucket-region`` header of a HEAD on the bucket, also when it
        answers 301 (asked in the wrong region) or 403 (no list permission); GetBucketLocation is
        the fallback. Asked once per endpoint and bucket in a process.
        """
        cache_key = (self.endpoint_url, bucket)
        if cache_key in _BUCKET_REGIONS:
            return _BUCKET_REGIONS[cache_key]
        client = self._client()
        try:
            headers = client.head_bucket(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]
        except Exception as exc:  # 301/403 still carry the header; no answer at all: None
            answer = getattr(exc, "response", None) or {}
            headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region")
        if not region:
            try:
                region = client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
            except Exception:
                return None
        _BUCKET_REGIONS[cache_key] = region
        return region

    def arrow_fs(self, uri: str):
        """``(pyarrow.fs.FileSystem, path)`` for handing ``uri`` to pyarrow or Ray.

        pyarrow signs every request for one region and does not follow S3's redirect to another,
        so the filesystem is made for the bucket's own region (:meth:`bucket_region`); only when S3
        cannot tell, ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / us-east-1 are used, in that order.
        """
        import pyarrow.fs as pafs

        if not is_s3(uri):
            return pafs.LocalFileSystem(), str(Path(uri).absolute())
        bucket, key = split_s3(uri)
        region = (self.bucket_region(bucket) or os.environ.get("AWS_REGION")
                  or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        with self._lock:
            if region not in self._arrow_s3:
                kwargs: dict[str, Any] = {"region": region}
                if self.endpoint_url:
                    parsed = urlparse(self.endpoint_url)
                    kwargs["endpoint_override"] = parsed.netloc or parsed.path
                    kwargs["scheme"] = parsed.scheme or "https"
                self._arrow_s3[region] = pafs.S3FileSystem(**kwargs)
        return self._arrow_s3[region], f"{bucket}/{key}".rstrip("/")

    # -- bytes -----------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                return self._client().get_object(Bucket=bucket, Key=key)["Body"].read()
            except Exception as exc:  # botocore raises NoSuchKey / ClientError(404)
                if _is_not_found(exc):
                    raise NotFound(f"no such object: {uri}") from None
                raise StorageError(f"cannot read {uri}: {_short(exc)}") from None
        return self._read_local(uri)

    @staticmethod
    def _read_local(uri: str, limit: int = -1) -> bytes:
        """A local file's bytes (at most ``limit``; -1: all), with the errors both readers raise."""
        try:
            with open(uri, "rb") as fh:
                return fh.read(limit)
        except FileNotFoundError:
            raise NotFound(f"no such file: {uri}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {exc}") from None

    def read_bounded(self, uri: str, limit: int) -> bytes:
        """At most the first ``limit`` bytes (``limit`` >= 1; a ranged GET on S3), so an object that
        grew since it was listed never costs more than the caller was ready to take."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                obj = self._client().get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit - 1}")
                return obj["Body"].read(limit)
            except Exception as exc:
                if _error_code(exc) == "InvalidRange":  # an empty object has no byte 0
                    return b""
                if _is_not_found(exc):
                    raise NotFound(f"no such object: {uri}") from None
                raise StorageError(f"cannot read {uri}: {_short(exc)}") from None
        return self._read_local(uri, limit)

    def read_tagged(self, uri: str) -> tuple[bytes, str]:
        """``(bytes, tag)``: the tag identifies this content for :meth:`write_bytes`'s ``if_match``
        (the object's ETag on S3, the sha256 of the file locally). NotFound when missing."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            try:
                obj = self._client().get_object(Bucket=bucket, Key=key)
                return obj["Body"].read(), obj["ETag"].strip('"')
            except Exception as exc:
                if _is_not_found(exc):
                    raise NotFound(f"no such object: {uri}") from None
                raise StorageError(f"cannot read {uri}: {_short(exc)}") from None
        data = self.read_bytes(uri)
        return data, hashlib.sha256(data).hexdigest()

    def write_bytes(
        self, uri: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> bool:
        """Write atomically; readers see the old object or the whole new one, never a part.

        With ``if_absent`` the write happens only when nothing exists at ``uri`` yet; with
        ``if_match`` only when the current content still has that tag (from :meth:`read_tagged`):
        a compare-and-swap, via S3's ``If-Match`` or, locally, an exclusive ``flock`` on a hidden
        lock file next to the target. Returns whether this call wrote.
        """
        if if_absent and if_match is not None:
            raise ValueError("write_bytes: if_absent and if_match exclude each other")
        if is_s3(uri):
            bucket, key = split_s3(uri)
            kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data}
            if if_absent:
                kwargs["IfNoneMatch"] = "*"
            if if_match is not None:
                kwargs["IfMatch"] = f'"{if_match}"'
            try:
                self._client().put_object(**kwargs)
                return True
            except Exception as exc:
                conditional = if_absent or if_match is not None
                if conditional and (_is_precondition_failed(exc) or _is_not_found(exc)):
                    return False
                raise StorageError(f"cannot write {uri}: {_short(exc)}") from None
        if if_match is not None:
            return self._local_swap(Path(uri), data, if_match)
        return self._local_write(Path(uri), data, if_absent)

    def _local_swap(self, path: Path, data: bytes, if_match: str) -> bool:
        """Local compare-and-swap: under an exclusive lock, replace only if the tag still matches.

        ``flock`` is released by the kernel when the process dies, so a crash never leaves the
        target locked (unlike an ``O_EXCL`` lock file).
        """
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                current = hashlib.sha256(path.read_bytes()).hexdigest()
            except FileNotFoundError:
                return False
            if current != if_match:
                return False
            return self._local_write(path, data, False)

    def _local_write(self, path: Path, data: bytes, if_absent: bool) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep the usual permissions
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    return False
                finally:
                    os.unlink(tmp)
                return True
            os.replace(tmp, path)
            return True
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def read_json(self, uri: str) -> Any:
        raw = self.read_bytes(uri)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri} is not valid JSON: {exc}") from None

    def write_json(self, uri: str, obj: Any, *, if_absent: bool = False, if_match: str | None = None) -> bool:
        return self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(),
                                if_absent=if_absent, if_match=if_match)

    def read_json_or(self, uri: str, default: Any = None) -> Any:
        try:
            return self.read_json(uri)
        except NotFound:
            return default

    # -- listing ---------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            if not key or key.endswith("/"):  # a bucket or folder: no object to HEAD
                return bool(self.list(uri, recursive=False, limit=1))
            try:
                self._client().head_object(Bucket=bucket, Key=key)
                return True
            except Exception as exc:
                if _is_not_found(exc):
                    return bool(self.list(uri, recursive=False, limit=1))
                raise StorageError(f"cannot stat {uri}: {_short(exc)}") from None
        return Path(uri).exists()

    def list(self, uri: str, *, recursive: bool = False, limit: int | None = None) -> list[str]:
        """Names (relative to ``uri``) of the entries under a prefix/folder, sorted.

        Non-recursive listings include sub-folders with a trailing '/'. Missing prefix -> [].
        """
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""
            names: set[str] = set()
            kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if not recursive:
                kwargs["Delimiter"] = "/"
            try:
                for page in self._client().get_paginator("list_objects_v2").paginate(**kwargs):
                    names.update(o["Key"][len(prefix):] for o in page.get("Contents", []))
                    names.update(p["Prefix"][len(prefix):] for p in page.get("CommonPrefixes", []))
                    names.discard("")  # the folder's own marker object: not an entry, not toward limit
                    if limit and len(names) >= limit:
                        break
            except Exception as exc:
                raise StorageError(f"cannot list {uri}: {_short(exc)}") from None
            return sorted(names)[:limit]
        root = Path(uri)
        if not root.is_dir():
            return []
        if recursive:
            out = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
        else:
            out = [p.name + ("/" if p.is_dir() else "") for p in root.iterdir()]
        out = sorted(n for n in out if not Path(n).name.startswith(".") or n.endswith("/"))
        return out[:limit]

    def _s3_objects(self, uri: str) -> list[tuple[str, dict[str, Any]]]:
        """``(name relative to uri, list_objects_v2 entry)`` of every object under an s3:// prefix,
        hidden files left out, as in ``list``."""
        bucket, key = split_s3(uri)
        prefix = key.rstrip("/") + "/" if key else ""
        out: list[tuple[str, dict[str, Any]]] = []
        try:
            pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                out += [(o["Key"][len(prefix):], o) for o in page.get("Contents", [])]
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {_short(exc)}") from None
        return sorted(((n, o) for n, o in out if n and not Path(n).name.startswith(".")), key=lambda x: x[0])

    def sizes(self, uri: str) -> list[tuple[str, int]]:
        """``(name, size in bytes)`` of every file under a prefix/folder, sorted by name, from the
        listing alone (nothing is read). Hidden files are left out, as in ``list``."""
        if is_s3(uri):
            return [(n, int(o["Size"])) for n, o in self._s3_objects(uri)]
        root = Path(uri)
        return [(name, (root / name).stat().st_size) for name in self.list(uri, recursive=True)]

    def content_ids(self, uri: str) -> list[tuple[str, str]]:
        """``(name, content id)`` of every file under a prefix/folder, sorted by name.

        The id changes when the bytes change: the object's ETag on S3 (an MD5 of the content, or of
        its parts for multipart uploads — no download needed), the sha256 of the file locally.
        Hidden files are left out, as in ``list``. Missing prefix -> [].
        """
        if is_s3(uri):
            return [(n, o["ETag"].strip('"')) for n, o in self._s3_objects(uri)]
        root = Path(uri)
        return [(name, hashlib.sha256((root / name).read_bytes()).hexdigest())
                for name in self.list(uri, recursive=True)]

    def delete(self, uri: str, *, recursive: bool = False) -> None:
        """Remove a file/object; with ``recursive`` also everything under it. Missing -> no-op."""
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key.rstrip("/") + "/" if key else ""  # join() would turn a bucket root into "/name"
            keys = [key] if key else []  # like local disk, a recursive delete of a file removes it
            if recursive:
                keys += [prefix + n for n in self.list(uri, recursive=True)]
            try:
                for k in keys:
                    self._client().delete_object(Bucket=bucket, Key=k)
            except Exception as exc:
                raise StorageError(f"cannot delete {uri}: {_short(exc)}") from None
            return
        path = Path(uri)
        if path.is_dir() and recursive:
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()

    # -- folders ---------------------------------------------------------------------------
    def download_dir(self, uri: str, local: str | Path) -> Path:
        """Copy every object under ``uri`` into a local folder (for s3:// model weights).

        Every key is checked before anything is written: one that would land outside ``local``
        (``../``, an absolute path, an empty segment trick) raises StorageError naming it, and
        nothing is copied. Files are fetched ``DOWNLOAD_FILES`` at a time, each one streamed to disk
        by boto3's managed transfer (ranged GETs of ``DOWNLOAD_CHUNK`` bytes, ``DOWNLOAD_PARTS`` in
        parallel: a 10 GB UNet never sits in memory) into a hidden temporary file beside its target,
        renamed into place only when complete, so a crash never leaves a truncated weight file.
        """
        from concurrent.futures import ThreadPoolExecutor

        local = Path(local)
        names = self.list(uri, recursive=True)
        if not names:
            raise NotFound(f"nothing found under {uri}")
        for name in names:
            _check_inside(local, name, uri)
        with ThreadPoolExecutor(max_workers=DOWNLOAD_FILES, thread_name_prefix="raydb-download") as pool:
            for _ in pool.map(lambda name: self.download_file(join(uri, name), local / name), names):
                pass  # map re-raises the first failure here
        return local

    def download_file(self, uri: str, dest: str | Path) -> Path:
        """Stream one file/object to ``dest`` through a temporary file in its folder, then rename."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        os.close(fd)
        try:
            if is_s3(uri):
                from boto3.s3.transfer import TransferConfig

                bucket, key = split_s3(uri)
                config = TransferConfig(multipart_threshold=DOWNLOAD_CHUNK,
                                        multipart_chunksize=DOWNLOAD_CHUNK,
                                        max_concurrency=DOWNLOAD_PARTS, use_threads=True)
                try:
                    self._client().download_file(bucket, key, tmp, Config=config)
                except Exception as exc:
                    if _is_not_found(exc):
                        raise NotFound(f"no such object: {uri}") from None
                    raise StorageError(f"cannot read {uri}: {_short(exc)}") from None
            else:
                import shutil

                try:
                    shutil.copyfile(uri, tmp)
                except FileNotFoundError:
                    raise NotFound(f"no such file: {uri}") from None
                except OSError as exc:
                    raise StorageError(f"cannot read {uri}: {exc}") from None
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return dest

    def upload_dir(self, local: str | Path, uri: str) -> None:
        local = Path(local)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                self.write_bytes(join(uri, str(path.relative_to(local))), path.read_bytes())


def _check_inside(local: Path, name: str, uri: str) -> None:
    """Refuse an object name that does not stay inside ``local`` once joined to it."""
    parts = name.replace("\\", "/").split("/")
    root = local.absolute()
    dest = (root / name).absolute()
    if name.startswith("/") or any(p in ("..", "") for p in parts) or not dest.is_relative_to(root):
        raise StorageError(f"refusing to download {join(uri, name)!r}: its key leaves the target folder")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _short(exc: Exception) -> str:
    """Error text without request ids or signatures (never credentials)."""
    return str(exc).splitlines()[0][:300]


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _is_not_found(exc: Exception) -> bool:
    return _error_code(exc) in {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}


def _is_precondition_failed(exc: Exception) -> bool:
    return _error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict"}
