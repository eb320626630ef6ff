"""Content-addressed cache of expensive results under `data/cache/`.

A result is stored under a key made from its name and everything it depends on (parameters, tensors, model
weights). Files are written atomically and carry a SHA-256 of their payload: a corrupt or truncated file is
rebuilt, never trusted, and `cached` says so with a `CacheWarning`.

The checksum proves a file is whole, not who wrote it, so a file is loaded with `torch.load(weights_only=True)`:
plain data only (tensors, numbers, strings, None, and lists, tuples, dicts and sets of those) plus the project's
own classes in `SAFE_TYPES`. A crafted pickle that would run code is refused like a corrupt file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from helpers.core.paths import CACHE_DIR

T = TypeVar("T")
_MAGIC = b"MICACHE1"

SAFE_TYPES: list[type] = []
"""The project's classes a cached value may hold besides plain data; each registers itself with `@storable` where
it is defined (today `heuristic_scheme.HeuristicScores`, the third item of notebook 02's "arith-kv-maps" entries).

Other results are stored as plain data: SAEs as `sae.sae_to_dict` dicts and their stats as `asdict(...)`.
`write` refuses a value holding any other class, so nothing is stored that `read` would not load back.
"""


def storable(cls: type) -> type:
    """Class decorator: let cached values hold instances of `cls` (its module must be imported before a read)."""
    if cls not in SAFE_TYPES:
        SAFE_TYPES.append(cls)
    return cls


STALE_AFTER_S = 3600.0
_TEMP_FILE = re.compile(r"\..+\.pt-[a-z0-9_]{8}")  # `.NAME.pt-XXXXXXXX`, as tempfile.mkstemp names them
_warned: set[str] = set()


class CacheWarning(UserWarning):
    """The cache rebuilt an unreadable entry, or could not store a result (which is returned all the same)."""


def fingerprint(value: Any) -> str:
    """A stable hex digest of `value`: tensors, arrays, modules (their state dict), paths (their bytes), and
    JSON-able containers of those."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: "hashlib._Hash", value: Any) -> None:
    if isinstance(value, nn.Module):
        _feed(digest, value.state_dict())
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"tensor{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, np.ndarray):
        digest.update(f"array{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Path):
        digest.update(b"path")
        digest.update(value.read_bytes() if value.is_file() else str(value).encode())
    elif isinstance(value, dict):
        digest.update(b"dict")
        for key in sorted(value, key=str):
            _feed(digest, str(key))
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"seq{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(json.dumps(value, sort_keys=True, default=repr).encode())


def cache_path(name: str, key: Any, cache_dir: str | Path | None = None) -> Path:
    """Where the result `name` computed from `key` is stored."""
    folder = Path(cache_dir) if cache_dir is not None else CACHE_DIR
    return folder / f"{name}-{fingerprint(key)[:20]}.pt"


def refused_types(payload: bytes) -> list[str]:
    """Classes and functions named in a `torch.save` payload that `read` will not load: neither plain data nor in
    `SAFE_TYPES`. Found by reading the pickle's opcodes, without running any of them."""
    with torch.serialization.safe_globals(list(SAFE_TYPES)):
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(payload)))


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    refused = refused_types(payload)
    if refused:
        raise TypeError(f"the cache stores plain data and {', '.join(t.__name__ for t in SAFE_TYPES)}, not "
                        f"{', '.join(refused)}: store it as a dict, or mark the class @cache.storable")
    return payload


def remove_stale_temp_files(folder: str | Path, max_age_s: float = STALE_AFTER_S) -> None:
    """Delete the `.NAME.pt-XXXXXXXX` temp files that killed writers left in `folder`.

    A temp file counts as stale once untouched for `max_age_s` (an hour). Age rather than the writer's pid,
    because a writer (`write`, or a training checkpoint) holds its temp file only while it writes the bytes out,
    and renames it at once: seconds, even for a large SAE. Age works for writers on other machines sharing the
    folder, where a pid means nothing, and cannot be fooled by pid reuse (a restarted container hands out the same
    pids again). Deleting a live writer's file would be harmless anyway: its rename fails loudly (`cached` warns and
    returns the value).
    """
    cutoff = time.time() - max_age_s
    for entry in Path(folder).iterdir():
        try:
            if _TEMP_FILE.fullmatch(entry.name) and entry.stat().st_mtime < cutoff:
                entry.unlink()
        except FileNotFoundError:
            pass  # another process removed or renamed it first


def write(path: str | Path, value: Any) -> None:
    """Serialise `value` with torch.save behind a checksum header, atomically (temp file + rename).

    Raises `TypeError` for a value `read` would not load back (see `SAFE_TYPES`) and `OSError` when the folder
    cannot be written. Stale temp files of killed writers in the folder are removed first.
    """
    path = Path(path)
    payload = _serialise(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checked_payload(path: Path) -> bytes:
    blob = path.read_bytes()
    header = len(_MAGIC) + 32
    if len(blob) < header or not blob.startswith(_MAGIC):
        raise ValueError(f"{path} is not a cache file")
    if hashlib.sha256(blob[header:]).digest() != blob[len(_MAGIC) : header]:
        raise ValueError(f"{path} fails its checksum (corrupt or truncated)")
    return blob[header:]


def read(path: str | Path) -> Any:
    """Load a value written by `write`.

    Raises `ValueError` if the file is corrupt or truncated, or holds anything but plain data and `SAFE_TYPES`.
    """
    payload = _checked_payload(Path(path))
    try:
        refused = refused_types(payload)
        if not refused:
            with torch.serialization.safe_globals(list(SAFE_TYPES)):
                return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"{path} does not load as plain data ({type(err).__name__})") from err
    raise ValueError(f"{path} holds {', '.join(refused)}, which the cache does not load")


def _warn_once(message: str) -> None:
    """Warn with `message` the first time this process meets it (it names the file and the reason)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, CacheWarning, stacklevel=3)


def cached(name: str, key: Any, compute: Callable[[], T], *, cache_dir: str | Path | None = None,
           refresh: bool = False) -> T:
    """Return the cached result of `compute()` for (`name`, `key`), computing and storing it if absent or unreadable.

    `key` must hold everything the result depends on (parameters, data, the model itself): it is fingerprinted.
    An unreadable entry is recomputed with a `CacheWarning` (a long recompute should never be a mystery); a result
    that cannot be stored (folder not writable, a type `read` would refuse) is returned with a `CacheWarning`.
    """
    path = cache_path(name, key, cache_dir)
    if path.exists() and not refresh:
        try:
            return read(path)
        except (ValueError, OSError) as err:
            _warn_once(f"unreadable cache entry: {err}; recomputing it")
    value = compute()
    try:
        write(path, value)
    except (OSError, TypeError) as err:
        _warn_once(f"could not store {path} ({type(err).__name__}: {err}); returning the value uncached")
    return value
