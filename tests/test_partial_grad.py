"""Tests for qatgraph.ops.partial_grad: EfQAT masked linear/conv ops.

Reference: full autograd gradients of F.linear / F.conv*d with the frozen rows of dW zeroed
(tests/partial_grad_cases.py), also under gradcheck, torch.compile, CPU autocast and on CUDA;
argument validation. FLOP tests and the weight-gradient strategies:
tests/test_partial_grad_flops_and_strategies.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from partial_grad_cases import check_conv, compare_grads, fresh_leaves, row_index
from torch.utils._python_dispatch import TorchDispatchMode

from qatgraph.errors import QatgraphError
from qatgraph.ops.partial_grad import (
    check_row_index,
    masked_conv,
    masked_linear,
    partial_weight_grad_conv,
    partial_weight_grad_linear,
)


# ------------------------------------------------------------------------------ conv gradients
# 8 output channels, groups=2: <= 2 rows take the per-row-group path, more rows the group loop.
@pytest.mark.parametrize("rows_spec", ["empty", "full", [5], [1, 6], [0, 1, 2, 3, 4], 3, 6])
def test_conv2d_groups2_stride2_dilation2_padding1(rows_spec):
    check_conv((2, 6, 11, 10), (8, 3, 3, 3), rows_spec, stride=2, padding=1, dilation=2, groups=2)


# 6 input channels, groups=6: plain depthwise (6 outputs) and channel multiplier 2 (12 outputs);
# with 12 outputs, 9 rows > groups takes the group loop.
@pytest.mark.parametrize("out_channels,rows_spec", [
    (6, "empty"), (6, "full"), (6, [0]), (6, 3), (6, 5),
    (12, "empty"), (12, "full"), (12, [0, 1]), (12, 5), (12, 9),
])
def test_depthwise_conv2d(out_channels, rows_spec):
    check_conv((2, 6, 7, 7), (out_channels, 1, 3, 3), rows_spec, padding=1, groups=6)


@pytest.mark.parametrize("rows_spec", ["empty", "full", 1, 4])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv1d(rows_spec, groups):
    check_conv((3, 4, 13), (6, 4 // groups, 3), rows_spec, stride=2, padding=2, dilation=2, groups=groups)


@pytest.mark.parametrize("rows_spec", ["empty", "full", 1, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_conv3d(rows_spec, groups):
    check_conv((2, 4, 5, 6, 5), (4, 4 // groups, 3, 2, 3), rows_spec, stride=(1, 2, 1), padding=1, groups=groups)


def test_unbatched_conv2d_input():
    check_conv((4, 8, 8), (6, 4, 3, 3), [0, 4], padding=1)


def test_conv_without_bias_and_frozen_input():
    x, weight = torch.randn(2, 3, 6, 6), torch.randn(5, 3, 3, 3, requires_grad=True)
    rows = torch.tensor([1, 3])
    masked_conv(x, weight, None, rows, 1, 1).sum().backward()
    reference = weight.detach().clone().requires_grad_()
    F.conv2d(x, reference, None, 1, 1).sum().backward()
    torch.testing.assert_close(weight.grad[rows], reference.grad[rows])
    assert torch.count_nonzero(weight.grad[[0, 2, 4]]) == 0


# ---------------------------------------------------------------------------- linear gradients
@pytest.mark.parametrize("x_shape", [(7, 12), (3, 5, 12), (12,)])
@pytest.mark.parametrize("rows_spec", ["empty", "full", [9], 4])
def test_linear(x_shape, rows_spec):
    torch.manual_seed(1)
    x, weight, bias = torch.randn(x_shape), torch.randn(10, 12), torch.randn(10)
    compare_grads(masked_linear, F.linear, x, weight, bias, row_index(rows_spec, 10))


def test_partial_weight_grad_linear_is_compact():
    grad_out, x = torch.randn(2, 9, 10), torch.randn(2, 9, 12)
    rows = torch.tensor([0, 7, 8])
    compact = partial_weight_grad_linear(grad_out, x, rows)
    assert compact.shape == (3, 12)
    torch.testing.assert_close(compact, (grad_out.reshape(-1, 10).t() @ x.reshape(-1, 12))[rows])
    assert partial_weight_grad_linear(grad_out, x, rows[:0]).shape == (0, 12)


# --------------------------------------------------------------------------------- gradcheck
@pytest.fixture
def one_thread():
    """gradcheck runs hundreds of tiny ops; intra-op threads only add overhead (10x on a busy box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gradcheck_through_trainable_rows(op, x, weight, bias, rows):
    """gradcheck sees frozen rows as constants: dW is checked on the trainable rows only."""
    frozen_weight = weight.detach()

    def function(x, trainable_rows, bias):
        return op(x, frozen_weight.index_copy(0, rows, trainable_rows), bias, rows)

    trainable = weight.detach()[rows].clone().requires_grad_()
    assert torch.autograd.gradcheck(function, (x, trainable, bias), eps=1e-6, atol=1e-5)


def test_gradcheck_linear_float64(one_thread):
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    _gradcheck_through_trainable_rows(masked_linear, x, weight, bias, torch.tensor([1, 2, 5]))


@pytest.mark.parametrize("rows", [[3], [0, 2, 3]])  # R <= groups and R > groups paths
def test_gradcheck_conv2d_float64(rows, one_thread):
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def op(x, weight, bias, rows):
        return masked_conv(x, weight, bias, rows, 2, 1, 1, 2)

    _gradcheck_through_trainable_rows(op, x, weight, bias, torch.tensor(rows))


# ----------------------------------------------------------------------------- torch.compile
def _compiled_matches_eager(backend):
    cases = [
        (lambda x, w, b, r: masked_linear(x, w, b, r), ((3, 4, 8), (6, 8), (6,)), [[1, 4], [], [0, 2, 3, 5]]),
        (lambda x, w, b, r: masked_conv(x, w, b, r, 1, 1, 1, 4), ((2, 8, 6, 6), (8, 2, 3, 3), (8,)),
         [[1, 4], [0, 1, 2, 3, 5]]),
    ]
    for function, shapes, row_lists in cases:
        torch._dynamo.reset()
        compiled = torch.compile(function, backend=backend)
        for rows in row_lists:
            rows = torch.tensor(rows, dtype=torch.int64)
            tensors = [torch.randn(shape) for shape in shapes]
            compiled_leaves, eager_leaves = fresh_leaves(*tensors), fresh_leaves(*tensors)
            compiled(*compiled_leaves, rows).square().sum().backward()
            function(*eager_leaves, rows).square().sum().backward()
            for got, want in zip(compiled_leaves, eager_leaves):
                torch.testing.assert_close(got.grad, want.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    _compiled_matches_eager(backend)


@pytest.mark.slow
def test_torch_compile_inductor_cpu():
    _compiled_matches_eager("inductor")


# ------------------------------------------------------------------------------------ autocast
class _OpInputDtypes(TorchDispatchMode):
    """Records the floating input dtypes that reach qatgraph::masked_linear (the compiled form) and
    the GEMM inside the eager form (aten.addmm: bias, input, weight^T)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.qatgraph.masked_linear.default, torch.ops.aten.addmm.default):
            self.dtypes.append(tuple(a.dtype for a in args[:3]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_follows_the_active_dtype(dtype):
    torch.manual_seed(2)
    x, weight, bias = torch.randn(6, 16), torch.randn(8, 16), torch.randn(8)
    rows = torch.tensor([0, 3, 4])
    masked, reference = fresh_leaves(x, weight, bias), fresh_leaves(x, weight, bias)
    with torch.autocast("cpu", dtype=dtype):
        out_masked = masked_linear(*masked, rows)
        out_ref = F.linear(*reference)
    assert out_masked.dtype == out_ref.dtype == dtype
    # Eager: the autograd function casts like autocast would and runs its GEMM in that dtype.
    with _OpInputDtypes() as seen, torch.autocast("cpu", dtype=dtype):
        masked_linear(*masked, rows)
    assert seen.dtypes == [(dtype, dtype, dtype)]
    # Compiled form: the autocast rule casts the inputs (differentiably, outside the op) and runs the
    # op without autocast, so the op itself only ever sees the autocast dtype (its fake impl stays exact).
    with _OpInputDtypes() as seen, torch.autocast("cpu", dtype=dtype):
        torch.ops.qatgraph.masked_linear(*masked, rows)
    assert seen.dtypes[0] == (dtype, dtype, dtype)
    out_masked.float().sum().backward()
    out_ref.float().sum().backward()
    assert masked[1].grad.dtype == torch.float32  # grads land in the parameter dtype
    torch.testing.assert_close(masked[0].grad, reference[0].grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(masked[1].grad[rows], reference[1].grad[rows], atol=2e-2, rtol=2e-2)
    assert torch.count_nonzero(masked[1].grad[[1, 2, 5, 6, 7]]) == 0


def test_autocast_cpu_conv_bf16():
    x, weight = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = masked_conv(x, weight, None, torch.tensor([1, 5]), 1, 1, 1, 2)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    assert torch.count_nonzero(weight.grad[[0, 2, 3, 4]]) == 0 and torch.count_nonzero(weight.grad[1]) > 0


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("rows,message", [
    (torch.tensor([2, 1]), "sorted and unique"), (torch.tensor([1, 1]), "sorted and unique"),
    (torch.tensor([0, 6]), r"\[0, 6\)"), (torch.tensor([-1]), r"\[0, 6\)"),
    (torch.tensor([0, 1], dtype=torch.int32), "int64"),
])
def test_check_row_index_rejects_bad_indices(rows, message):
    with pytest.raises(QatgraphError, match=message):
        check_row_index(rows, 6)


def test_check_row_index_accepts_good_indices():
    check_row_index(torch.tensor([0, 2, 5]), 6)
    check_row_index(torch.zeros(0, dtype=torch.int64), 6)


def test_helpers_reject_bad_arguments():
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(QatgraphError, match="integer padding"):
        masked_conv(x, weight, None, torch.tensor([0]), padding="same")
    with pytest.raises(QatgraphError, match="needs 2"):
        masked_conv(x, weight, None, torch.tensor([0]), stride=(1, 1, 1))
    with pytest.raises(QatgraphError, match="int64"):
        masked_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.tensor([0.0]))
    with pytest.raises(QatgraphError, match="not one of"):
        partial_weight_grad_linear(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0]), backend="cuda")


def test_partial_weight_grad_conv_full_rows_equals_plain_weight_grad():
    grad_out, x = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    compact = partial_weight_grad_conv(grad_out, x, torch.arange(6), [6, 3, 3, 3], [1, 1], [1, 1], [1, 1], 2)
    torch.testing.assert_close(compact, torch.nn.grad.conv2d_weight(x, (6, 3, 3, 3), grad_out, 1, 1, 1, 2))


# --------------------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_linear_and_conv_match_reference(dtype):
    torch.manual_seed(3)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype != torch.float32 else {"atol": 1e-3, "rtol": 1e-3}
    x, weight, bias = (t.cuda().to(dtype) for t in (torch.randn(4, 300, 96), torch.randn(200, 96), torch.randn(200)))
    rows = row_index(37, 200).cuda()
    compare_grads(masked_linear, F.linear, x, weight, bias, rows, **tolerance)
    x, weight = torch.randn(2, 8, 9, 9).cuda().to(dtype), torch.randn(8, 4, 3, 3).cuda().to(dtype)
    compare_grads(lambda xm, wm, bm, r: masked_conv(xm, wm, bm, r, 2, 1, 2, 2),
                  lambda xr, wr, br: F.conv2d(xr, wr, br, 2, 1, 2, 2), x, weight, None, row_index(3, 8).cuda(),
                  **tolerance)
