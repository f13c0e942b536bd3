"""Hand-written kernels used by qatgraph's custom ops.

* ``partial_wgrad_triton``: EfQAT's partial weight gradient on the GPU (Triton);
* ``fake_quant_cpu.cpp`` + ``fake_quant_cpu_ext``: eager per-tensor fake-quant on the CPU (C++,
  built on first use with ``torch.utils.cpp_extension``; see that module).

Nothing here is imported eagerly: Triton is optional (CPU-only installs work without it) and
importing it costs time, so callers ask :func:`triton_available` first and import the kernel
module (``qatgraph.kernels.partial_wgrad_triton``) only on the CUDA path.

May import: nothing of qatgraph but :mod:`qatgraph.errors` (torch, triton and the C++ toolchain only);
the operators in :mod:`qatgraph.ops` launch these kernels.

Guarantees: :func:`triton_available` never raises; it answers ``True`` only when ``import triton``
succeeds. Whether a kernel may run on a given tensor is decided by the caller (CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1`` in tests).
"""
from __future__ import annotations

import functools
import importlib
import logging

logger = logging.getLogger(__name__)

__all__ = ["triton_available"]


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached; never raises)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - any import failure (also broken installs) means torch path
        logger.debug("triton not importable (%s); CUDA paths fall back to torch", exc)
        return False
    return True
