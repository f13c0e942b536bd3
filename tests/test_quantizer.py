"""Tests for the fake-quantizer's numbers (qatgraph/quant/quantizer.py).

Checks the numbers against hand-written references: per-tensor and per-channel fake-quant equal
``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with round-half-to-even; the
straight-through estimator passes gradient 1 inside the range and 0 outside (on the ATen path,
the bf16 path and the learnable path); ``fake_quantize_reference`` and ``fake_quantize_cpu`` (its C++
kernel and its torch-op form) round as ONNX QuantizeLinear (``round(x / s)``, checked against ONNX
Runtime; ATen's ``x * (1 / s)`` differs near ties) bit for bit on random data and on near-tie inputs,
with ATen's straight-through mask; learnable scales get LSQ's gradient;
``scale_zero_point``/``set_range`` for symmetric and asymmetric specs, all-zero tensors
included. The quantizer's states and errors: tests/test_quantizer_states.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from onnx_rounding import quantize_linear
from quantizer_cases import INT8_ACT, INT8_WEIGHT, UINT8_ACT, away_from_ties, calibrated, manual_fake_quant

from qatgraph import (
    FakeQuantizer,
    QuantSpec,
)
from qatgraph.ops.fake_quant_cpu import fake_quantize_cpu
from qatgraph.quant.quantizer import fake_quantize_reference, scale_zero_point


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("spec, lo, hi", [(INT8_ACT, -3.0, 2.0), (UINT8_ACT, -1.0, 4.0), (UINT8_ACT, 0.5, 4.0)])
def test_per_tensor_matches_manual_reference(spec: QuantSpec, lo: float, hi: float) -> None:
    quantizer = calibrated(spec, lo, hi)
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(spec.qmin - 20, spec.qmax + 20, (4, 8, 16), generator=generator).float()
    x = away_from_ties(codes - quantizer.zero_point.float(), quantizer.scale, generator)
    expected = manual_fake_quant(x, quantizer.scale, quantizer.zero_point, spec.qmin, spec.qmax)
    assert torch.equal(quantizer(x), expected)
    # Values outside the range were clipped to the extreme codes.
    assert (expected.max() - (spec.qmax - quantizer.zero_point) * quantizer.scale).abs() < 1e-6
    assert (expected.min() - (spec.qmin - quantizer.zero_point) * quantizer.scale).abs() < 1e-6


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_manual_reference(axis: int) -> None:
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(6, 5, 3, 3, generator=generator) * torch.linspace(0.1, 3.0, 5).reshape(1, 5, 1, 1)
    channels = weight.shape[axis]
    quantizer = FakeQuantizer(INT8_WEIGHT, axis=axis, num_channels=channels, name="conv.weight_quantizer",
                              is_weight=True)
    quantizer.calibrate_from(weight)
    quantizer.eval()
    amax = weight.abs().transpose(0, axis).reshape(channels, -1).amax(dim=1)
    assert torch.allclose(quantizer.scale, amax / 127, rtol=1e-6, atol=0)
    assert torch.equal(quantizer.zero_point, torch.zeros(channels, dtype=torch.int32))
    expected = manual_fake_quant(weight, quantizer.scale, quantizer.zero_point, -127, 127, axis)
    assert torch.allclose(quantizer(weight), expected, rtol=0, atol=1e-7)
    # The largest |w| of every channel lands exactly on code +-127.
    codes = quantizer(weight).transpose(0, axis).reshape(channels, -1) / quantizer.scale.reshape(-1, 1)
    assert torch.allclose(codes.abs().amax(dim=1), torch.full((channels,), 127.0), atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounds_half_to_even(dtype: torch.dtype) -> None:
    quantizer = calibrated(INT8_ACT, -31.75, 31.75)  # scale 0.25: x / s is exact
    assert quantizer.scale.item() == 0.25
    x = torch.tensor([0.125, 0.375, 0.625, -0.125, -0.375, 2.5 * 0.25, 3.5 * 0.25], dtype=dtype)
    codes = (quantizer(x).float() / 0.25).tolist()
    assert codes == [0.0, 2.0, 2.0, 0.0, -2.0, 2.0, 4.0]


# --------------------------------------------------------------------------- gradients
def _ste_inputs(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.tensor([0.3, -5.2, 100.4, -120.1, 126.4, -127.6, 131.0, 150.0, -129.0, -300.0])
    inside = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.float32)
    return codes * scale, inside


@pytest.mark.parametrize("path", ["aten_float32", "reference_bfloat16", "learnable"])
def test_straight_through_gradient_is_one_inside_zero_outside(path: str) -> None:
    spec = QuantSpec(bits=8, learnable_scale=path == "learnable")
    quantizer = calibrated(spec, -12.7, 12.7)  # scale 0.1
    values, inside = _ste_inputs(0.1)
    x = values.to(torch.bfloat16 if path == "reference_bfloat16" else torch.float32).requires_grad_(True)
    quantizer(x).float().sum().backward()
    assert torch.equal(x.grad.float(), inside)


def test_learnable_scale_gets_lsq_gradient_per_tensor() -> None:
    quantizer = calibrated(QuantSpec(bits=8, learnable_scale=True), -63.5, 63.5)  # scale 0.5
    assert isinstance(quantizer.scale, torch.nn.Parameter) and quantizer.scale.item() == 0.5
    v = torch.tensor([0.6, -1.6, 2.2, 140.0, -160.0, 0.2, 7.0])
    out = quantizer(v * 0.5)
    out.sum().backward()
    # LSQ: d x_hat / d s = round(v) - v inside, qmin / qmax when clipped; times g = 1/sqrt(N * qmax).
    per_element = [round(t) - t if -128 < t < 127 else (127.0 if t >= 127 else -128.0) for t in v.tolist()]
    expected = sum(per_element) / math.sqrt(v.numel() * 127)
    assert quantizer.scale.grad is not None and quantizer.scale.grad.item() != 0.0
    assert quantizer.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(out, torch.tensor([0.5, -1.0, 1.0, 63.5, -64.0, 0.0, 3.5]))


def test_learnable_scale_gets_lsq_gradient_per_channel() -> None:
    spec = QuantSpec(bits=4, granularity="per_channel", narrow_range=True, learnable_scale=True)
    quantizer = FakeQuantizer(spec, axis=0, num_channels=2, name="w", is_weight=True)
    quantizer.set_range(torch.tensor([-7.0, -3.5]), torch.tensor([7.0, 3.5]))  # scales 1.0 and 0.5
    quantizer.train()
    v = torch.tensor([[0.3, 2.6, 9.0], [-1.2, -8.0, 4.4]])
    quantizer(v * quantizer.scale.detach().reshape(2, 1)).sum().backward()
    grad_scale = 1 / math.sqrt(3 * 7)  # N = elements per channel
    expected = [sum(round(t) - t if -7 < t < 7 else math.copysign(7.0, t) for t in row) * grad_scale
                for row in v.tolist()]
    assert torch.allclose(quantizer.scale.grad, torch.tensor(expected), rtol=1e-5)
    assert quantizer.tracks_weight_max is False  # a learnable scale is trained, not overwritten


# --------------------------------------------------------------------------- rounding: ONNX's, not ATen's
def _random_and_near_ties(scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                          generator: torch.Generator) -> torch.Tensor:
    """Random values plus values one ulp around x.5 code boundaries, where the rounding of
    x / s and x * (1 / s) can disagree."""
    shape = (64, 16, 32)
    random = torch.randn(shape, generator=generator) * 3
    if axis is not None:
        view = [1] * len(shape)
        view[axis] = -1
        scale, zero_point = scale.reshape(view), zero_point.reshape(view)
    codes = torch.randint(-140, 140, shape, generator=generator).float() + 0.5
    ties = codes * scale
    up, down = torch.nextafter(ties, torch.full_like(ties, math.inf)), torch.nextafter(ties, torch.full_like(ties, -math.inf))
    return torch.cat([random, ties, up, down])


def _qparams(symmetric: bool, axis: int | None, generator: torch.Generator):
    qmin, qmax = (-128, 127) if symmetric else (0, 255)
    if axis is None:
        scale = torch.tensor(0.0123)
        zero_point = torch.tensor(0 if symmetric else 131, dtype=torch.int32)
    else:
        scale = torch.rand(16, generator=generator) * 0.05 + 0.005
        zero_point = (torch.zeros(16, dtype=torch.int32) if symmetric
                      else torch.randint(0, 256, (16,), generator=generator, dtype=torch.int32))
    return scale, zero_point, qmin, qmax


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("axis", [None, 1], ids=["per_tensor", "per_channel"])
def test_the_oracle_is_onnx_runtimes_quantize_linear(symmetric: bool, axis: int | None) -> None:
    """tests/onnx_rounding.py against ONNX Runtime's QuantizeLinear -> DequantizeLinear, bit for bit
    on the near-tie data below, where ATen's kernels (x * (1 / s)) give other integers."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    generator = torch.Generator().manual_seed(3)
    scale, zero_point, qmin, qmax = _qparams(symmetric, axis, generator)
    x = _random_and_near_ties(scale, zero_point, axis, generator)
    attributes = {"axis": axis} if axis is not None else {}
    zero = numpy_helper.from_array(zero_point.numpy().astype("int8" if qmin < 0 else "uint8"), "zero_point")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["q"], **attributes),
         helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["y"], **attributes)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale.numpy(), "scale"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runtime = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    expected, _ = quantize_linear(x, scale, zero_point, qmin, qmax, axis)
    assert torch.equal(runtime, expected)
    if axis is None:
        aten = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    else:
        aten = torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
    assert (aten != runtime).sum() > 0, "the near-tie data no longer tell the two roundings apart"


