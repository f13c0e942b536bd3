"""EfQAT partial weight gradients: linear/conv operators whose backward computes dW only for the
trainable output rows.

EfQAT freezes unimportant output rows (linear) / output channels (conv). A frozen row gets no
weight gradient; the input gradient and the bias gradient are still complete. Masking a full
weight gradient would save nothing, so the backward computes the weight gradient of the rows in
``row_index`` only (how, and which way is fastest for a shape, is :mod:`.partial_wgrad`'s job) and
returns it weight-shaped with the frozen rows zero (autograd requires that shape). A layer with
no trainable row at all is never routed here: the EfQAT controller turns its weight's
``requires_grad`` off, so autograd skips every piece of its weight-gradient work.

Two equivalent forms of each operator:

* eager: a ``torch.autograd.Function`` (:class:`MaskedLinear`, :class:`MaskedConv`) -- the
  cheapest call path, which matters when a backward GEMM takes tens of microseconds (bf16 on a
  large GPU); under autocast it casts its inputs to the active autocast dtype itself, as
  ``F.linear``/``F.conv*`` would, and saves the cast copies autocast would have saved;
* ``torch.compile``: custom ops registered with ``torch.library`` (fake impls for tracing, an
  autocast rule that casts to the *current* autocast dtype)::

    masked_linear(x, weight, bias?, row_index) -> y          # y = F.linear(x, weight, bias)
    masked_conv(x, weight, bias?, row_index, stride, padding, dilation, groups) -> y
                                                              # F.conv1d/2d/3d by weight.dim()

Both share one backward. ``row_index`` is a 1-D int64 tensor of trainable output rows, sorted and
unique (see :func:`check_row_index`), on the weight's device; it may be empty. Padding must be given
as integers (resolve ``padding="same"`` / non-zero ``padding_mode`` before calling, as ``nn.Conv*``
does with ``F.pad``). Transposed convolutions are not supported.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from qatgraph.errors import QatgraphError

from .partial_wgrad import (
    masked_weight_grad_conv,
    masked_weight_grad_linear,
    partial_weight_grad_conv,
    partial_weight_grad_linear,
)

__all__ = [
    "check_row_index", "masked_conv", "masked_linear",
    "partial_weight_grad_conv", "partial_weight_grad_linear",
]

_aten = torch.ops.aten
_CONV_BY_DIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


# ------------------------------------------------------------------------------ shared backward
def _save(ctx, x: Tensor, weight: Tensor, row_index: Tensor, weight_dtype: torch.dtype) -> None:
    needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # Keep only what backward reads: X for dW, W for dX.
    ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None, row_index)
    ctx.x_shape, ctx.weight_shape, ctx.weight_dtype = x.shape, weight.shape, weight_dtype


def _linear_backward(ctx, grad_out: Tensor):
    x, weight, row_index = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out.matmul(weight.to(grad_out.dtype))
    if ctx.needs_input_grad[1]:
        grad_weight = masked_weight_grad_linear(grad_out, x.to(grad_out.dtype), row_index, ctx.weight_shape,
                                                ctx.weight_dtype)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_weight, grad_bias, None


def _conv_backward(ctx, grad_out: Tensor):
    x, weight, row_index = ctx.saved_tensors
    unbatched = len(ctx.x_shape) == len(ctx.weight_shape) - 1  # F.conv accepts (C, *spatial)
    if unbatched:
        grad_out = grad_out.unsqueeze(0)
        x = x.unsqueeze(0) if x is not None else None
    conv_args = (ctx.stride, ctx.padding, ctx.dilation)
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        x_shape = (1, *ctx.x_shape) if unbatched else ctx.x_shape
        grad_x = _aten.convolution_backward(  # dX reads only the input's shape
            grad_out, grad_out.new_empty(1).expand(x_shape), weight.to(grad_out.dtype), None, *conv_args, False,
            [0] * len(ctx.stride), ctx.groups, [True, False, False],
        )[0]
        grad_x = grad_x.squeeze(0) if unbatched else grad_x
    if ctx.needs_input_grad[1]:
        grad_weight = masked_weight_grad_conv(grad_out, x.to(grad_out.dtype), row_index, ctx.weight_shape,
                                              ctx.weight_dtype, *conv_args, ctx.groups)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


# ------------------------------------------------------------------------- eager: autograd functions
def _autocast_inputs(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """What autocast would hand a linear/conv: floating tensors on its device cast to its dtype."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.device.type == device_type
                 and t.dtype != torch.float64 else t for t in tensors)


