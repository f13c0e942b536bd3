"""EfQAT partial weight gradients: linear/conv custom ops whose backward computes dW only for the
trainable output rows.

EfQAT freezes unimportant output rows (linear) / output channels (conv). A frozen row gets no
weight gradient; the input gradient and the bias gradient are still complete. Masking a full
weight gradient would save nothing, so the backward here runs the weight-gradient GEMM only on
the rows in ``row_index`` and scatters the result into a zero tensor shaped like the weight
(autograd requires that shape). An empty ``row_index`` (a fully frozen layer, LWPN) runs no
weight-gradient GEMM at all.

Ops (namespace ``qatgraph``, registered with ``torch.library``; fake impls make them work under
``torch.compile``; an autocast rule casts to the *current* autocast dtype)::

    masked_linear(x, weight, bias?, row_index) -> y          # y = F.linear(x, weight, bias)
    masked_conv(x, weight, bias?, row_index, stride, padding, dilation, groups) -> y
                                                              # F.conv1d/2d/3d by weight.dim()
    conv_weight_grad_rows(...)            # grouped conv, more rows than groups (helper op)
    partial_wgrad_linear_triton(...)      # CUDA only: the Triton kernel

``row_index`` is a 1-D int64 tensor of trainable output rows, sorted and unique (see
:func:`check_row_index`), on the weight's device; it may be empty.

Which path computes the compact weight gradient, and why:

* linear, CUDA with Triton importable: ``qatgraph/kernels/partial_wgrad_triton.py`` gathers the
  selected columns of dY inside the kernel (no ``(M, R)`` copy) and splits the M reduction so
  small ``R`` still fills the GPU.
* linear otherwise (CPU, no Triton, unsupported dtype): ``dY.index_select(1, rows).T @ X``.
* conv, every device: ``aten.convolution_backward`` (cuDNN on CUDA) on ``dY`` restricted to the
  selected channels. An im2col-free Triton conv weight-gradient competitive with cuDNN across
  strides, dilations and groups is a project of its own; the channel gather costs one pass over
  ``(N, R, *spatial)``, small next to the convolution, and cuDNN's work scales with ``R``.
  groups == 1 gives one dense call. groups > 1 and ``R <= groups`` (depthwise, sparse rows) makes
  every selected row its own group over a gathered copy of its group's input channels
  (``R * C_in/groups <= C_in`` channels, so the copy is never larger than the input). groups > 1
  and ``R > groups`` loops over the touched groups inside the opaque ``conv_weight_grad_rows`` op,
  because how many rows fall in each group is data-dependent (``torch.compile`` cannot trace it).
  Every path does exactly the FLOPs of the selected rows.

Padding must be given as integers (resolve ``padding="same"`` / non-zero ``padding_mode`` before
calling, as ``nn.Conv*`` does with ``F.pad``). Transposed convolutions are not supported.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from qatgraph.errors import BackendUnavailableError, QatgraphError
from qatgraph.kernels import triton_available

logger = logging.getLogger(__name__)

__all__ = [
    "check_row_index", "masked_conv", "masked_linear",
    "partial_weight_grad_conv", "partial_weight_grad_linear",
]

_aten = torch.ops.aten
_CONV_BY_DIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- compact weight gradients (linear)
def _linear_wgrad_torch(grad_out: Tensor, x: Tensor, row_index: Tensor) -> Tensor:
    if row_index.numel() == grad_out.shape[1]:  # all rows trainable: no gather needed
        return grad_out.t().mm(x)
    return grad_out.index_select(1, row_index).t().mm(x)


@torch.library.custom_op("qatgraph::partial_wgrad_linear_triton", mutates_args=(), device_types="cuda")
def _partial_wgrad_linear_triton(grad_out: Tensor, x: Tensor, row_index: Tensor, out_dtype: torch.dtype) -> Tensor:
    from qatgraph.kernels.partial_wgrad_triton import partial_wgrad_triton

    return partial_wgrad_triton(grad_out, x, row_index, out_dtype=out_dtype)


@_partial_wgrad_linear_triton.register_fake
def _(grad_out: Tensor, x: Tensor, row_index: Tensor, out_dtype: torch.dtype) -> Tensor:
    return x.new_empty((row_index.shape[0], x.shape[1]), dtype=out_dtype)


def partial_weight_grad_linear(
    grad_out: Tensor, x: Tensor, row_index: Tensor, *, backend: Literal["auto", "torch", "triton"] = "auto",
) -> Tensor:
    """Compact weight gradient ``(len(row_index), in_features)`` = ``dY[:, rows].T @ X``.

    ``grad_out`` is ``(..., out_features)``, ``x`` is ``(..., in_features)``; leading dimensions
    are flattened. ``backend="auto"`` uses the Triton kernel for CUDA tensors when Triton is
    importable, else torch; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    if backend not in ("auto", "torch", "triton"):
        raise QatgraphError(f"partial_weight_grad_linear: backend={backend!r} is not one of 'auto', "
                            "'torch', 'triton'")
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    x = x.reshape(-1, x.shape[-1])
    if row_index.numel() == 0:
        return x.new_zeros((0, x.shape[1]))
    use_triton = backend == "triton" or (
        backend == "auto" and grad_out.is_cuda and triton_available()
        and grad_out.dtype in _TRITON_DTYPES and x.dtype in _TRITON_DTYPES
    )
    if not use_triton:
        return _linear_wgrad_torch(grad_out, x, row_index)
    if not triton_available():
        raise BackendUnavailableError(
            "partial_weight_grad_linear(backend='triton'): triton is not importable here; "
            "install triton or use backend='auto' to fall back to the torch path"
        )
    if grad_out.is_cuda:
        return torch.ops.qatgraph.partial_wgrad_linear_triton(grad_out, x, row_index, x.dtype)
    from qatgraph.kernels.partial_wgrad_triton import partial_wgrad_triton

    return partial_wgrad_triton(grad_out, x, row_index, out_dtype=x.dtype)


