"""The one I/O module: every read, write and listing at a path or URL goes through here.

fsspec is imported in this module only. Every function takes ``storage_options`` and passes them
to every open, so an S3-compatible endpoint or credentials given in a config reach every read and
write (datasets, run directories, SAE weights, reports, exports).

* Local paths and ``file://`` URLs use the local filesystem and ``zarr.storage.LocalStore``.
* ``s3://`` uses s3fs through ``zarr.storage.FsspecStore.from_url``; credentials come from the
  usual AWS_* environment or from ``storage_options``. The endpoint is
  ``storage_options["endpoint_url"]`` if given, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``
  (so a loopback or on-prem S3 works with no code changes).
* ``memory://`` (fsspec's process-wide memory filesystem) and any other fsspec protocol go
  through ``FsspecStore``.

Writes are atomic by default: a temporary key next to the target, then a move (a rename on local
disks, a server-side copy on object stores), so a crash leaves the old file or the new one, never
half of one. This module lives in ``store`` because ``store`` is the room every other room already
depends on and which depends on none of them (ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import IO, Any

import fsspec

from store.errors import UserError

LOCAL_PROTOCOLS = ("", "file", "local")
StorageOptions = dict[str, Any] | None


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


def resolve_storage_options(url: str, storage_options: StorageOptions = None) -> dict[str, Any]:
    """fsspec options for ``url``: the given ones plus an S3 endpoint from the environment."""
    opts = dict(storage_options or {})
    if protocol(url) in ("s3", "s3a"):
        endpoint = opts.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL_S3") \
            or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
    return opts


def filesystem(url: str, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for a path or URL."""
    if is_local(url):
        return fsspec.filesystem("file"), local_path(url)
    fs, path = fsspec.core.url_to_fs(url, **resolve_storage_options(url, storage_options))
    return fs, path


def zarr_store(url: str, storage_options: StorageOptions = None, read_only: bool = False):
    """A Zarr v3 store for a path or URL (``LocalStore`` locally, ``FsspecStore`` otherwise)."""
    from zarr.storage import FsspecStore, LocalStore

    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=resolve_storage_options(url, storage_options),
                                read_only=read_only)


# ----------------------------------------------------------------------------- files at a URL


def open_url(url: str, mode: str = "rb", storage_options: StorageOptions = None, **kwargs: Any) -> IO:
    """An open file at ``url`` (a context manager), e.g. ``open_url(u, "r", opts, encoding="utf-8")``."""
    fs, path = filesystem(url, storage_options)
    if "w" in mode:
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
    return fs.open(path, mode, **kwargs)


def exists(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether a file or directory exists at ``url``."""
    fs, path = filesystem(url, storage_options)
    return bool(fs.exists(path))


def is_dir(url: str, storage_options: StorageOptions = None) -> bool:
    """Whether ``url`` is a directory (a prefix holding keys on object stores)."""
    fs, path = filesystem(url, storage_options)
    return bool(fs.isdir(path))


def makedirs(url: str, storage_options: StorageOptions = None) -> None:
    """Create the directory ``url`` and its parents (a no-op on object stores without directories)."""
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path, exist_ok=True)


def read_bytes(url: str, storage_options: StorageOptions = None) -> bytes | None:
    """Contents of ``url``, or None when no such file exists."""
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def write_bytes(url: str, data: bytes, storage_options: StorageOptions = None, atomic: bool = True) -> None:
    """Write ``data`` to ``url`` (parents created); atomic: a temporary key next to it, then a move."""
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if not atomic:
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    name = path.rsplit("/", 1)[-1]
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if parent else f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_local(url):
        write_local_durably(tmp, path, data)
        return
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def write_local_durably(tmp: str, path: str, data: bytes) -> None:
    """Write ``data`` to the local file ``tmp``, fsync it, rename it to ``path`` and fsync the folder: after a
    power loss the file holds the old bytes or the new ones, never an empty or torn file."""
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def fsync_dir(folder: str) -> None:
    """fsync a local folder (makes a rename in it durable)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_text(url: str, storage_options: StorageOptions = None) -> str | None:
    """UTF-8 text at ``url``, or None when no such file exists."""
    raw = read_bytes(url, storage_options)
    return None if raw is None else raw.decode("utf-8")


def write_text(url: str, text: str, storage_options: StorageOptions = None) -> None:
    """Write UTF-8 text to ``url`` atomically."""
    write_bytes(url, text.encode("utf-8"), storage_options)


def read_json(url: str, storage_options: StorageOptions = None) -> Any | None:
    """The JSON document at ``url``, or None when no such file exists; invalid JSON is a UserError."""
    raw = read_bytes(url, storage_options)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f"{url} is not valid JSON; it may be truncated — re-create it.") from None


