"""Eager fake-quantization for float32 CPU tensors, bit-identical to the ATen kernels and faster.

On the CPU, ATen's ``fake_quantize_per_{tensor,channel}_affine`` forward is a scalar loop and its
backward multiplies the gradient by a boolean mask through a type-promoting copy; on a
16x96x56x56 activation they measured 12.6 ms forward and 12.9 ms backward (torch 2.13, 2 threads).
Two faster forms, both with ONNX QuantizeLinear's formula -- ``q = round_half_even(x / scale)`` in
float32 (an IEEE division, as ONNX Runtime computes it), then the clamp to ``[qmin, qmax]`` after
the zero point -- and ATen's straight-through mask, the same bits in both (tests/test_quantizer.py).
ATen multiplies by ``1 / scale`` instead, which lands on the other side of a rounding tie for inputs
within an ulp of it (on all-MiniLM-L6-v2, 1 of 11.5 million activation values; 2 of the 6 root flips
of one parity check: BENCHMARKS.md, "Transformer PTQ"). The forms:

* per-tensor: a C++ kernel (``qatgraph/kernels/fake_quant_cpu.cpp``), one pass forward writing the
  output and a one-byte mask, one pass backward; built on first use (see
  :mod:`qatgraph.kernels.fake_quant_cpu_ext`). On a 16x144x56x56 activation it measured 1.5 ms
  forward and 1.4 ms backward when it multiplied by ``1 / scale``; dividing costs little, the loop
  being memory-bound (kernel forward, same run, 2 threads, 2026-12-05: 1.7 ms dividing, 1.65 ms
  multiplying);
* otherwise (per-channel weights, or no compiler): vectorized torch ops, five passes forward and a
  ``where`` backward (5.9 ms and 5.4 ms on that activation).

Deviation from ATen kept on purpose in both: a NaN input stays NaN (ATen outputs ``qmin``), with
gradient 0. The kernel runs only for eager float32 on the CPU (CUDA has its own fused kernels,
:mod:`qatgraph.ops.fake_quant_cuda`).
The torch-op form is also the "mask" form of compiled graphs (``qatgraph.quant.quantizer``), on any
device: Dynamo traces this autograd function, forward and backward, and Inductor fuses it.
"""
from __future__ import annotations

import torch

from qatgraph.kernels import fake_quant_cpu_ext


def broadcast_qparams(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale``/``zero_point`` reshaped to broadcast along ``axis`` of ``x``."""
    if axis is None:
        return scale, zero_point
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape)


class FakeQuantizeCpu(torch.autograd.Function):
    """``fake_quantize(x, scale, zero_point, qmin, qmax, axis)`` with the straight-through mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                axis: int | None, use_kernel: bool = True) -> torch.Tensor:
        need_mask = ctx.needs_input_grad[0]
        kernel = fake_quant_cpu_ext.load() if use_kernel and axis is None else None
        if kernel is not None:
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous()  # the kernel walks memory flat: any dense layout works
            zero = float(zero_point)
            output, mask = kernel.forward(x, float(scale), qmin - zero, qmax - zero, need_mask)
            ctx.kernel = kernel
        else:
            output, mask = fake_quantize_with_mask(x, scale, zero_point, qmin, qmax, axis)
            ctx.kernel = None
        if need_mask:
            ctx.save_for_backward(mask)
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if ctx.kernel is not None:
            grad_input = ctx.kernel.backward(grad, mask)
        else:
            grad_input = torch.where(mask, grad, 0.0)
        return grad_input, None, None, None, None, None, None


def fake_quantize_with_mask(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                            axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quant of float32 ``x`` in torch ops, ``round(x / scale)``: (output, straight-through bool mask)."""
    scale, zero_point = broadcast_qparams(x, scale, zero_point, axis)
    zero_point = zero_point.to(torch.float32)
    # Integers are exact in float32, so clamping round(x / s) to [qmin - zp, qmax - zp] is
    # clamping round(x / s) + zp to [qmin, qmax] and subtracting zp again, without two passes.
    low, high = qmin - zero_point, qmax - zero_point
    codes = torch.div(x, scale).round_()
    clamped = torch.clamp(codes, low, high)
    mask = clamped == codes  # NaN compares unequal: no gradient, as in ATen
    return clamped.mul_(scale), mask


def fake_quantize_cpu(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None, *, use_kernel: bool = True) -> torch.Tensor:
    """Fake-quantize a float32 CPU tensor; ``use_kernel=False`` forces the torch-op form."""
    return FakeQuantizeCpu.apply(x, scale, zero_point, qmin, qmax, axis, use_kernel)
