"""Atomic file writes with ordinary permissions: every file qatgraph writes goes through here.

Checkpoints, ONNX exports, TensorRT engines and timing caches, sensitivity reports, fine-tune
checkpoints and the demo's artifacts are written to a temporary file in the destination's
directory (same file system), flushed to disk, and renamed over the destination only when
complete (``os.replace``): a reader sees the old file or the whole new one, and a failed write
never leaves half a file nor clobbers the previous one. Under ``torch.distributed`` the callers
run these on rank 0 only, inside :func:`qatgraph.distributed.run_on_main`, so that the other ranks
wait for the finished file.

Permissions are those a plain ``open(path, "w")`` gives, not ``tempfile.mkstemp``'s private
0o600: a file that already exists keeps its mode, a new one gets ``0o666 & ~umask``. A directory
given as the destination is a :class:`~qatgraph.errors.UsageError`.

May import: :mod:`qatgraph.errors` only (torch and the standard library otherwise).
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from qatgraph.errors import UsageError

__all__ = ["atomic_path", "atomic_write", "check_output_path", "current_umask", "torch_save", "write_bytes", "write_text"]

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it; keep the window closed to other threads
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def check_output_path(path: str | os.PathLike, what: str = "output") -> str:
    """``path`` as a string, after checking that a file can be written there (parents are created).

    Raises :class:`UsageError` when ``path`` is an existing directory or a parent is a file."""
    path = os.fspath(path)
    if not path:
        raise UsageError(f"the {what} path is empty; give a file name such as model.onnx")
    if os.path.isdir(path):
        raise UsageError(f"the {what} path {path!r} is an existing directory; give a file inside it, e.g. "
                         f"{os.path.join(path, os.path.basename(os.path.normpath(path)) or 'out')}{_suffix(what)}")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"cannot write the {what} {path!r}: a parent of it is a file, not a directory") from None
    except PermissionError as exc:
        raise UsageError(f"cannot create the directory {directory!r} for the {what} {path!r}: {exc.strerror}; "
                         "choose a directory you can write to") from None
    return path


def _suffix(what: str) -> str:
    return {"checkpoint": ".pt", "ONNX model": ".onnx", "engine": ".engine"}.get(what, "")


def _final_mode(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)  # overwriting keeps the file's mode, as open() does
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds, the file written there is
    fsynced, given ordinary permissions and renamed over ``path``. On any error it is removed and
    ``path`` is left as it was."""
    path = check_output_path(path, what)
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=directory)
    os.close(handle)
    try:
        yield temporary
        _fsync(temporary)
        os.chmod(temporary, _final_mode(path))
        os.replace(temporary, path)
    except IsADirectoryError:
        raise UsageError(f"the {what} path {path!r} became a directory while it was written") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], what: str = "output") -> None:
    """``write(temporary_path)`` fills a temporary file (e.g. ``torch.save``, ``onnx.save``), which then
    replaces ``path``."""
    with atomic_path(path, what) as temporary:
        write(temporary)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, what: str = "output") -> None:
    with atomic_path(path, what) as temporary, open(temporary, "wb") as handle:
        handle.write(memoryview(data))


def write_text(path: str | os.PathLike, text: str, what: str = "output") -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path, what) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def torch_save(obj: Any, path: str | os.PathLike, what: str = "file") -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary), what)
