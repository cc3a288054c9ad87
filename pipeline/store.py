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
        if no_such_bucket(exc):
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


def no_such_bucket(exc: BaseException) -> bool:
    """Whether a FileNotFoundError is S3's NoSuchBucket: its error code in the exception's
    chain (s3fs raises FileNotFoundError from botocore's ClientError), or S3's own message.
    Never the word "bucket" in a path: a missing object in a bucket named `team-bucket` is a
    missing object."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        if "the specified bucket does not exist" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
            if missing is None or no_such_bucket(exc):
                raise
            raise DataError(missing) from None


def open_read(url: str):
    """A seekable binary file object (object stores: ranged reads, read ahead)."""
    fs, path = filesystem(url)
    with errors(url, "read"):
        fs.invalidate_cache(path)  # the object as it is now, not as a listing saw it earlier
        return fs.open(path, "rb")


def list_sizes(url: str) -> dict[str, int]:
    """{name: bytes} of the objects under a URL prefix (recursively, names relative to it);
    raises the one-line error when the bucket is missing or the credentials are wrong."""
    fs, path = filesystem(url)
    with errors(url, "list"):
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True)
        return {posixpath.relpath(p, path): int(info.get("size") or 0) for p, info in found.items()}


def list_names(url: str) -> list[str]:
    """Names of the objects under a URL prefix (recursively, relative to it)."""
    return sorted(list_sizes(url))


def put_once(local_path: Path, url: str) -> bool:
    """Upload a file where no object is (S3's conditional PUT, `If-None-Match: *`: no key ever
    gets a second version). An object already there must hold the same bytes (a cut-short
    upload of the same content, or another host writing it at the same moment): then nothing
    is written and False is returned; other bytes stop with a DataError naming the object.
    Returns True when this call created the object."""
    fs, path = filesystem(url)
    with errors(url, "write"):
        try:
            protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
            if "s3" in protocols:
                fs.put_file(str(local_path), path, mode="create")
            else:  # no conditional write in the protocol: look first (not atomic)
                if fs.exists(path):
                    raise FileExistsError(path)
                fs.put_file(str(local_path), path)
            return True
        except FileExistsError:
            pass
        fs.invalidate_cache(path)
        if _same_bytes(fs, path, Path(local_path)):
            return False
    raise DataError(
        f"{display(url)}: exists with other bytes, and nothing in the store is rewritten "
        "(an upload of other data was cut short here?): remove it by hand, or use another prefix"
    )


def remove(urls: list[str]) -> None:
    """Delete objects (a run's superseded checkpoint copies)."""
    if not urls:
        return
    fs, _ = filesystem(urls[0])
    with errors(urls[0], "delete"):
        fs.rm([filesystem(u)[1] for u in urls])


def _same_bytes(fs, path: str, local_path: Path) -> bool:
    import hashlib

    if fs.size(path) != local_path.stat().st_size:
        return False
    theirs, ours = hashlib.sha256(), hashlib.sha256()
    with fs.open(path, "rb", block_size=8 * 2**20) as f:
        while chunk := f.read(8 * 2**20):
            theirs.update(chunk)
    with open(local_path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            ours.update(chunk)
    return theirs.digest() == ours.digest()
