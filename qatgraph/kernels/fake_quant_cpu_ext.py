"""Build-on-first-use loader of the C++ CPU fake-quant kernel (``fake_quant_cpu.cpp``).

:func:`load` compiles the kernel once per machine with ``torch.utils.cpp_extension`` (about 30 s,
needs a C++ compiler with OpenMP, which ``torch.compile`` on CPU needs as well) into
``$QATGRAPH_CACHE_DIR`` (default ``~/.cache/qatgraph``), under a folder named after the torch
version, the Python ABI and a hash of the source, so that upgrades rebuild; later processes load the built library in
milliseconds. It never raises: without a compiler (or with ``QATGRAPH_CPU_KERNEL=0``) it returns
``None`` and the caller uses the vectorized torch-op form, which gives the same bits, only slower.
Concurrent first uses are safe (``cpp_extension`` serializes builds with a lock file).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import sysconfig
import time
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

__all__ = ["load", "build", "kernel_disabled", "build_directory"]

_SOURCE = Path(__file__).with_name("fake_quant_cpu.cpp")
_NAME = "qatgraph_fake_quant_cpu"


def kernel_disabled() -> bool:
    """``QATGRAPH_CPU_KERNEL=0`` (or ``false``/``no``) turns the C++ kernel off."""
    return os.environ.get("QATGRAPH_CPU_KERNEL", "1").strip().lower() in ("0", "false", "no", "off")


def build_directory() -> Path:
    """Where the kernel is built and cached for this torch, this Python and this kernel source
    (a changed source gets a fresh folder, so "already built" is a plain file check)."""
    root = Path(os.environ.get("QATGRAPH_CACHE_DIR") or Path.home() / ".cache" / "qatgraph")
    abi = sysconfig.get_config_var("SOABI") or f"py{sys.version_info.major}{sys.version_info.minor}"
    source = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:12] if _SOURCE.exists() else "missing"
    return root / "kernels" / f"torch-{torch.__version__.replace('+', '-')}-{abi}" / source


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
        built = any(directory.glob(f"{_NAME}*.so")) or any(directory.glob(f"{_NAME}*.pyd"))
        if not built:
            print(f"qatgraph: compiling the CPU fake-quant kernel into {directory} (once per machine, about 30 s; "
                  "QATGRAPH_CPU_KERNEL=0 skips it)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        module = cpp_extension.load(
            name=_NAME, sources=[str(_SOURCE)], build_directory=str(directory),
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
            extra_ldflags=["-fopenmp"], verbose=False)
        logger.debug("CPU fake-quant kernel loaded in %.1f s from %s", time.perf_counter() - start, directory)
        return module
    except Exception as exc:  # noqa: BLE001 - no compiler, no headers, a failed build: all mean the torch-op form
        lines = str(exc).strip().splitlines()
        logger.warning("qatgraph: CPU fake-quant kernel unavailable (%s: %s); using the torch-op form, which gives "
                       "the same results more slowly", type(exc).__name__, lines[-1] if lines else "")
        return None
