"""The oracle of the fake-quant tests: ONNX QuantizeLinear -> DequantizeLinear, as ONNX Runtime computes it.

``q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`` with an IEEE float32 division,
then ``(q - zero_point) * scale``; the straight-through mask is 1 where the rounded value lies in
``[qmin, qmax]``. ATen's ``fake_quantize_per_*_affine`` multiplies by ``1 / scale`` instead, which
rounds values within an ulp of a tie the other way (tests/test_quantizer.py checks this oracle
against ONNX Runtime and that the test data contain such values).
"""
from __future__ import annotations

import torch


def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                    axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fake-quantized float32 ``x``, straight-through bool mask)."""
    scale, zero_point = torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zero_point).float()
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    shifted = torch.round(x.detach().float() / scale) + zero_point
    mask = (shifted >= qmin) & (shifted <= qmax)
    return (torch.clamp(shifted, qmin, qmax) - zero_point) * scale, mask
