"""Tests for the fake-quantizer's states and errors (qatgraph/quant/quantizer.py).

NotCalibratedError before calibration, CalibrationError on NaN/Inf naming the quantizer,
enable/disable, a ``state_dict`` round trip, weight-max tracking in training mode (equal to
``scale_zero_point`` of the row range), 4-/2-bit grids, per-channel spec checks, shared
quantizers and ``repr``. The numbers themselves: tests/test_quantizer.py.
"""
from __future__ import annotations

import math

import models
import pytest
import torch
from quantizer_cases import INT8_ACT, INT8_WEIGHT, UINT8_ACT

import qatgraph
from qatgraph import (
    CalibrationError,
    FakeQuantizer,
    NotCalibratedError,
    QuantSpec,
    iter_quantizers,
)
from qatgraph.quant.state_format import QuantizerFormat


# --------------------------------------------------------------------------- states and errors
def test_forward_before_calibration_raises_naming_the_quantizer() -> None:
    quantizer = FakeQuantizer(INT8_ACT, name="layer1.0.quantizers.x")
    with pytest.raises(NotCalibratedError, match=r"'layer1\.0\.quantizers\.x'.*qatgraph\.calibrate"):
        quantizer(torch.randn(4))
    weights = FakeQuantizer(INT8_WEIGHT, axis=0, num_channels=4, name="fc.weight_quantizer", is_weight=True).eval()
    with pytest.raises(NotCalibratedError, match="fc.weight_quantizer"):
        weights(torch.randn(4, 3))


@pytest.mark.parametrize("bad, word", [(math.nan, "NaN"), (math.inf, "Inf"), (-math.inf, "Inf")])
def test_non_finite_calibration_data_raises_naming_the_quantizer(bad: float, word: str) -> None:
    quantizer = FakeQuantizer(INT8_ACT, name="stem.quantizers.relu")
    quantizer.start_calibration()
    quantizer(torch.randn(8))
    batch = torch.randn(8)
    batch[3] = bad
    with pytest.raises(CalibrationError, match=rf"'stem\.quantizers\.relu' received {word} values in calibration batch 2"):
        quantizer(batch)


def test_calibration_without_data_raises_naming_the_quantizer() -> None:
    quantizer = FakeQuantizer(INT8_ACT, name="head.quantizers.x")
    quantizer.start_calibration()
    with pytest.raises(CalibrationError, match=r"'head\.quantizers\.x' saw no data"):
        quantizer.finish_calibration()


def test_calibrate_rejects_nan_batch_and_keeps_previous_scales() -> None:
    compiled = qatgraph.compile(models.ConvBNReLUStack(16, (32, 32)), "tensorrt")
    good = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(compiled, [good])
    before = {name: q.scale.clone() for name, q in iter_quantizers(compiled)}
    bad = good.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(CalibrationError, match=r"quantizer 'quantizers\.x' received NaN"):
        qatgraph.calibrate(compiled, [good, bad])
    assert all(torch.equal(q.scale, before[name]) for name, q in iter_quantizers(compiled))
    assert not any(q.collecting for _, q in iter_quantizers(compiled))


def test_enable_disable() -> None:
    quantizer = FakeQuantizer(INT8_ACT, name="q")
    x = torch.randn(16) * 3
    assert quantizer.disable() is quantizer and not quantizer.is_enabled
    assert torch.equal(quantizer(x), x)  # disabled: identity, even before calibration
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    assert torch.equal(quantizer(x), x)
    quantizer.enable()
    assert quantizer.is_enabled and quantizer(x).abs().max() <= 128 / 127 + 1e-6
    assert not torch.equal(quantizer(x), x)


@pytest.mark.parametrize("spec, axis", [(UINT8_ACT, None), (INT8_WEIGHT, 0)])
def test_state_dict_round_trip_into_fresh_quantizer(spec: QuantSpec, axis: int | None) -> None:
    source = FakeQuantizer(spec, axis=axis, num_channels=4, name="src", is_weight=axis is not None)
    data = torch.randn(4, 8) * torch.arange(1, 5).reshape(4, 1)
    source.calibrate_from(data + 0.5)
    source.disable()
    state = source.state_dict()
    assert set(state) == {"scale", "zero_point", "enabled", "calibrated", "_extra_state"}  # + its format
    saved = QuantizerFormat.from_state(state["_extra_state"])
    assert (saved.bits, saved.signed, saved.axis, saved.channels) == (8, axis is not None, axis, None if axis is None else 4)
    fresh = FakeQuantizer(spec, axis=axis, num_channels=4, name="dst", is_weight=axis is not None)
    assert not fresh.is_calibrated and fresh.is_enabled
    fresh.load_state_dict(state)
    assert fresh.is_calibrated and not fresh.is_enabled
    assert torch.equal(fresh.scale, source.scale) and torch.equal(fresh.zero_point, source.zero_point)
    fresh.enable()
    source.enable()
    assert torch.equal(fresh.eval()(data), source.eval()(data))


def test_weight_max_tracks_weight_in_training_and_holds_in_eval() -> None:
    quantizer = FakeQuantizer(INT8_WEIGHT, axis=0, num_channels=4, name="conv.weight_quantizer", is_weight=True)
    assert quantizer.tracks_weight_max
    weight = torch.randn(4, 8)
    quantizer.calibrate_from(weight)
    grown = weight * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    quantizer.train()
    out = quantizer(grown)  # training: the scale follows the weight being quantized
    assert torch.allclose(quantizer.scale, grown.abs().amax(dim=1) / 127)
    assert torch.allclose(out, grown, atol=quantizer.scale.max().item())
    quantizer.eval()
    quantizer(grown * 10)  # eval: keeps the last scale
    assert torch.allclose(quantizer.scale, grown.abs().amax(dim=1) / 127)


