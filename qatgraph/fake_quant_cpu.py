"""Eager fake-quantization for float32 CPU tensors, bit-identical to the ATen kernels and faster.

On the CPU, ATen's ``fake_quantize_per_{tensor,channel}_affine`` forward is a scalar loop and its
backward multiplies the gradient by a boolean mask through a type-promoting copy; on a
16x96x56x56 activation they measured 12.6 ms forward and 12.9 ms backward, against 3.9 ms and
1.4 ms for the vectorized elementwise ops below (torch 2.13, 2 threads). Same formula as ATen --
``q = round_half_even(x * (1 / scale))`` in float32, then the clamp to ``[qmin, qmax]`` after the
zero point -- so output and straight-through mask are the same bits (tests/test_quantizer.py).
Only for eager float32 on the CPU: CUDA keeps ATen's fused kernel, compiled graphs use
``fake_quantize_reference`` (which Inductor fuses).
"""
from __future__ import annotations

import torch


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
                axis: int | None) -> torch.Tensor:
        scale, zero_point = broadcast_qparams(x, scale, zero_point, axis)
        zero_point = zero_point.to(torch.float32)
        # Integers are exact in float32, so clamping round(x / s) to [qmin - zp, qmax - zp] is
        # clamping round(x / s) + zp to [qmin, qmax] and subtracting zp again, without two passes.
        low, high = qmin - zero_point, qmax - zero_point
        codes = torch.mul(x, 1.0 / scale).round_()
        clamped = torch.clamp(codes, low, high)
        mask = clamped == codes  # NaN compares unequal: no gradient, as in ATen
        ctx.save_for_backward(mask)
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None, None, None, None


def fake_quantize_cpu(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None) -> torch.Tensor:
    return FakeQuantizeCpu.apply(x, scale, zero_point, qmin, qmax, axis)
