"""EfQAT's weight gradient restricted to the trainable output rows, and how it is computed.

:func:`masked_weight_grad_linear` / :func:`masked_weight_grad_conv` return a weight-shaped
gradient whose frozen rows are zero (what autograd needs), computed by one of three strategies:

* ``gather``: the GEMM / cuDNN weight-gradient call on the trainable rows only (``dY`` restricted
  to those rows), scattered into zeros. Exactly the FLOPs of the selected rows; the default on the
  CPU and inside ``torch.compile``.
* ``triton`` (linear on CUDA): :mod:`qatgraph.kernels.partial_wgrad_triton`, which gathers the
  rows of ``dY`` inside the kernel instead of copying them.
* ``full``: the ordinary full weight gradient, frozen rows zeroed afterwards. It does the work of
  full QAT, so a layer never costs more than full QAT does.

Which one is fastest depends on the shape, the dtype, the share of rows and the GPU (a small slice
of a GEMM runs at a fraction of the GPU's rate; on a 2-core CPU the saved FLOPs are all that
counts). So on CUDA the choice is made by measurement, never by hope: the first time a layer
shape, dtype and row share (in sixteenths of the rows) is seen, every strategy runs once as a
warm-up and three times timed (wall clock around a synchronized call, so launch overhead counts
too); the fastest is cached for the process and used from then on. The timing runs inside the
first backward of each shape (a few milliseconds) and never under ``torch.compile`` or CUDA graph
capture. ``QATGRAPH_PARTIAL_WGRAD=gather|triton|full`` forces one strategy (benchmarks, debugging).

The compact forms (``(R, ...)`` rows only) stay public as :func:`partial_weight_grad_linear` and
:func:`partial_weight_grad_conv`. Conv details: ``aten.convolution_backward`` (cuDNN on CUDA) on
``dY`` restricted to the selected channels; groups == 1 is one dense call; groups > 1 with
``R <= groups`` (depthwise, sparse rows) makes every selected row its own group over a gathered
copy of its group's input channels (never larger than the input); groups > 1 with ``R > groups``
loops over the touched groups inside the opaque ``qatgraph::conv_weight_grad_rows`` op (how many
rows fall in each group is data-dependent, which ``torch.compile`` cannot trace).
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from qatgraph.errors import BackendUnavailableError, QatgraphError
from qatgraph.kernels import triton_available

logger = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "chosen_strategies", "force_strategy", "masked_weight_grad_conv", "masked_weight_grad_linear",
           "partial_weight_grad_conv", "partial_weight_grad_linear"]

Strategy = Literal["gather", "triton", "full"]
STRATEGIES: tuple[Strategy, ...] = ("gather", "triton", "full")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_aten = torch.ops.aten
_CHOICES: dict[tuple, Strategy] = {}


# ------------------------------------------------------------------------------- compact (linear)
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
    are flattened. ``backend="auto"`` and ``"torch"`` gather with torch and call the GEMM;
    ``"triton"`` runs the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
    """
    if backend not in ("auto", "torch", "triton"):
        raise QatgraphError(f"partial_weight_grad_linear: backend={backend!r} is not one of 'auto', "
                            "'torch', 'triton'")
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    x = x.reshape(-1, x.shape[-1])
    if row_index.numel() == 0:
        return x.new_zeros((0, x.shape[1]))
    if backend != "triton":
        return _linear_wgrad_torch(grad_out, x, row_index)
    if not triton_available():
        raise BackendUnavailableError(
            "partial_weight_grad_linear(backend='triton'): triton is not importable here; "
            "install triton or use backend='auto' for the torch path")
    if grad_out.is_cuda:
        return torch.ops.qatgraph.partial_wgrad_linear_triton(grad_out, x, row_index, x.dtype)
    if os.environ.get("TRITON_INTERPRET") != "1":  # else Triton fails with "0 active drivers"
        raise BackendUnavailableError(
            f"partial_weight_grad_linear(backend='triton'): the tensors are on {grad_out.device}, and Triton runs on "
            "CUDA GPUs (CPU tensors only under TRITON_INTERPRET=1, for testing). Move the tensors to a GPU, or use "
            "backend='auto', which takes the torch path on the CPU.")
    from qatgraph.kernels.partial_wgrad_triton import partial_wgrad_triton

    return partial_wgrad_triton(grad_out, x, row_index, out_dtype=x.dtype)


# --------------------------------------------------------------------------------- compact (conv)
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


