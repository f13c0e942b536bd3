"""Specs and helpers of the fake-quantizer tests (test_quantizer.py, test_quantizer_states.py).

``INT8_ACT``/``UINT8_ACT``/``INT8_WEIGHT`` specs, the hand-written reference ``manual_fake_quant``,
values away from rounding ties, and a quantizer calibrated to a given range.
"""
from __future__ import annotations

import torch

from qatgraph import (
    FakeQuantizer,
    QuantSpec,
)

INT8_ACT = QuantSpec(bits=8, symmetric=True)                                   # [-128, 127]
UINT8_ACT = QuantSpec(bits=8, symmetric=False)                                 # [0, 255]
INT8_WEIGHT = QuantSpec(bits=8, symmetric=True, granularity="per_channel", narrow_range=True)  # [-127, 127]


def manual_fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      axis: int | None = None) -> torch.Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s``, the division done in float64."""
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    codes = torch.clamp(torch.round(x.double() / scale.double()) + zero_point.double(), qmin, qmax)
    return (codes - zero_point.double()).float() * scale.float()


def away_from_ties(codes: torch.Tensor, scale: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Values ``(code + f) * scale`` with |f| <= 0.4: float32 and float64 rounding agree on them."""
    offsets = (torch.rand(codes.shape, generator=generator) - 0.5) * 0.8
    return (codes + offsets) * scale


def calibrated(spec: QuantSpec, lo: float, hi: float, name: str = "q") -> FakeQuantizer:
    quantizer = FakeQuantizer(spec, name=name)
    quantizer.set_range(torch.tensor(lo), torch.tensor(hi))
    return quantizer.eval()
