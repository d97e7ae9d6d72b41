"""URL helpers: one place that turns a path or fsspec URL into a filesystem or a Zarr store.

* Local paths and ``file://`` URLs use the local filesystem and ``zarr.storage.LocalStore``.
* ``s3://`` uses s3fs through ``zarr.storage.FsspecStore.from_url``; credentials come from
  the usual AWS_* environment. The endpoint is ``storage_options["endpoint_url"]`` if given,
  else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (so a loopback or on-prem S3 works
  with no code changes).
* ``memory://`` (fsspec's process-wide memory filesystem) and any other fsspec protocol
  go through ``FsspecStore``.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec

LOCAL_PROTOCOLS = ("", "file", "local")


def protocol(url: str) -> str:
    """The URL scheme (``""`` for a plain local path)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return protocol(url) in LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """The local filesystem path of a local URL."""
    return os.path.abspath(url.split("://", 1)[1] if "://" in url else os.path.expanduser(url))


def join_url(url: str, *parts: str) -> str:
    """Join path parts onto a path or URL with ``/`` (no duplicate separators)."""
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if not clean:
        return url
    if "://" not in url:
        return os.path.join(url, *clean)
    return url.rstrip("/") + "/" + "/".join(clean)


def resolve_storage_options(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: the given ones plus an S3 endpoint from the environment."""
    opts = dict(storage_options or {})
    if protocol(url) in ("s3", "s3a"):
        endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    return opts


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a path or URL."""
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    return fs, path


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False):
    """A Zarr v3 store for a path or URL (``LocalStore`` locally, ``FsspecStore`` otherwise)."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=resolve_storage_options(url, storage_options),
                                read_only=read_only)
