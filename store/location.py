"""Where a store lives: a local folder, or a prefix on S3-compatible object storage (`s3://bucket/prefix/cache.zarr`).

One place turns the store string users give into what the code needs: a tensorstore kvstore spec for an
array (the hot path), a zarr-python store (creation, inspection) and the few object operations the build,
the lock and the checks use (exists, read and write small files, list, delete, size). Local folders go
through fsspec's local filesystem, S3 through s3fs, so both share one code path.

S3 settings come from the usual environment variables: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (a
non-AWS server such as MinIO, Ceph or moto), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_REGION or AWS_DEFAULT_REGION (default us-east-1).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec

from ..errors import CacheLayoutError, RadioDistillError

SCHEME = "s3://"
ENVIRONMENT = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
               "AWS_REGION", "AWS_DEFAULT_REGION")  # the settings read here


def location(store: str | Path | Location) -> Location:
    """The location of `store`: an `s3://bucket/prefix` URL, or a local path (made absolute)."""
    if isinstance(store, Location):
        return store
    text = str(store)
    if text.startswith(SCHEME):
        bucket, _, prefix = text[len(SCHEME):].strip("/").partition("/")
        if len(bucket) < 3 or not prefix:
            raise CacheLayoutError(f"store '{text}': expected s3://BUCKET/PREFIX (a bucket name has 3 or more "
                                   "characters), e.g. s3://my-bucket/caches/cache.zarr")
        return Location(f"{SCHEME}{bucket}/{prefix}")
    return Location(str(Path(text).expanduser().resolve()))


def is_remote(store: str | Path | Location) -> bool:
    return str(store).startswith(SCHEME)


def check_folder(path: str | Path, option: str) -> None:
    """One line, before anything is created, when `path` is a file or lies under one (mkdir's traceback)."""
    path = Path(path).expanduser().absolute()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" lies under '{p}', which"
                raise RadioDistillError(f"{option} '{path}'{where} is a file, not a folder; give another {option}")
            return


def s3_environment() -> dict[str, str]:
    """This process's S3 settings, for worker processes that do not inherit its environment (Ray actors)."""
    return {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@dataclass(frozen=True)
class Location:
    """A store's place: `url` is an absolute local path or `s3://bucket/prefix` (no trailing slash).
    Names below it are '/'-separated keys, e.g. 'teachers/clip/done'."""

    url: str

    def __str__(self) -> str:
        return self.url

    @property
    def remote(self) -> bool:
        return self.url.startswith(SCHEME)

    @property
    def path(self) -> Path:
        """The local folder (local stores only: the lock and the creation's rename use the OS)."""
        assert not self.remote, self.url
        return Path(self.url)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem; fsspec caches one instance per settings, so this is cheap to call."""
        if not self.remote:
            return fsspec.filesystem("file")
        try:
            return fsspec.filesystem("s3", **self._s3_options())
        except ImportError:
            raise CacheLayoutError(f"store '{self.url}': s3:// stores need s3fs; pip install 'radio-distill[s3]'") from None

    def _s3_options(self) -> dict:
        # credentials named, not left to botocore: fsspec caches a filesystem per arguments, so changed
        # variables give a new one; no listings cache: other processes (Ray workers, a build) change the store
        env = os.environ.get
        return {"endpoint_url": _endpoint(), "client_kwargs": {"region_name": _region()}, "use_listings_cache": False,
                "key": env("AWS_ACCESS_KEY_ID"), "secret": env("AWS_SECRET_ACCESS_KEY"), "token": env("AWS_SESSION_TOKEN"),
                "config_kwargs": {"connect_timeout": 10, "retries": {"max_attempts": 3}}}

    def key(self, name: str = "") -> str:
        """The filesystem path of `name` below the store (no scheme)."""
        base = self.url[len(SCHEME):] if self.remote else self.url
        return f"{base}/{name}" if name else base

    def kvstore(self, name: str) -> dict:
        """tensorstore kvstore spec of the array (or group) `name`."""
        if not self.remote:
            return {"driver": "file", "path": str(Path(self.url) / name)}
        bucket, _, prefix = self.key(name).partition("/")
        spec = {"driver": "s3", "bucket": bucket, "path": f"{prefix}/", "aws_region": _region()}
        if _endpoint():
            spec["endpoint"] = _endpoint()
        if os.environ.get("AWS_ACCESS_KEY_ID"):  # the default chain also tries ~/.aws files, logging each miss
            spec["aws_credentials"] = {"type": "environment"}
        return spec

    def zarr_store(self, *, read_only: bool):
        """What `zarr.open_group` takes for this store."""
        if not self.remote:
            return self.url
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self._s3_options(), read_only=read_only)

    def check(self) -> None:
        """One small request, so that a missing bucket, refused credentials or an unreachable endpoint is
        one line before anything is read or created (local folders: nothing to check).

        Raises:
            CacheLayoutError: naming the URL and the cause.
        """
        if not self.remote:
            return
        bucket = self.key().partition("/")[0]
        try:
            self.fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise CacheLayoutError(f"store '{self.url}': bucket '{bucket}' does not exist at "
                                   f"{_endpoint() or 'AWS S3'}; create it or fix the URL") from None
        except PermissionError as e:
            raise CacheLayoutError(f"store '{self.url}': access denied ({_first_line(e) or 'HTTP 403'}); check "
                                   "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)") from None
        except Exception as e:  # botocore's connection and endpoint errors share no base with OSError
            if type(e).__name__ == "NoCredentialsError":
                raise CacheLayoutError(f"store '{self.url}': no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                                       "AWS_SECRET_ACCESS_KEY") from None
            raise CacheLayoutError(f"store '{self.url}': cannot reach {_endpoint() or 'AWS S3'} "
                                   f"({_first_line(e)}); check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL") from None

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.key(name))

    def read_text(self, name: str) -> str:
        """Raises FileNotFoundError when absent."""
        return self.fs.cat_file(self.key(name)).decode()

    def write_text(self, name: str, text: str, **conditions) -> str | None:
        """Write a small file whole; returns its S3 ETag. `conditions`: S3 conditional-write arguments
        (IfNoneMatch='*', IfMatch=ETag; a failed one raises FileExistsError or OSError)."""
        out = self.fs.pipe_file(self.key(name), text.encode(), **conditions)
        return out.get("ETag") if isinstance(out, dict) else None

    def etag(self, name: str) -> str:
        return self.fs.info(self.key(name))["ETag"]

    def names(self) -> set[str]:
        """The names directly below the store (files and folders)."""
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.key(), detail=False)}
        except FileNotFoundError:
            return set()

    def files(self, name: str) -> set[str]:
        """Keys of every file below `name`, relative to it ('c/0/0/0')."""
        base = self.key(name)
        return {p[len(base) + 1:] for p in self.fs.find(base)}

    def sizes(self, name: str) -> dict[str, int]:
        """{key relative to `name`: bytes} of every file below `name` (the same listing as `files`)."""
        base = self.key(name)
        return {p[len(base) + 1:]: f["size"] or 0 for p, f in self.fs.find(base, detail=True).items()}

    def clear_partial(self, name: str) -> int:
        """Delete the temporary files of Zarr's interrupted writes of the chunk file `name` (`<name>.<uuid>.partial`,
        left where a kill stopped a write; nothing reads them). Local folders only: an S3 write leaves none.
        Lists the file's folder. Returns how many were deleted."""
        if self.remote:
            return 0
        path = Path(self.key(name))
        stem = path.with_suffix("").name  # Zarr names the file as Path.with_suffix does
        gone = 0
        for p in path.parent.glob(f"{stem}.*.partial"):
            if is_partial(p.name):
                p.unlink(missing_ok=True)
                gone += 1
        return gone

    def file_size(self, name: str) -> int:
        """Bytes of the file `name`, asked anew (a listing cached earlier may predate its write)."""
        if not self.remote:
            return os.stat(self.key(name)).st_size
        return self.fs.info(self.key(name), refresh=True)["size"]

    def size(self, name: str = "") -> int:
        """Bytes of every file below `name` (but a temporary file of an interrupted write: `is_partial`)."""
        return sum(f["size"] or 0 for p, f in self.fs.find(self.key(name), detail=True).items()
                   if not is_partial(p.rsplit("/", 1)[-1]))

    def delete(self, name: str) -> None:
        """Delete the file or folder `name`, if there."""
        try:
            self.fs.rm(self.key(name), recursive=True)
        except FileNotFoundError:
            pass


def is_partial(filename: str) -> bool:
    """Whether a file name is the temporary file of a Zarr chunk write (`<key>.<uuid hex>.partial`, renamed to the
    key once written): left only where a kill stopped the write, and never read."""
    return _PARTIAL.search(filename) is not None


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:200]
