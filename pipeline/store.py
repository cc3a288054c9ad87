"""Where shards live: a local folder, or a folder in an object store (`s3://bucket/prefix`).

A local path stays plain `pathlib` and `open()` (random access, no extra layer). A URL goes
through fsspec (s3fs for `s3://`, the `s3` extra). Credentials and the endpoint come from
where the AWS tools read them, never from params.yaml, so they never reach a result, a log,
a provenance record or dvc.lock:

    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN), or AWS_PROFILE
    AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3, or a profile's endpoint_url): an S3 API
        other than AWS (MinIO, Ceph, a test server); unset for AWS itself

Errors a user can cause (no such bucket, wrong credentials, an endpoint that does not answer)
become one DataError naming the URL (without user info or query) and the fix.
"""

from __future__ import annotations

import os
import posixpath
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.errors import DataError

# what decides which credentials and endpoint an S3 client uses: a filesystem object made
# under other values is not reused (a test or a notebook may change them mid-process)
_AWS_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
    "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
)  # fmt: skip
_filesystems: dict[tuple, object] = {}
_lock = threading.Lock()


def is_url(path: Path | str) -> bool:
    """An object-store URL (`s3://...`, `gs://...`, `memory://...`); `file://` is local."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local(path: Path | str) -> Path:
    """A local path, `file://` prefix removed."""
    text = str(path)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(base: Path | str, *parts: str) -> Path | str:
    """`base/part/...`: a URL stays a string (Path would fold `s3://` into `s3:/`)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def name(path: Path | str) -> str:
    """The last part of a path or URL."""
    return posixpath.basename(str(path).rstrip("/"))


def display(url: Path | str) -> str:
    """The URL for messages and records: no user info, no query (where secrets could hide)."""
    text = str(url)
    if not is_url(text):
        return text
    parts = urlsplit(text)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL. One filesystem per protocol, process
    and AWS environment (forked DataLoader workers make their own)."""
    import fsspec

    protocol = urlsplit(url).scheme
    key = (protocol, os.getpid(), tuple(os.environ.get(k) for k in _AWS_ENV))
    with _lock, errors(url, "open"):
        fs = _filesystems.get(key)
        if fs is None:
            if len(_filesystems) > 16:  # stale environments
                _filesystems.clear()
            fs = _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True)
    return fs, fs._strip_protocol(url)


@contextmanager
def errors(url: Path | str, doing: str = "read") -> Iterator[None]:
    """Object-store failures -> one DataError naming the URL and what to check."""
    where = display(url)
    try:
        yield
    except DataError:
        raise
    except ImportError as exc:
        raise DataError(
            f"{where}: {exc} (for s3:// install the s3 extra: pip install -e '.[s3]')"
        ) from None
    except FileNotFoundError as exc:
        if "bucket" in str(exc).lower():
            bucket = urlsplit(str(url)).hostname
            raise DataError(f"{where}: bucket {bucket!r} does not exist") from None
        raise
    except PermissionError:
        raise DataError(
            f"{where}: access denied ({doing}): check the AWS credentials (AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
        ) from None
    except Exception as exc:
        kind = {c.__name__ for c in type(exc).__mro__}
        if "NoCredentialsError" in kind or "PartialCredentialsError" in kind:
            raise DataError(
                f"{where}: no AWS credentials: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            ) from None
        if "EndpointConnectionError" in kind or "ConnectTimeoutError" in kind:
            endpoint = display(_endpoint(exc))
            raise DataError(
                f"{where}: cannot reach the object store at {endpoint} (check "
                "AWS_ENDPOINT_URL or the profile's endpoint_url, and the network)"
            ) from None
        if "BotoCoreError" in kind or "ClientError" in kind or isinstance(exc, OSError):
            raise DataError(f"{where}: cannot {doing} ({type(exc).__name__})") from None
        raise


def _endpoint(exc: Exception) -> str:
    """scheme://host:port of the URL a botocore connection error names."""
    url = str(getattr(exc, "kwargs", {}).get("endpoint_url", ""))
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the endpoint"


def read_bytes(url: Path | str, missing: str | None = None) -> bytes:
    """A whole file; `missing`: the DataError message when it does not exist."""
    if not is_url(url):
        path = local(url)
        if missing is not None and not path.is_file():
            raise DataError(missing)
        return path.read_bytes()
    fs, path = filesystem(str(url))
    with errors(url, "read"):
        try:
            return fs.cat_file(path)
        except FileNotFoundError as exc:
            if missing is None or "bucket" in str(exc).lower():
                raise
            raise DataError(missing) from None


def open_read(url: str):
    """A seekable binary file object (object stores: ranged reads, read ahead)."""
    fs, path = filesystem(url)
    with errors(url, "read"):
        return fs.open(path, "rb")


def list_names(url: str) -> list[str]:
    """Names of the objects under a URL prefix (recursively, relative to it); raises the
    one-line error when the bucket is missing or the credentials are wrong."""
    fs, path = filesystem(url)
    with errors(url, "list"):
        fs.invalidate_cache(path)
        return sorted(posixpath.relpath(p, path) for p in fs.find(path))


def put_file(local_path: Path, url: str) -> None:
    fs, path = filesystem(url)
    with errors(url, "write"):
        fs.put_file(str(local_path), path)


def remove(urls: list[str]) -> None:
    if not urls:
        return
    fs, _ = filesystem(urls[0])
    with errors(urls[0], "delete"):
        fs.rm([filesystem(u)[1] for u in urls])
