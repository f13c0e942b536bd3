"""Triton kernels: fused fake-quantization of fp32/bf16/fp16 tensors on the GPU, one pass per direction.

Semantics (the same for every input dtype): each element is read, widened to fp32 in registers,
divided by ``scale`` (an IEEE division, ``div_rn``, as ONNX QuantizeLinear and torch's ``/``),
rounded half to even, clamped to ``[quant_min - zero_point, quant_max - zero_point]`` and
multiplied by ``scale``; the result is cast back to the input dtype (round to nearest even) on the
store. That is exactly ``fake_quantize(x.float()).to(x.dtype)`` with qatgraph's CPU formula, so a
bf16 activation quantizes to the same integers as its fp32 value would, and fp32 inputs give the
CPU kernel's bits. Deviations from ATen, shared with qatgraph's CPU kernel: ATen multiplies by
``1 / scale`` (another integer for values within an ulp of a tie), a NaN input stays NaN (ATen
returns an arbitrary clamp bound), and +-inf clamps to the nearer bound.

Kernels:

* ``_forward_kernel`` writes the output and, when a gradient will be needed, a one-byte mask:
  ``1`` where the rounded value lies in the integer range (the straight-through estimator's
  gradient, ATen's rule);
* ``_masked_grad_kernel``: ``dx = where(mask, dy, 0)``, one read of ``dy`` and of the mask;
* ``_lsq_backward_kernel`` (learnable scales): ``dx`` as above, recomputed from ``x`` (so the
  forward saves no mask), plus LSQ's per-element scale gradient ``dy * (round(x/s) - x/s)`` inside
  the range and ``dy * bound`` outside, summed per program into fp32 partials that torch adds up
  (deterministic, unlike atomics).

Layout: the tensor is seen as ``(outer, channels, inner)`` rows of ``inner`` contiguous elements;
per-tensor quantization is one row (``channels == 1``) read in its memory order, so any dense
layout (contiguous, channels-last) works without a copy; per-channel needs a contiguous tensor.
Programs cover ``BLOCK`` elements of one row, so a program loads its channel's scale and zero
point once.

Rounding: ``libdevice.rint`` on the GPU. The Triton interpreter (``TRITON_INTERPRET=1``, used by
the CPU tests) has no libdevice, so interpreted runs round with the float32 "magic number"
``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact round-half-to-even for ``|v| < 2**22`` (larger values
are clamped to ``+-2**22`` first: they lie far outside any integer range anyway).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

try:  # the interpreter cannot run libdevice calls; compiled kernels always can
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - every triton >= 3.0 has it
    libdevice = None

__all__ = ["fake_quant_forward", "masked_grad", "lsq_backward", "INTERPRETED"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_BLOCK = 2048
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23
_LIMIT = tl.constexpr(4194304.0)  # 2**22


@triton.jit
def _round_half_even(value, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        safe = tl.minimum(tl.maximum(value, -_LIMIT), _LIMIT)
        return (safe + _MAGIC) - _MAGIC
    else:
        return libdevice.rint(value)


@triton.jit
def _locate(pid, inner, channels, blocks_per_row, BLOCK: tl.constexpr):
    """(element offsets, in-row validity, channel) of program ``pid``."""
    row = pid // blocks_per_row
    block = pid - row * blocks_per_row
    columns = block * BLOCK + tl.arange(0, BLOCK)
    offsets = row.to(tl.int64) * inner + columns
    return offsets, columns < inner, row % channels


@triton.jit
def _qparams(scale_ptr, zero_point_ptr, channel, quant_min, quant_max):
    """(scale, lowest and highest code after the zero point) of a channel."""
    scale = tl.load(scale_ptr + channel)
    zero_point = tl.load(zero_point_ptr + channel).to(tl.float32)
    return scale, quant_min - zero_point, quant_max - zero_point


@triton.jit
def _forward_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, zero_point_ptr,
                    inner, channels, blocks_per_row, quant_min, quant_max,
                    BLOCK: tl.constexpr, WRITE_MASK: tl.constexpr, DOWNCAST: tl.constexpr,
                    INTERPRETED: tl.constexpr):
    offsets, valid, channel = _locate(tl.program_id(0), inner, channels, blocks_per_row, BLOCK)
    scale, low, high = _qparams(scale_ptr, zero_point_ptr, channel, quant_min, quant_max)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    scaled = tl.math.div_rn(x, scale)  # IEEE division, as ONNX QuantizeLinear
    rounded = _round_half_even(scaled, INTERPRETED)
    code = tl.minimum(tl.maximum(rounded, low), high)
    out = tl.where(scaled != scaled, scaled, code * scale)  # NaN stays NaN
    if DOWNCAST:  # bf16/fp16 output: round to nearest even, as torch's .to() does
        out = out.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + offsets, out, mask=valid)
    if WRITE_MASK:
        tl.store(mask_ptr + offsets, (rounded >= low) & (rounded <= high), mask=valid)


@triton.jit
def _masked_grad_kernel(grad_ptr, mask_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
    keep = tl.load(mask_ptr + offsets, mask=valid, other=0) != 0
    tl.store(out_ptr + offsets, tl.where(keep, grad, tl.zeros_like(grad)), mask=valid)


@triton.jit
def _lsq_backward_kernel(x_ptr, grad_ptr, scale_ptr, zero_point_ptr, grad_x_ptr, partial_ptr,
                         inner, channels, blocks_per_row, quant_min, quant_max,
                         BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    offsets, valid, channel = _locate(pid, inner, channels, blocks_per_row, BLOCK)
    scale, low, high = _qparams(scale_ptr, zero_point_ptr, channel, quant_min, quant_max)
    x = tl.load(x_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    raw_grad = tl.load(grad_ptr + offsets, mask=valid, other=0.0)
    scaled = tl.math.div_rn(x, scale)  # IEEE division, as ONNX QuantizeLinear
    rounded = _round_half_even(scaled, INTERPRETED)
    inside = (rounded >= low) & (rounded <= high)
    tl.store(grad_x_ptr + offsets, tl.where(inside, raw_grad, tl.zeros_like(raw_grad)), mask=valid)
    grad = raw_grad.to(tl.float32)
    code = tl.minimum(tl.maximum(rounded, low), high)
    # d(out)/d(scale): round(x/s) - x/s inside the range, the clamp bound outside; NaN inputs add nothing
    per_element = tl.where(inside, rounded - scaled, code)
    per_element = tl.where(valid & (scaled == scaled), grad * per_element, 0.0)
    tl.store(partial_ptr + pid, tl.sum(per_element, axis=0))


# Under TRITON_INTERPRET=1 (set before triton is imported) kernels are InterpretedFunctions.
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"


def _block(inner: int) -> int:
    return max(128, min(_MAX_BLOCK, triton.next_power_of_2(max(inner, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _rows(x: torch.Tensor, axis: int | None) -> tuple[int, int, int]:
    """(outer, channels, inner) of the row view; per-tensor is one row of every element."""
    if axis is None:
        return 1, 1, x.numel()
    channels = x.shape[axis]
    outer = 1
    for size in x.shape[:axis]:
        outer *= size
    return outer, channels, x.numel() // max(outer * channels, 1)


def dense(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``x`` in a layout the kernels can walk flat: any dense layout per tensor, contiguous per channel."""
    if axis is not None:
        return x.contiguous()
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or \
            (x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    return x.contiguous()


def fake_quant_forward(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                       quant_max: int, axis: int | None, write_mask: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fake-quantized ``x`` in its dtype and layout, bool mask or None). ``scale`` fp32 and
    ``zero_point`` int32 on ``x``'s device, one value or one per channel of ``axis``."""
    x = dense(x, axis)
    # The interpreter's fp32 -> bf16 conversion does not round to nearest even: interpreted bf16
    # runs store fp32 and let torch cast (compiled kernels cast in registers, see DOWNCAST).
    out_dtype = torch.float32 if INTERPRETED and x.dtype == torch.bfloat16 else x.dtype
    out = torch.empty_like(x, dtype=out_dtype)
    mask = torch.empty_like(x, dtype=torch.bool) if write_mask else None
    outer, channels, inner = _rows(x, axis)
    if x.numel() == 0:
        return out.to(x.dtype), mask
    block = _block(inner)
    blocks_per_row = triton.cdiv(inner, block)
    grid = (outer * channels * blocks_per_row,)
    with _device_guard(x):
        _forward_kernel[grid](x, out, mask if mask is not None else out, scale, zero_point,
                              inner, channels, blocks_per_row, quant_min, quant_max,
                              BLOCK=block, WRITE_MASK=write_mask, DOWNCAST=out_dtype != torch.float32,
                              INTERPRETED=INTERPRETED,
                              num_warps=_warps(block))
    return out.to(x.dtype), mask


def matching_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``like``'s strides (a copy only when they differ: e.g. an expanded gradient)."""
    if grad.stride() == like.stride() and grad.shape == like.shape:
        return grad
    matched = torch.empty_like(like, dtype=grad.dtype)
    matched.copy_(grad)
    return matched


def masked_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``where(mask, grad, 0)`` in one pass, in ``grad``'s dtype and ``mask``'s layout."""
    grad = matching_layout(grad, mask)
    out = torch.empty_like(grad)
    if grad.numel() == 0:
        return out
    block = _MAX_BLOCK
    with _device_guard(grad):
        _masked_grad_kernel[(triton.cdiv(grad.numel(), block),)](grad, mask, out, grad.numel(), BLOCK=block,
                                                                  num_warps=_warps(block))
    return out


def lsq_backward(x: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 quant_min: int, quant_max: int, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad of x in ``grad``'s dtype, fp32 grad of ``scale`` shaped like ``scale``) of the LSQ
    fake-quant; ``x`` as the forward saw it (dense, see :func:`dense`)."""
    grad = matching_layout(grad, x)
    grad_x = torch.empty_like(grad)
    outer, channels, inner = _rows(x, axis)
    if x.numel() == 0:
        return grad_x, torch.zeros_like(scale, dtype=torch.float32)
    block = _block(inner)
    blocks_per_row = triton.cdiv(inner, block)
    programs = outer * channels * blocks_per_row
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    with _device_guard(x):
        _lsq_backward_kernel[(programs,)](x, grad, scale, zero_point, grad_x, partials,
                                          inner, channels, blocks_per_row, quant_min, quant_max,
                                          BLOCK=block, INTERPRETED=INTERPRETED, num_warps=_warps(block))
    grad_scale = partials.view(outer, channels, blocks_per_row).sum(dim=(0, 2))
    return grad_x, grad_scale.reshape(scale.shape)
