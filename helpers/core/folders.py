"""Folders written whole or not at all: a checkpoint is saved into a temp folder and moved into place, and what a
killed save left behind is found (a read) or repaired (only when writing, or on request).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

STALE_AFTER_S = 3600.0
"""A checkpoint temp folder untouched this long belongs to a killed save (a live one keeps writing into it)."""


def stranded(folder: Path) -> Path | None:
    """The whole copy a killed save left beside a missing checkpoint `folder` (`.NAME-old-PID`, the newest), which
    `recover_stranded` would move back; None where `folder` exists or nothing was left."""
    olds = sorted(_leftovers(Path(folder), r"old-\d+"), key=_last_touched)
    return olds[-1] if olds and not Path(folder).exists() else None


def _leftovers(folder: Path, suffix: str) -> list[Path]:
    """Siblings of `folder` named `.NAME-{suffix}` (`suffix` a regular expression)."""
    pattern = re.compile(rf"\.{re.escape(folder.name)}-{suffix}")
    if not folder.parent.is_dir():
        return []
    return [path for path in folder.parent.iterdir() if pattern.fullmatch(path.name)]


def _last_touched(tree: Path) -> float:
    """Newest modification time in `tree`; now, if something in it vanished meanwhile (it is in use)."""
    try:
        return max([tree.stat().st_mtime] + [path.stat().st_mtime for path in tree.rglob("*")])
    except FileNotFoundError:
        return time.time()


def recover_stranded(folder: Path) -> Path:
    """Repair what killed runs of `write_checkpoint_atomically` left next to `folder`; returns `folder`.

    The writer saves into a temp folder `.NAME-XXXXXXXX`, moves the current checkpoint aside to `.NAME-old-PID`,
    moves the new one in, and deletes the old one. A kill between the two moves leaves no `NAME` at all: the
    stranded old copy (known whole, unlike a temp folder) is moved back. Once `NAME` exists, every `.NAME-old-PID`
    is superseded and deleted, as is every temp folder untouched for `STALE_AFTER_S` (a killed save).

    Racing a live writer is safe: moving a folder onto an existing checkpoint fails, so whichever of the two moves
    comes second fails, the checkpoint in place stays whole, and a writer that lost the race raises.
    """
    folder = Path(folder)
    left = stranded(folder)
    if left is not None:
        try:
            left.rename(folder)
        except OSError:
            pass  # a live writer moved its new checkpoint in first
    olds = [old for old in _leftovers(folder, r"old-\d+") if old != left]
    cutoff = time.time() - STALE_AFTER_S
    stale = [tmp for tmp in _leftovers(folder, "[a-z0-9_]{8}") if _last_touched(tmp) < cutoff]
    for leftover in olds + stale:
        shutil.rmtree(leftover, ignore_errors=True)
    return folder


def write_checkpoint_atomically(save: Callable[[Path], None], folder: Path) -> Path:
    """Run `save(tmp_folder)` and move the finished folder to `folder`, so a crash never leaves half a checkpoint.

    Leftovers of earlier killed saves are repaired first (`recover_stranded`).
    """
    folder = recover_stranded(Path(folder))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}-old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