def _without_autocast(device_type: str, function, *args):
    """``function(*args)`` with autocast off for ``device_type`` (entering the context only when it is on)."""
    if not torch.is_autocast_enabled(device_type):
        return function(*args)
    with torch.autocast(device_type, enabled=False):
        return function(*args)


class MaskedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor) -> Tensor:
        weight_dtype, device_type = weight.dtype, x.device.type
        x, weight, bias = _autocast_inputs(device_type, x, weight, bias)
        out = _without_autocast(device_type, F.linear, x, weight, bias)
        _save(ctx, x, weight, row_index, weight_dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _linear_backward(ctx, grad_out)


class MaskedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor, stride: list[int],
                padding: list[int], dilation: list[int], groups: int) -> Tensor:
        weight_dtype, device_type = weight.dtype, x.device.type
        x, weight, bias = _autocast_inputs(device_type, x, weight, bias)
        out = _without_autocast(device_type, _CONV_BY_DIM[weight.dim()], x, weight, bias, stride, padding, dilation,
                                groups)
        _save(ctx, x, weight, row_index, weight_dtype)
        ctx.stride, ctx.padding, ctx.dilation, ctx.groups = stride, padding, dilation, groups
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        return _conv_backward(ctx, grad_out)


# ----------------------------------------------------------------- torch.compile: custom ops
@torch.library.custom_op("qatgraph::masked_linear", mutates_args=())
def _masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor) -> Tensor:
    return F.linear(x, weight, bias)


@_masked_linear.register_fake
def _(x, weight, bias, row_index):
    return F.linear(x, weight, bias)