def test_weight_max_tracking_starts_an_uncalibrated_weight_quantizer() -> None:
    quantizer = FakeQuantizer(INT8_WEIGHT, axis=0, num_channels=2, name="w", is_weight=True).train()
    weight = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    quantizer(weight)
    assert quantizer.is_calibrated and torch.allclose(quantizer.scale, torch.tensor([2.0, 0.5]) / 127)


@pytest.mark.parametrize("spec, is_weight", [
    (QuantSpec(granularity="per_channel", calibrator="percentile"), True),
    (QuantSpec(calibrator="max"), False),
])
def test_only_max_weight_quantizers_track(spec: QuantSpec, is_weight: bool) -> None:
    quantizer = FakeQuantizer(spec, axis=0, num_channels=2, name="q", is_weight=is_weight)
    assert not quantizer.tracks_weight_max
    quantizer.set_range(torch.tensor(-1.0).expand(quantizer.scale.shape), torch.tensor(1.0).expand(quantizer.scale.shape))
    scale = quantizer.scale.clone()
    quantizer.train()(torch.randn(2, 4) * 10)
    assert torch.equal(quantizer.scale, scale)


def test_asymmetric_weight_tracking_keeps_range_and_zero_point_consistent() -> None:
    # An asymmetric weight spec (allowed for onnxruntime/generic targets) with the max calibrator
    # must track (min, max) and its zero-point, not overwrite the scale with amax / qmax while
    # keeping the old zero-point (which clips about half of each channel's range).
    spec = QuantSpec(bits=8, symmetric=False, granularity="per_channel", calibrator="max")
    quantizer = FakeQuantizer(spec, axis=0, num_channels=4, name="w", is_weight=True)
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    quantizer.calibrate_from(weight)
    expected_scale, expected_zero_point = quantizer.scale.clone(), quantizer.zero_point.clone()
    out = quantizer.train()(weight)
    assert torch.allclose(quantizer.scale, expected_scale) and torch.equal(quantizer.zero_point, expected_zero_point)
    assert (out - weight).abs().max() <= quantizer.scale.max() / 2 + 1e-6


@pytest.mark.parametrize("spec, codes", [
    (QuantSpec(bits=4, narrow_range=True), set(range(-7, 8))),
    (QuantSpec(bits=4), set(range(-8, 8))),
    (QuantSpec(bits=4, symmetric=False), set(range(16))),
    (QuantSpec(bits=2, narrow_range=True), {-1, 0, 1}),
])
def test_low_bit_grids(spec: QuantSpec, codes: set[int]) -> None:
    quantizer = FakeQuantizer(spec, name="low")
    quantizer.calibrate_from(torch.linspace(-1.0 if spec.symmetric else 0.0, 1.0, 101))
    x = torch.linspace(-2.0, 2.0, 401)
    levels = (quantizer.eval()(x) / quantizer.scale + quantizer.zero_point.float())
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert set(levels.round().int().tolist()) == codes


def test_per_channel_spec_needs_axis_and_channel_count() -> None:
    with pytest.raises(ValueError, match="'w' needs axis and num_channels"):
        FakeQuantizer(INT8_WEIGHT, name="w")


def test_iter_quantizers_yields_shared_quantizer_once() -> None:
    shared = FakeQuantizer(INT8_ACT, name="shared")
    model = torch.nn.ModuleDict({"a": shared, "b": torch.nn.ModuleDict({"c": shared}),
                                 "d": FakeQuantizer(INT8_ACT, name="d")})
    assert [name for name, _ in iter_quantizers(model)] == ["a", "d"]


def test_repr_says_what_the_quantizer_does() -> None:
    quantizer = FakeQuantizer(UINT8_ACT, name="q")
    assert "int8 asymmetric per-tensor [0, 255]" in repr(quantizer) and "uncalibrated" in repr(quantizer)
    quantizer.set_range(torch.tensor(0.0), torch.tensor(2.55))
    assert "amax=" in repr(quantizer)


@pytest.mark.parametrize("axis, shape", [(None, (6, 5, 3)), (0, (6, 5, 3)), (1, (4, 6, 3, 3))])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_max_tracking_equals_scale_zero_point_of_the_row_range(axis, shape, symmetric):
    """The per-step weight-range tracking (fast path for symmetric formats) gives exactly the scale
    and zero point scale_zero_point computes from each row's min and max."""
    from qatgraph.policy import QuantSpec
    from qatgraph.quant.quantizer import FakeQuantizer, scale_zero_point

    spec = QuantSpec(bits=8, symmetric=symmetric, granularity="per_tensor" if axis is None else "per_channel",
                     narrow_range=symmetric)
    channels = None if axis is None else shape[axis]
    quantizer = FakeQuantizer(spec, axis=axis, num_channels=channels, name="w", is_weight=True).train()
    weight = torch.randn(shape) * torch.linspace(0.1, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    weight[0] = 0.0  # an all-zero row gets the minimum scale, not zero
    quantizer(weight)
    rows = weight.reshape(1, -1) if axis is None else weight.transpose(0, axis).reshape(shape[axis], -1)
    lo, hi = rows.amin(1), rows.amax(1)
    if axis is None:
        lo, hi = lo[0], hi[0]
    scale, zero_point = scale_zero_point(lo, hi, spec)
    assert torch.equal(quantizer.scale, scale.reshape(quantizer.scale.shape))
    assert torch.equal(quantizer.zero_point, zero_point.reshape(quantizer.zero_point.shape).to(torch.int32))
