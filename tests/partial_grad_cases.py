"""Helpers of the masked linear/conv op tests (test_partial_grad*.py).

Reference: full autograd gradients of F.linear / F.conv*d with the frozen rows of dW zeroed
(``compare_grads``, ``check_conv``); row indices from a short spec (``row_index``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qatgraph.ops.partial_grad import (
    masked_conv,
)

CONV_BY_DIM = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def row_index(spec, num_rows: int, seed: int = 0) -> torch.Tensor:
    """'empty', 'full', an int k (k random rows) or an explicit list -> sorted int64 index."""
    if spec == "empty":
        return torch.zeros(0, dtype=torch.int64)
    if spec == "full":
        return torch.arange(num_rows)
    if isinstance(spec, int):
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(num_rows, generator=generator)[:spec].sort().values
    return torch.tensor(spec, dtype=torch.int64)


def fresh_leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def compare_grads(masked_fn, reference_fn, x, weight, bias, rows, atol=1e-5, rtol=1e-5):
    """Run both functions on fresh leaves with the same upstream gradient and compare grads."""
    xm, wm, bm = fresh_leaves(x, weight, bias)
    xr, wr, br = fresh_leaves(x, weight, bias)
    out_masked = masked_fn(xm, wm, bm, rows)
    out_ref = reference_fn(xr, wr, br)
    torch.testing.assert_close(out_masked, out_ref, atol=atol, rtol=rtol)
    upstream = torch.randn_like(out_ref)
    out_masked.backward(upstream)
    out_ref.backward(upstream)
    frozen = torch.ones(weight.shape[0], dtype=torch.bool)
    frozen[rows] = False
    expected_weight_grad = wr.grad.clone()
    expected_weight_grad[frozen] = 0
    torch.testing.assert_close(xm.grad, xr.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(wm.grad, expected_weight_grad, atol=atol, rtol=rtol)
    assert torch.count_nonzero(wm.grad[frozen]) == 0
    if bias is not None:
        torch.testing.assert_close(bm.grad, br.grad, atol=atol, rtol=rtol)


def check_conv(x_shape, weight_shape, rows_spec, stride=1, padding=0, dilation=1, groups=1, seed=0):
    torch.manual_seed(seed)
    x, weight, bias = torch.randn(x_shape), torch.randn(weight_shape), torch.randn(weight_shape[0])
    rows = row_index(rows_spec, weight_shape[0], seed)
    conv = CONV_BY_DIM[len(weight_shape)] if len(x_shape) == len(weight_shape) else F.conv2d
    compare_grads(lambda xm, wm, bm, r: masked_conv(xm, wm, bm, r, stride, padding, dilation, groups),
                  lambda xr, wr, br: conv(xr, wr, br, stride, padding, dilation, groups), x, weight, bias, rows)