@torch.library.custom_op("qatgraph::masked_conv", mutates_args=())
def _masked_conv(x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return _CONV_BY_DIM[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


@_masked_conv.register_fake
def _(x, weight, bias, row_index, stride, padding, dilation, groups):
    return _CONV_BY_DIM[weight.dim()](x, weight, bias, stride, padding, dilation, groups)


def _linear_setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, row_index = inputs
    _save(ctx, x, weight, row_index, weight.dtype)


def _conv_setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, row_index = inputs[:4]
    _save(ctx, x, weight, row_index, weight.dtype)
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs[4:8]


_masked_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_masked_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)

_LIB = torch.library.Library("qatgraph", "FRAGMENT")


def _register_autocast(op_name: str, device_type: str) -> None:
    """Like torch.library.register_autocast, but casts to the autocast dtype active at call time
    (torch's version fixes one dtype at registration; users pick fp16 or bf16 per region)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = getattr(torch.ops.qatgraph, op_name).default

    def kernel(_keyset, *args):
        # Cast before excluding the key: is_autocast_enabled() reads that very exclusion.
        cast = _autocast_inputs(device_type, *(a if isinstance(a, Tensor) else None for a in args[:3]))
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*cast, *args[3:])

    _LIB.impl(op_name, kernel, key_name, with_keyset=True)


for _op_name in ("masked_linear", "masked_conv"):
    for _device_type in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device_type):
            _register_autocast(_op_name, _device_type)


@register_flop_formula(torch.ops.qatgraph.masked_linear)
def _masked_linear_flops(x_shape, w_shape, bias_shape, rows_shape, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.qatgraph.masked_conv)
def _masked_conv_flops(x_shape, w_shape, bias_shape, rows_shape, *args, out_shape=None, **kwargs) -> int:
    if len(x_shape) == len(w_shape) - 1:
        x_shape, out_shape = [1, *x_shape], [1, *out_shape]
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


# ------------------------------------------------------------------------------ public helpers
def check_row_index(row_index: Tensor, num_rows: int, where: str = "row_index") -> None:
    """Validate a trainable-row index: 1-D int64, sorted, unique, within ``[0, num_rows)``.

    Synchronizes with the device (reads values); call it when the index is built, not per step.
    """
    if not isinstance(row_index, Tensor) or row_index.dim() != 1 or row_index.dtype != torch.int64:
        got = f"{row_index.dim()}-D {row_index.dtype}" if isinstance(row_index, Tensor) else type(row_index).__name__
        raise QatgraphError(f"{where}: expected a 1-D int64 tensor of trainable rows, got {got}; "
                            "build it with torch.tensor(rows, dtype=torch.int64)")
    if row_index.numel() == 0:
        return
    low, high = int(row_index.min()), int(row_index.max())
    if low < 0 or high >= num_rows:
        raise QatgraphError(f"{where}: row indices must lie in [0, {num_rows}), got min {low}, max {high}")
    if row_index.numel() > 1 and not bool((row_index[1:] > row_index[:-1]).all()):
        raise QatgraphError(f"{where}: row indices must be sorted and unique; pass torch.unique(rows) "
                            "(which sorts) instead")


def _check_cheap(row_index: Tensor, weight: Tensor, where: str) -> None:
    # No device sync here: this runs every step.
    if row_index.dim() != 1 or row_index.dtype != torch.int64:
        raise QatgraphError(f"{where}: row_index must be a 1-D int64 tensor, got {row_index.dim()}-D "
                            f"{row_index.dtype}; build it with torch.tensor(rows, dtype=torch.int64)")
    if row_index.device != weight.device:
        raise QatgraphError(f"{where}: row_index is on {row_index.device} but the weight is on "
                            f"{weight.device}; move it with row_index.to(weight.device)")


def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is non-zero only in ``row_index`` rows."""
    _check_cheap(row_index, weight, "masked_linear")
    if torch.compiler.is_compiling():
        return torch.ops.qatgraph.masked_linear(x, weight, bias, row_index)
    return MaskedLinear.apply(x, weight, bias, row_index)


def masked_conv(x: Tensor, weight: Tensor, bias: Tensor | None, row_index: Tensor,
                stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                dilation: int | Sequence[int] = 1, groups: int = 1) -> Tensor:
    """``F.conv{1,2,3}d`` (picked by ``weight.dim()``) whose weight gradient is non-zero only in the
    output channels ``row_index``. ``padding`` must be integers (see the module docstring)."""
    _check_cheap(row_index, weight, "masked_conv")
    spatial = weight.dim() - 2
    if spatial not in (1, 2, 3):
        raise QatgraphError(f"masked_conv: weight must be 3-D, 4-D or 5-D (conv1d/2d/3d), got "
                            f"{weight.dim()}-D shape {tuple(weight.shape)}")
    if isinstance(padding, str):
        raise QatgraphError(f"masked_conv: padding={padding!r} is not supported; pass integer padding "
                            "(for 'valid' use 0, for 'same' pad the input with F.pad first)")

    def expand(value, name):
        values = [int(value)] * spatial if isinstance(value, int) else [int(v) for v in value]
        if len(values) != spatial:
            raise QatgraphError(f"masked_conv: {name}={value!r} has {len(values)} entries; a "
                                f"{spatial}-D convolution needs {spatial}")
        return values

    args = (expand(stride, "stride"), expand(padding, "padding"), expand(dilation, "dilation"), int(groups))
    if torch.compiler.is_compiling():
        return torch.ops.qatgraph.masked_conv(x, weight, bias, row_index, *args)
    return MaskedConv.apply(x, weight, bias, row_index, *args)
