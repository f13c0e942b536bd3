"""Eager fake-quantization of CUDA tensors in fp32, bf16 and fp16: one fused kernel per direction.

Semantics for every dtype: ``fake_quantize(x.float()).to(x.dtype)`` with ONNX QuantizeLinear's
formula, as on the CPU (``round_half_even(x / scale)`` in fp32, an IEEE division, clamped to
``[qmin - zp, qmax - zp]``, times ``scale``); the straight-through gradient is 1 where the rounded
value lies in the range (ATen's mask). The ``aten`` backend multiplies by ``1 / scale`` instead
(ATen's formula): values within an ulp of a rounding tie get the other integer than ONNX Runtime
gives them, which is why it is opt-in. Either way a bf16 activation lands on exactly the integers
its fp32 value would, the output keeps the input's dtype and memory layout, and no fp32 copy of an activation is ever made. What the
backward keeps is a one-byte mask (fixed scales) or nothing but the input it already needs
(learnable scales, where the gradient is recomputed from ``x``).

Two implementations, both fused, picked per dtype by :data:`PREFERRED` and overridable with
``QATGRAPH_CUDA_FAKE_QUANT=triton|aten`` (read once per process) or :func:`force_backend`:

* ``triton``: :mod:`qatgraph.kernels.fake_quant_triton` (forward writes output + mask in one pass,
  backward reads gradient + mask in one pass; NaN stays NaN, as on the CPU);
* ``aten``: ``torch.fake_quantize_per_{tensor,channel}_affine`` (ATen's cachemask kernels; rounds
  ``x * (1 / scale)``, a NaN input comes out as a clamp bound, and per-channel reads the input twice).

Learnable scales (LSQ) always take the Triton kernels (ATen's learnable kernels are fp32-only and
have another zero-point convention); without Triton they fall back to the torch-op reference.
"""
from __future__ import annotations

import functools
import os
from typing import Literal

import torch

from qatgraph.errors import QatgraphError
from qatgraph.kernels import triton_available

Backend = Literal["triton", "aten"]
BACKENDS: tuple[Backend, ...] = ("triton", "aten")
#: Which fused implementation each input dtype uses by default on CUDA (activations and weights).
#: Triton everywhere: it rounds as ONNX QuantizeLinear does (``x / scale``), ATen's kernels do not
#: (``x * (1 / scale)``), so only Triton keeps the trained model's integers those of the exported
#: file. Speed not yet measured on a GPU: the ``kernels`` and ``step`` sections of
#: benchmarks/gpu_train.py time both side by side.
PREFERRED: dict[torch.dtype, Backend] = {torch.float32: "triton", torch.bfloat16: "triton", torch.float16: "triton"}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _kernels():
    from qatgraph.kernels import fake_quant_triton

    return fake_quant_triton


_UNSET = object()
_FORCED: object = _UNSET  # Backend, None (the table), or _UNSET (environment not read yet)


def force_backend(backend: str | None, *, source: str = "force_backend") -> None:
    """Use ``backend`` for every CUDA fake-quant from now on; ``None``: the measured table."""
    global _FORCED
    value = (backend or "").strip().lower() or None
    if value is not None and value not in BACKENDS:
        raise QatgraphError(f"{source}={backend!r} is not one of {', '.join(BACKENDS)}; "
                            "unset it to use the measured default per dtype")
    _FORCED = value


def backend_for(dtype: torch.dtype) -> Backend:
    """The implementation ``dtype`` inputs use: :func:`force_backend` or ``QATGRAPH_CUDA_FAKE_QUANT``
    (read once per process) if set, else :data:`PREFERRED` (``aten`` when Triton is not importable)."""
    if _FORCED is _UNSET:
        force_backend(os.environ.get("QATGRAPH_CUDA_FAKE_QUANT"), source="QATGRAPH_CUDA_FAKE_QUANT")
    backend = _FORCED or PREFERRED.get(dtype, "aten")
    return backend if backend == "aten" or triton_available() else "aten"  # type: ignore[return-value]


def learnable_kernel_available() -> bool:
    """Whether learnable-scale fake-quant of CUDA tensors has its fused (Triton) kernels here."""
    return triton_available()


class FakeQuantizeTriton(torch.autograd.Function):
    """Fixed scale/zero-point: output and one-byte mask in one forward pass, ``where(mask, dy, 0)`` back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                axis: int | None) -> torch.Tensor:
        need_mask = ctx.needs_input_grad[0]
        out, mask = _kernels().fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, need_mask)
        if need_mask:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return _kernels().masked_grad(grad, mask), None, None, None, None, None


class FakeQuantizeLearnableTriton(torch.autograd.Function):
    """Learnable scale (LSQ): forward as above without a mask; the backward recomputes the range
    test from ``x`` and returns the scale gradient summed per tensor or per channel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                axis: int | None) -> torch.Tensor:
        kernels = _kernels()
        x = kernels.dense(x, axis)
        out, _ = kernels.fake_quant_forward(x, scale, zero_point, qmin, qmax, axis, False)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qparams = (qmin, qmax, axis)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax, axis = ctx.qparams
        grad_x, grad_scale = _kernels().lsq_backward(x, grad, scale, zero_point, qmin, qmax, axis)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_scale if ctx.needs_input_grad[1] else None, None, None, None, None)


def _qparams(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Scales stay fp32 even after model.half(); kernels read them once per program.
    return scale.to(device=x.device, dtype=torch.float32), zero_point.to(device=x.device, dtype=torch.int32)


def fake_quantize_cuda(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                       axis: int | None, *, backend: Backend | None = None) -> torch.Tensor:
    """Fake-quantize a CUDA tensor with fixed qparams (per tensor, or per channel of ``axis``)."""
    scale, zero_point = _qparams(x, scale, zero_point)
    backend = backend or backend_for(x.dtype)
    if backend == "triton":
        return FakeQuantizeTriton.apply(x, scale, zero_point, qmin, qmax, axis)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)


def fake_quantize_learnable_cuda(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                                 qmax: int, axis: int | None) -> torch.Tensor:
    """LSQ fake-quant of a CUDA tensor; ``scale`` is the (gradient-scaled) learnable scale."""
    if scale.dtype != torch.float32:
        scale = scale.float()
    return FakeQuantizeLearnableTriton.apply(x, scale, zero_point.to(torch.int32), qmin, qmax, axis)
