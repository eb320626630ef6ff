"""Content-addressed cache of expensive results under `data/cache/`.

A result is stored under a key made from its name and everything it depends on (parameters, tensors, model
weights). Files are written atomically and carry a SHA-256 of their payload: a corrupt or truncated file is
rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
from torch import nn

from helpers.paths import CACHE_DIR

T = TypeVar("T")
_MAGIC = b"MICACHE1"


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


def write(path: str | Path, value: Any) -> None:
    """Serialise `value` with torch.save behind a checksum header, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
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


def read(path: str | Path) -> Any:
    """Load a value written by `write`; raises `ValueError` if the file is corrupt or truncated."""
    blob = Path(path).read_bytes()
    header = len(_MAGIC) + 32
    if len(blob) < header or not blob.startswith(_MAGIC):
        raise ValueError(f"{path} is not a cache file")
    if hashlib.sha256(blob[header:]).digest() != blob[len(_MAGIC) : header]:
        raise ValueError(f"{path} fails its checksum (corrupt or truncated)")
    return torch.load(io.BytesIO(blob[header:]), map_location="cpu", weights_only=False)


def cached(name: str, key: Any, compute: Callable[[], T], *, cache_dir: str | Path | None = None,
           refresh: bool = False) -> T:
    """Return the cached result of `compute()` for (`name`, `key`), computing and storing it if absent or unreadable.

    `key` must hold everything the result depends on (parameters, data, the model itself): it is fingerprinted.
    """
    path = cache_path(name, key, cache_dir)
    if path.exists() and not refresh:
        try:
            return read(path)
        except (ValueError, EOFError, RuntimeError, OSError, ImportError, AttributeError):
            pass  # unreadable: rebuilt below
    value = compute()
    write(path, value)
    return value