@pytest.mark.parametrize("implementation", ["reference", "cpu", "cpu_torch_ops"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
@pytest.mark.parametrize("axis", [None, 1], ids=["per_tensor", "per_channel"])
def test_implementations_round_as_onnx_bit_for_bit(implementation: str, symmetric: bool, axis: int | None) -> None:
    """fake_quantize_reference (compiled graphs) and fake_quantize_cpu (eager CPU) against ONNX
    QuantizeLinear's rounding: the same output bits and ATen's straight-through gradient (1 where
    the rounded value lies in the range), near ties included."""
    generator = torch.Generator().manual_seed(3)
    scale, zero_point, qmin, qmax = _qparams(symmetric, axis, generator)
    x = _random_and_near_ties(scale, zero_point, axis, generator)
    x_ours = x.clone().requires_grad_(True)
    expected, mask = quantize_linear(x, scale, zero_point, qmin, qmax, axis)
    if implementation == "reference":
        ours = fake_quantize_reference(x_ours, scale, zero_point, qmin, qmax, axis)
    else:  # "cpu" takes the C++ kernel per tensor when it builds here (tests/test_fake_quant_cpu.py checks it does)
        ours = fake_quantize_cpu(x_ours, scale, zero_point, qmin, qmax, axis, use_kernel=implementation == "cpu")
    mismatches = (expected != ours).sum().item()
    assert mismatches == 0, f"{mismatches} of {x.numel()} values differ (by a whole quantization step)"
    grad = torch.randn(x.shape, generator=generator)
    ours.backward(grad)
    wanted = grad * mask
    if implementation == "reference":  # d(x / s * s)/dx is 1 only to float rounding
        differ = ~torch.isclose(x_ours.grad, wanted, rtol=1e-6, atol=0.0)
    else:
        differ = wanted != x_ours.grad
    if implementation == "reference":
        # The compiled form clips with minimum/maximum (what Inductor fuses cheaply), whose gradient
        # splits exact ties: an input exactly on one of its two bounds -- one float next to the
        # half-way tie below qmin and above qmax -- gets half the gradient. Nothing else may differ.
        view = [1] * x.dim()
        if axis is not None:
            view[axis] = -1
        codes = x / scale.reshape(view)
        half_way = (codes - codes.floor() - 0.5).abs() < 1e-4
        torch.testing.assert_close(x_ours.grad[differ], 0.5 * grad[differ], rtol=1e-6, atol=0.0)
        assert bool(half_way[differ].all())
        assert differ.sum() < 0.01 * x.numel()
    else:
        assert not differ.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_returns_same_dtype(dtype: torch.dtype) -> None:
    quantizer = calibrated(INT8_ACT, -4.0, 4.0)
    generator = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 32, generator=generator) * 2).to(dtype)
    out = quantizer(x)
    assert out.dtype == dtype
    expected = manual_fake_quant(x.float(), quantizer.scale, quantizer.zero_point, -128, 127).to(dtype)
    assert torch.equal(out, expected)
    weights = FakeQuantizer(INT8_WEIGHT, axis=0, num_channels=8, name="w", is_weight=True)
    weights.calibrate_from(x.float())
    assert weights.eval()(x).dtype == dtype


