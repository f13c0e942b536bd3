"""Tests for qatgraph.ops.partial_grad's weight-gradient work: EfQAT masked linear/conv ops.

FLOP tests prove the weight-gradient work scales with the number of trainable rows; every
weight-gradient strategy (qatgraph.ops.partial_wgrad: gather, full) gives the masked weight gradient,
the CPU picks one without measuring, and a GPU records its measured choice.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from partial_grad_cases import check_conv, compare_grads, row_index
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from qatgraph.errors import QatgraphError
from qatgraph.ops import partial_wgrad
from qatgraph.ops.partial_grad import (
    masked_conv,
    masked_linear,
)


# -------------------------------------------------------------------------- FLOPs shrink with R
def _backward_flops(forward, rows):
    output = forward(rows)
    with FlopCounterMode(display=False) as counter:
        output.backward(torch.ones_like(output))
    return counter.get_total_flops()


def test_linear_backward_flops_scale_with_rows():
    tokens, in_features, out_features = 64, 32, 48
    x = torch.randn(tokens, in_features, requires_grad=True)
    weight = torch.randn(out_features, in_features, requires_grad=True)
    input_grad_flops = 2 * tokens * in_features * out_features
    for num_rows in (0, 12, 48):
        flops = _backward_flops(lambda r: masked_linear(x, weight, None, r), torch.arange(num_rows))
        assert flops == input_grad_flops + 2 * tokens * num_rows * in_features
    # A layer with no trainable rows and no input gradient runs no GEMM in backward at all.
    frozen_input = x.detach()
    assert _backward_flops(lambda r: masked_linear(frozen_input, weight, None, r), torch.arange(0)) == 0


class _ExactConvWork(TorchDispatchMode):
    """Counts multiply-adds x2 of aten.convolution_backward exactly, groups included.

    FlopCounterMode's convolution_backward formula ignores ``groups`` for the weight gradient
    (it charges C_in, not C_in/groups), so grouped layers would be over-counted. The opaque
    group-loop op is expanded into its implementation so its aten calls are counted too.
    """

    def __init__(self):
        super().__init__()
        self.weight_grad = self.input_grad = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.qatgraph.conv_weight_grad_rows.default:
            with self:
                return partial_wgrad._conv_wgrad_group_loop(*args)
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.convolution_backward.default:
            grad_out, weight, output_mask = args[0], args[2], args[10]
            positions = grad_out.shape[0] * math.prod(grad_out.shape[2:])
            self.input_grad += 2 * positions * math.prod(weight.shape) if output_mask[0] else 0
            self.weight_grad += 2 * positions * math.prod(out[1].shape) if output_mask[1] else 0
        return out


@pytest.mark.parametrize("weight_shape,groups", [((16, 8, 3, 3), 1), ((16, 1, 3, 3), 16), ((16, 2, 3, 3), 4)])
def test_conv_backward_work_scales_with_rows(weight_shape, groups):
    x = torch.randn(2, weight_shape[1] * groups, 10, 10, requires_grad=True)
    weight = torch.randn(weight_shape, requires_grad=True)
    positions = 2 * 10 * 10
    full_weight_grad = 2 * positions * math.prod(weight_shape)
    for num_rows in (0, 2, 4, 8, 16):  # with groups=4, 8 rows > groups takes the opaque group-loop op
        rows = torch.arange(0, 2 * num_rows, 2) if num_rows < 16 else torch.arange(16)
        output = masked_conv(x, weight, None, rows, 1, 1, 1, groups)
        with _ExactConvWork() as work:
            output.backward(torch.ones_like(output))
        assert work.input_grad == full_weight_grad  # dX costs what a full dW would
        assert work.weight_grad == full_weight_grad * num_rows // 16


def test_group_loop_implementation_flops_match_its_formula():
    """The opaque op is counted by its registered formula; the real aten work must agree."""
    grad_out, x = torch.randn(2, 16, 10, 10), torch.randn(2, 8, 10, 10)
    rows = torch.tensor([0, 1, 2, 5, 9, 10, 11, 15])
    args = ([16, 2, 3, 3], [1, 1], [1, 1], [1, 1], 4)
    with FlopCounterMode(display=False) as implementation:
        compact = partial_wgrad._conv_wgrad_group_loop(grad_out, x, rows, *args)
    with FlopCounterMode(display=False) as formula:
        torch.ops.qatgraph.conv_weight_grad_rows(grad_out, x, rows, *args)
    assert implementation.get_total_flops() == formula.get_total_flops() > 0
    full = torch.ops.aten.convolution_backward(grad_out, x, torch.empty(16, 2, 3, 3), None, [1, 1], [1, 1],
                                               [1, 1], False, [0, 0], 4, [False, True, False])[1]
    torch.testing.assert_close(compact, full[rows])


# ------------------------------------------------------------------------ weight-gradient strategies
@pytest.fixture
def strategy():
    """Force a partial weight-gradient strategy for one test, then go back to measuring."""
    yield partial_wgrad.force_strategy
    partial_wgrad.force_strategy(None)


@pytest.mark.parametrize("name", ["gather", "full"])
def test_every_strategy_gives_the_masked_weight_gradient(strategy, name):
    strategy(name)
    torch.manual_seed(5)
    x, weight, bias = torch.randn(3, 7, 12), torch.randn(9, 12), torch.randn(9)
    compare_grads(masked_linear, F.linear, x, weight, bias, row_index(4, 9))
    check_conv((2, 8, 7, 7), (8, 2, 3, 3), [1, 2, 6], stride=2, padding=1, groups=4)
    check_conv((2, 6, 7, 7), (6, 6, 3, 3), 2, padding=1)


def test_cpu_uses_gather_without_measuring(strategy):
    strategy(None)
    before = dict(partial_wgrad.chosen_strategies())
    x = torch.randn(4, 8)
    weight = torch.randn(6, 8, requires_grad=True)
    masked_linear(x, weight, None, torch.tensor([1, 2])).sum().backward()
    assert partial_wgrad.chosen_strategies() == before, "no timing on the CPU: FLOPs saved are what counts there"


def test_unknown_strategy_is_rejected(monkeypatch):
    monkeypatch.setattr(partial_wgrad, "_FORCED", partial_wgrad._UNSET)
    monkeypatch.setenv("QATGRAPH_PARTIAL_WGRAD", "fastest")
    with pytest.raises(QatgraphError, match="QATGRAPH_PARTIAL_WGRAD='fastest' is not one of auto, gather"):
        partial_wgrad.forced_strategy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_measured_choice_is_recorded_and_every_strategy_agrees(strategy, dtype):
    torch.manual_seed(4)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype != torch.float32 else {"atol": 1e-3, "rtol": 1e-3}
    x, weight, bias = (t.cuda().to(dtype) for t in (torch.randn(8, 512, 256), torch.randn(384, 256), torch.randn(384)))
    rows = row_index(40, 384).cuda()
    for name in (None, "gather", "full", "triton"):
        strategy(name)
        compare_grads(masked_linear, F.linear, x, weight, bias, rows, **tolerance)
    assert any(key[0] == "linear" and key[2] == dtype for key in partial_wgrad.chosen_strategies())