def read_json_object(url: str, storage_options: StorageOptions = None, what: str = "file") -> dict[str, Any] | None:
    """Like :func:`read_json`, but the document must be a JSON object (``what`` names it in the error)."""
    data = read_json(url, storage_options)
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{url} must hold a JSON object ({what}).")
    return data


def write_json(url: str, obj: Any, storage_options: StorageOptions = None) -> None:
    """Write ``obj`` as indented JSON (no NaN: JSON has none) to ``url`` atomically."""
    write_bytes(url, (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode(),
                storage_options)


def list_dir(url: str, storage_options: StorageOptions = None) -> list[str]:
    """Names (not paths) of the entries directly under ``url``, sorted; [] when it does not exist."""
    fs, path = filesystem(url, storage_options)
    try:
        entries = fs.ls(path, detail=False, refresh=True) if not is_local(url) else fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries} - {""})


def remove(url: str, storage_options: StorageOptions = None, recursive: bool = False) -> None:
    """Delete the file (or, with ``recursive``, the tree) at ``url``; missing is fine."""
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        return


def expand_paths(patterns: list[str], storage_options: StorageOptions = None,
                 keep: Any = None) -> list[str]:
    """Files named by ``patterns`` (files; directories searched recursively; globs), each pattern's
    matches sorted, as URLs of the pattern's kind. ``keep(path) -> bool`` filters files found inside
    directories. A pattern that matches nothing is a UserError naming it."""
    found: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=resolve_storage_options(
            pattern, storage_options))
        if not paths:
            raise UserError(f"source path {pattern} matches no files; check the path or glob.")
        for path in paths:
            if fs.isdir(path):
                inner = [p for p in sorted(fs.find(path)) if keep is None or keep(p)]
                found.extend(fs.unstrip_protocol(p) if "://" in pattern else p for p in inner)
            elif fs.exists(path):
                found.append(fs.unstrip_protocol(path) if "://" in pattern else path)
            else:
                raise UserError(f"source file {path} does not exist; check the path.")
    return found


def put_dir(local_dir: str, url: str, storage_options: StorageOptions = None) -> None:
    """Copy the local folder ``local_dir`` (recursively) to ``url``; a no-op when they are the same folder."""
    import shutil

    if is_local(url):
        if os.path.abspath(local_path(url)) != os.path.abspath(local_dir):
            shutil.copytree(local_dir, local_path(url), dirs_exist_ok=True)
        return
    fs, path = filesystem(url, storage_options)
    fs.put(str(local_dir).rstrip("/") + "/", path.rstrip("/") + "/", recursive=True)


def save_safetensors(url: str, tensors: dict[str, Any], storage_options: StorageOptions = None,
                     metadata: dict[str, str] | None = None) -> None:
    """Write a dict of torch tensors as a safetensors file at ``url`` (atomically)."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes(url, save(state, metadata=metadata), storage_options)


def load_safetensors(url: str, storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The tensors of the safetensors file at ``url`` (CPU), or None when no such file exists; a file that is
    not valid safetensors (truncated, corrupt) is a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw = read_bytes(url, storage_options)
    if raw is None:
        return None
    try:
        return load(raw)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UserError(f"{url} is not a valid safetensors file ({type(err).__name__}); it is truncated or "
                        "corrupt — restore it or re-create it.") from None