# --------------------------------------------------------------------------- scale and zero-point
def test_symmetric_scale_is_amax_over_qmax() -> None:
    scale, zero_point = scale_zero_point(torch.tensor(-3.0), torch.tensor(2.0), INT8_ACT)
    assert scale.item() == pytest.approx(3.0 / 127) and zero_point.item() == 0 and zero_point.dtype == torch.int32
    scale, _ = scale_zero_point(torch.tensor(-1.0), torch.tensor(5.0), QuantSpec(bits=4, narrow_range=True))
    assert scale.item() == pytest.approx(5.0 / 7)


@pytest.mark.parametrize("lo, hi", [(-2.0, 6.0), (1.0, 5.0), (-5.0, -1.0), (-0.001, 10.0)])
def test_asymmetric_range_includes_zero_exactly(lo: float, hi: float) -> None:
    quantizer = calibrated(UINT8_ACT, lo, hi)
    scale, zero_point = quantizer.scale.item(), quantizer.zero_point.item()
    covered_lo, covered_hi = min(lo, 0.0), max(hi, 0.0)
    assert scale == pytest.approx((covered_hi - covered_lo) / 255, rel=1e-6)
    assert isinstance(zero_point, int) and 0 <= zero_point <= 255
    assert quantizer(torch.tensor([0.0])).item() == 0.0  # zero is exactly representable
    ends = quantizer(torch.tensor([covered_lo, covered_hi]))
    assert torch.allclose(ends, torch.tensor([covered_lo, covered_hi]), atol=scale)


@pytest.mark.parametrize("spec, axis", [(INT8_ACT, None), (UINT8_ACT, None), (INT8_WEIGHT, 0)])
def test_all_zero_tensor_gives_valid_scale(spec: QuantSpec, axis: int | None) -> None:
    quantizer = FakeQuantizer(spec, axis=axis, num_channels=3, name="zeros")
    data = torch.zeros(3, 4)
    if axis is not None:
        data[1] = torch.tensor([0.5, -1.0, 0.25, 0.0])  # one live channel next to dead ones
    quantizer.calibrate_from(data)
    assert torch.isfinite(quantizer.scale).all() and (quantizer.scale > 0).all()
    assert ((quantizer.zero_point >= spec.qmin) & (quantizer.zero_point <= spec.qmax)).all()
    out = quantizer.eval()(data)
    assert torch.isfinite(out).all() and torch.allclose(out, data, atol=1.0 / 127)