# ------------------------------------------------------------------ compact weight gradients (conv)
def _conv_wgrad_call(grad_out: Tensor, x: Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    # convolution_backward only reads the weight's shape for dW; an expanded scalar is free.
    weight_like = grad_out.new_empty(1).expand(*weight_shape)
    return _aten.convolution_backward(
        grad_out, x, weight_like, None, stride, padding, dilation, False, [0] * len(stride), groups,
        [False, True, False],
    )[1]


def _conv_wgrad_row_groups(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: Sequence[int],
                           stride, padding, dilation, groups: int) -> Tensor:
    """groups > 1, R <= groups: each selected row becomes its own group over its input channels."""
    in_per_group, out_per_group = weight_shape[1], weight_shape[0] // groups
    group_of_row = torch.div(row_index, out_per_group, rounding_mode="floor")
    offsets = torch.arange(in_per_group, device=row_index.device, dtype=row_index.dtype)
    in_channels = (group_of_row[:, None] * in_per_group + offsets).reshape(-1)
    rows = row_index.shape[0]
    return _conv_wgrad_call(grad_out.index_select(1, row_index), x.index_select(1, in_channels),
                            [rows, *weight_shape[1:]], stride, padding, dilation, rows)


def _conv_wgrad_group_loop(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: Sequence[int],
                           stride, padding, dilation, groups: int) -> Tensor:
    """groups > 1, R > groups: one dense call per touched group (rows sorted, so contiguous).
    Reads the index on the host, hence wrapped in the opaque op below for torch.compile."""
    in_per_group, out_per_group = weight_shape[1], weight_shape[0] // groups
    group_of_row = torch.div(row_index, out_per_group, rounding_mode="floor")
    touched, counts = torch.unique_consecutive(group_of_row, return_counts=True)
    pieces, start = [], 0
    for group, count in zip(touched.tolist(), counts.tolist()):
        rows = row_index[start:start + count]
        start += count
        pieces.append(_conv_wgrad_call(
            grad_out.index_select(1, rows), x.narrow(1, group * in_per_group, in_per_group),
            [count, *weight_shape[1:]], stride, padding, dilation, 1))
    return torch.cat(pieces, dim=0)


@torch.library.custom_op("qatgraph::conv_weight_grad_rows", mutates_args=())
def _conv_weight_grad_rows(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: list[int],
                           stride: list[int], padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return _conv_wgrad_group_loop(grad_out, x, row_index, weight_shape, stride, padding, dilation, groups)


@_conv_weight_grad_rows.register_fake
def _(grad_out, x, row_index, weight_shape, stride, padding, dilation, groups):
    return grad_out.new_empty((row_index.shape[0], *weight_shape[1:]))


def partial_weight_grad_conv(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: Sequence[int],
                             stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                             groups: int) -> Tensor:
    """Compact conv weight gradient ``(len(row_index), C_in/groups, *kernel)`` for batched inputs."""
    weight_shape, rows = list(weight_shape), row_index.shape[0]
    args = (list(stride), list(padding), list(dilation))
    if rows == 0:
        return grad_out.new_zeros((0, *weight_shape[1:]))
    if rows == weight_shape[0]:  # all rows trainable (row_index == arange): the plain call
        return _conv_wgrad_call(grad_out, x, weight_shape, *args, groups)
    if groups == 1:
        return _conv_wgrad_call(grad_out.index_select(1, row_index), x, [rows, *weight_shape[1:]], *args, 1)
    if rows <= groups:
        return _conv_wgrad_row_groups(grad_out, x, row_index, weight_shape, *args, groups)
    return torch.ops.qatgraph.conv_weight_grad_rows(grad_out, x, row_index, weight_shape, *args, groups)


# ------------------------------------------------------------------------------- the forward ops
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


# ------------------------------------------------------------------------------------- autograd
def _save_common(ctx, inputs) -> None:
    x, weight, _bias, row_index = inputs[:4]
    needs_x, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    # Keep only what backward reads: X for dW, W for dX.
    ctx.save_for_backward(x if needs_weight else None, weight if needs_x else None, row_index)
    ctx.x_shape, ctx.weight_shape, ctx.weight_dtype = x.shape, weight.shape, weight.dtype


def _scatter_rows(compact: Tensor, row_index: Tensor, ctx) -> Tensor:
    full = compact.new_zeros(ctx.weight_shape, dtype=ctx.weight_dtype)
    return full.index_copy_(0, row_index, compact.to(ctx.weight_dtype))


def _linear_setup_context(ctx, inputs, output) -> None:
    _save_common(ctx, inputs)


def _linear_backward(ctx, grad_out: Tensor):
    x, weight, row_index = ctx.saved_tensors
    grad_x = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_out.matmul(weight.to(grad_out.dtype))
    if ctx.needs_input_grad[1]:
        compact = partial_weight_grad_linear(grad_out, x.to(grad_out.dtype), row_index)
        grad_weight = _scatter_rows(compact, row_index, ctx)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_x, grad_weight, grad_bias, None


def _conv_setup_context(ctx, inputs, output) -> None:
    _save_common(ctx, inputs)
    ctx.stride, ctx.padding, ctx.dilation, ctx.groups = inputs[4:8]


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
            grad_out, grad_out.new_empty(1).expand(x_shape), weight.to(grad_out.dtype), None, *conv_args, False, [0] * len(ctx.stride), ctx.groups,
            [True, False, False],
        )[0]
        grad_x = grad_x.squeeze(0) if unbatched else grad_x
    if ctx.needs_input_grad[1]:
        compact = partial_weight_grad_conv(grad_out, x.to(grad_out.dtype), row_index, ctx.weight_shape,
                                           *conv_args, ctx.groups)
        grad_weight = _scatter_rows(compact, row_index, ctx)
    if ctx.needs_input_grad[2]:
        grad_bias = grad_out.sum(dim=[d for d in range(grad_out.dim()) if d != 1])
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


_masked_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_masked_conv.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# --------------------------------------------------------------------------------------- autocast
_LIB = torch.library.Library("qatgraph", "FRAGMENT")


def _register_autocast(op_name: str, device_type: str) -> None:
    """Like torch.library.register_autocast, but casts to the autocast dtype active at call time
    (torch's version fixes one dtype at registration; users pick fp16 or bf16 per region)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key_name))
    op = getattr(torch.ops.qatgraph, op_name).default

    def cast(value, dtype):
        # Same eligibility as native autocast: floating, on this device, not float64.
        eligible = (isinstance(value, Tensor) and value.is_floating_point()
                    and value.device.type == device_type and value.dtype != torch.float64)
        return value.to(dtype) if eligible else value

    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(cast(arg, dtype) for arg in args))

    _LIB.impl(op_name, kernel, key_name, with_keyset=True)


for _op_name in ("masked_linear", "masked_conv"):
    for _device_type in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device_type):
            _register_autocast(_op_name, _device_type)


# ------------------------------------------------------------------------ FLOP formulas (counter)
@register_flop_formula(torch.ops.qatgraph.masked_linear)
def _masked_linear_flops(x_shape, w_shape, bias_shape, rows_shape, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


@register_flop_formula(torch.ops.qatgraph.masked_conv)
def _masked_conv_flops(x_shape, w_shape, bias_shape, rows_shape, *args, out_shape=None, **kwargs) -> int:
    if len(x_shape) == len(w_shape) - 1:
        x_shape, out_shape = [1, *x_shape], [1, *out_shape]
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


@register_flop_formula(torch.ops.qatgraph.conv_weight_grad_rows)
def _conv_rows_flops(grad_shape, x_shape, rows_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * math.prod(grad_shape[2:]) * math.prod(out_shape)


@register_flop_formula(torch.ops.qatgraph.partial_wgrad_linear_triton)
def _triton_rows_flops(grad_shape, x_shape, rows_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * rows_shape[0] * x_shape[1]


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
    return torch.ops.qatgraph.masked_linear(x, weight, bias, row_index)


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

    return torch.ops.qatgraph.masked_conv(x, weight, bias, row_index, expand(stride, "stride"),
                                          expand(padding, "padding"), expand(dilation, "dilation"), int(groups))
