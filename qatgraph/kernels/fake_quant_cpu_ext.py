"""Build-on-first-use loader of the C++ CPU fake-quant kernel (``fake_quant_cpu.cpp``).

:func:`load` compiles the kernel with ``torch.utils.cpp_extension`` (about 25 s, needs a C++
compiler with OpenMP, which ``torch.compile`` on CPU needs as well) into ``$QATGRAPH_CACHE_DIR``
(default ``~/.cache/qatgraph``), under a folder keyed by everything that changes the build: the
torch version and install directory, the Python ABI, the kernel source's path and contents, the
compiler (``$CXX``) and the flags. cpp_extension's ``build.ninja`` embeds the absolute paths of
the torch install and the source, so a key without them made two virtual environments or two
clones sharing the cache rebuild each other's library every time they alternated; now each gets
its folder (``build-inputs.json`` in it says which) and later processes load the built library
in milliseconds. A notice goes to stderr before every build, and after one that ninja decided on
although a library was there. It never raises: without a compiler (or with
``QATGRAPH_CPU_KERNEL=0``) it returns ``None`` and the caller uses the vectorized torch-op form,
which gives the same bits, only slower. Concurrent first uses are safe (``cpp_extension``
serializes builds with a lock file).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

__all__ = ["build", "build_directory", "build_inputs", "kernel_disabled", "load"]

_SOURCE = Path(__file__).with_name("fake_quant_cpu.cpp")
_NAME = "qatgraph_fake_quant_cpu"
_CFLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
_LDFLAGS = ["-fopenmp"]


def kernel_disabled() -> bool:
    """``QATGRAPH_CPU_KERNEL=0`` (or ``false``/``no``) turns the C++ kernel off."""
    return os.environ.get("QATGRAPH_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off")


def _abi() -> str:
    return sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"


def build_inputs() -> dict[str, str]:
    """Everything that changes what cpp_extension builds (or makes its ninja file rebuild)."""
    source = hashlib.sha256(_SOURCE.read_bytes()).hexdigest() if _SOURCE.exists() else "missing"
    return {"torch": torch.__version__, "torch_dir": os.path.realpath(os.path.dirname(torch.__file__)),
            "python_abi": _abi(), "source": os.path.realpath(_SOURCE), "source_sha256": source,
            "compiler": os.environ.get("CXX", "c++"), "flags": " ".join(_CFLAGS + _LDFLAGS)}


def build_directory() -> Path:
    """Where the kernel is built and cached for these build inputs (:func:`build_inputs`): a change
    of any gets a fresh folder, so "already built" is a plain file check."""
    root = Path(os.environ.get("QATGRAPH_CACHE_DIR") or Path.home() / ".cache" / "qatgraph")
    key = hashlib.sha256(json.dumps(build_inputs(), sort_keys=True).encode()).hexdigest()[:12]
    return root / "kernels" / f"torch-{torch.__version__.replace('+', '-')}-{_abi()}" / key


def _built_library(directory: Path) -> Path | None:
    return next(iter(sorted(directory.glob(f"{_NAME}*.so")) + sorted(directory.glob(f"{_NAME}*.pyd"))), None)


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module, building it on first use; ``None`` when it cannot be had.

    Cached for the process: the environment switch and the build are looked at once."""
    return build()


def build() -> ModuleType | None:
    """Build (or load the already built) kernel now, uncached; ``None`` with a warning on failure."""
    if kernel_disabled():
        return None
    try:
        from torch.utils import cpp_extension

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        library = _built_library(directory)
        built_at = library.stat().st_mtime_ns if library is not None else None
        if library is None:
            print(f"qatgraph: compiling the CPU fake-quant kernel into {directory} (once per torch install, Python "
                  "and kernel source, about 25 s; QATGRAPH_CPU_KERNEL=0 skips it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(name=_NAME, sources=[str(_SOURCE)], build_directory=str(directory),
                                    extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, verbose=False)
        seconds = time.perf_counter() - start
        library = _built_library(directory)
        rebuilt = built_at is not None and library is not None and library.stat().st_mtime_ns != built_at
        if rebuilt:
            print(f"qatgraph: rebuilt the CPU fake-quant kernel in {directory} ({seconds:.0f} s): ninja found its "
                  "inputs newer than the library", file=sys.stderr, flush=True)
        if built_at is None or rebuilt:
            (directory / "build-inputs.json").write_text(json.dumps(build_inputs(), indent=2, sort_keys=True) + "\n")
        logger.debug("CPU fake-quant kernel loaded in %.1f s from %s", seconds, directory)
        return module
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, a failed build: all mean the torch-op form
        lines = str(exc).strip().splitlines()
        logger.warning("qatgraph: CPU fake-quant kernel unavailable (%s: %s); using the torch-op form, which gives "
                       "the same results more slowly", type(exc).__name__, lines[-1] if lines else "")
        return None