# ------------------------------------------------------------------- weight-shaped, by strategy
def _scatter(compact: Tensor, row_index: Tensor, weight_shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    return compact.new_zeros(weight_shape, dtype=dtype).index_copy_(0, row_index, compact.to(dtype))


def _zero_frozen(full: Tensor, row_index: Tensor, dtype: torch.dtype) -> Tensor:
    keep = torch.zeros(full.shape[0], dtype=dtype, device=full.device).index_fill_(0, row_index, 1)
    return full.to(dtype).mul_(keep.view(-1, *[1] * (full.dim() - 1)))


_UNSET = object()
_FORCED: object = _UNSET  # Strategy, None (measure), or _UNSET (environment not read yet)


def forced_strategy() -> Strategy | None:
    """The strategy forced by :func:`force_strategy` or ``QATGRAPH_PARTIAL_WGRAD`` (read once per
    process: this runs in every backward); ``None`` means measure."""
    global _FORCED
    if _FORCED is _UNSET:
        force_strategy(os.environ.get("QATGRAPH_PARTIAL_WGRAD", ""), source="QATGRAPH_PARTIAL_WGRAD")
    return _FORCED  # type: ignore[return-value]


def force_strategy(strategy: str | None, *, source: str = "force_strategy") -> None:
    """Use ``strategy`` for every partial weight gradient from now on; ``None``/``"auto"``: measure."""
    global _FORCED
    value = (strategy or "").strip().lower()
    if value not in ("", "auto", *STRATEGIES):
        raise QatgraphError(f"{source}={strategy!r} is not one of auto, {', '.join(STRATEGIES)}")
    _FORCED = None if value in ("", "auto") else value


def chosen_strategies() -> dict[tuple, Strategy]:
    """The strategies measured so far in this process, by (kind, device, dtype, shapes, row share)."""
    return dict(_CHOICES)


def _measurable(tensor: Tensor) -> bool:
    return tensor.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def _time(run: Callable[[], Tensor]) -> tuple[float, Tensor]:
    run()  # warm-up: Triton compilation, cuBLAS/cuDNN heuristics, the allocator
    best, result = math.inf, None
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def _choose(key: tuple, candidates: dict[Strategy, Callable[[], Tensor]], default: Strategy,
            device_tensor: Tensor) -> Tensor:
    forced = forced_strategy()
    if forced is not None and forced in candidates:
        return candidates[forced]()
    if not _measurable(device_tensor):
        return candidates[default]()
    choice = _CHOICES.get(key)
    if choice is not None:
        return candidates[choice]()
    timings, results = {}, {}
    for name, run in candidates.items():
        timings[name], results[name] = _time(run)
    choice = min(timings, key=timings.__getitem__)
    _CHOICES[key] = choice
    logger.info("EfQAT partial weight gradient %s: %s (%s)", key, choice,
                ", ".join(f"{name} {1e3 * seconds:.3f} ms" for name, seconds in timings.items()))
    return results[choice]


def _row_share(rows: int, total: int) -> int:
    return math.ceil(16 * rows / max(total, 1))


def masked_weight_grad_linear(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: Sequence[int],
                              weight_dtype: torch.dtype) -> Tensor:
    """Weight-shaped ``dY.T @ X`` with the rows outside ``row_index`` zero."""
    if row_index.numel() == 0:
        return grad_out.new_zeros(weight_shape, dtype=weight_dtype)
    grad_out = grad_out.reshape(-1, grad_out.shape[-1])
    x = x.reshape(-1, x.shape[-1])
    candidates: dict[Strategy, Callable[[], Tensor]] = {
        "gather": lambda: _scatter(_linear_wgrad_torch(grad_out, x, row_index), row_index, weight_shape, weight_dtype),
        "full": lambda: _zero_frozen(grad_out.t().mm(x), row_index, weight_dtype),
    }
    if grad_out.is_cuda and triton_available() and grad_out.dtype in _TRITON_DTYPES:
        candidates["triton"] = lambda: _scatter(
            torch.ops.qatgraph.partial_wgrad_linear_triton(grad_out, x, row_index, x.dtype), row_index,
            weight_shape, weight_dtype)
    key = ("linear", str(grad_out.device), grad_out.dtype, tuple(grad_out.shape), tuple(x.shape),
           _row_share(row_index.numel(), weight_shape[0]))
    return _choose(key, candidates, "gather", grad_out)


def masked_weight_grad_conv(grad_out: Tensor, x: Tensor, row_index: Tensor, weight_shape: Sequence[int],
                            weight_dtype: torch.dtype, stride: Sequence[int], padding: Sequence[int],
                            dilation: Sequence[int], groups: int) -> Tensor:
    """Weight-shaped convolution weight gradient with the output channels outside ``row_index`` zero."""
    if row_index.numel() == 0:
        return grad_out.new_zeros(weight_shape, dtype=weight_dtype)
    args = (list(stride), list(padding), list(dilation))
    candidates: dict[Strategy, Callable[[], Tensor]] = {
        "gather": lambda: _scatter(partial_weight_grad_conv(grad_out, x, row_index, weight_shape, *args, groups),
                                   row_index, weight_shape, weight_dtype),
        "full": lambda: _zero_frozen(_conv_wgrad_call(grad_out, x, list(weight_shape), *args, groups), row_index,
                                     weight_dtype),
    }
    key = ("conv", str(grad_out.device), grad_out.dtype, tuple(grad_out.shape), tuple(x.shape), tuple(weight_shape),
           *map(tuple, args), groups, _row_share(row_index.numel(), weight_shape[0]))
    return _choose(key, candidates, "gather", grad_out)


# ------------------------------------------------------------------------ FLOP formulas (counter)
@register_flop_formula(torch.ops.qatgraph.conv_weight_grad_rows)
def _conv_rows_flops(grad_shape, x_shape, rows_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * math.prod(grad_shape[2:]) * math.prod(out_shape)


@register_flop_formula(torch.ops.qatgraph.partial_wgrad_linear_triton)
def _triton_rows_flops(grad_shape, x_shape, rows_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * x_shape[0] * rows_shape[0] * x_shape[1]
