"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written file.

Each writer writes a temporary file in the destination folder (same file system), flushes it to
disk, then ``os.replace``-s it onto the destination; on any error the temporary file is removed
and the destination is untouched. Under ``torch.distributed`` the callers (checkpoints, reports,
fine-tune checkpoints) run these on rank 0 only, inside :func:`qatgraph.distributed.run_on_main`,
so that the other ranks wait for the finished file.

May import: nothing of qatgraph (torch and the standard library only).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary_path)`` fills a temporary file, which then replaces ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # a fresh name, created by ``write`` itself: the file gets the usual permissions (umask), not mkstemp's 0600
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as written:  # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    def write(temporary: str) -> None:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))
