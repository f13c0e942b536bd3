"""Tests for the quantized weighted layers (qatgraph/quant/qmodules.py).

``quantize_module`` on Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear must: keep parameter
names and ``isinstance`` (state_dict keys = the original keys + ``weight_quantizer.*``); give a
per-output-channel weight quantizer on the right axis (0, or 1 for ConvTranspose) calibrated
from the weight at once; compute exactly ``F.conv*/F.linear`` with the fake-quantized weight;
add an input quantizer only when asked (module-wise quantization). Also ``weight_axis`` and
``op_kind``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from onnx_rounding import quantize_linear
from torch import nn

from qatgraph import Policy, QuantSpec
from qatgraph.quant.qmodules import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    op_kind,
    quantize_module,
    weight_axis,
)

WEIGHT_SPEC = Policy.from_any("tensorrt").weight        # INT8 symmetric per-channel, [-127, 127]
ACTIVATION_SPEC = Policy.from_any("tensorrt").activation

# (factory, input shape, quantized class, weight axis, functional op applied with the module's settings)
CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 10), QuantConv1d, 0,
               lambda m, x, w: F.conv1d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2), (2, 4, 9, 9), QuantConv2d, 0,
               lambda m, x, w: F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)),
    "conv3d": (lambda: nn.Conv3d(3, 5, 2, bias=False), (1, 3, 4, 4, 4), QuantConv3d, 0,
               lambda m, x, w: F.conv3d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 5), QuantConvTranspose1d, 1,
                         lambda m, x, w: F.conv_transpose1d(x, w, m.bias, m.stride, m.padding, m.output_padding,
                                                            m.groups, m.dilation)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
                         (2, 4, 5, 5), QuantConvTranspose2d, 1,
                         lambda m, x, w: F.conv_transpose2d(x, w, m.bias, m.stride, m.padding, m.output_padding,
                                                            m.groups, m.dilation)),
    "conv_transpose3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (1, 2, 3, 3, 3), QuantConvTranspose3d, 1,
                         lambda m, x, w: F.conv_transpose3d(x, w, m.bias, m.stride, m.padding, m.output_padding,
                                                            m.groups, m.dilation)),
    "linear": (lambda: nn.Linear(12, 7), (3, 5, 12), QuantLinear, 0, lambda m, x, w: F.linear(x, w, m.bias)),
}


def reference_weight(weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Per-channel INT8 narrow-range fake-quant with scale = amax / 127 along ``axis``."""
    channels = weight.shape[axis]
    amax = weight.detach().abs().transpose(0, axis).reshape(channels, -1).amax(dim=1)
    return quantize_linear(weight.detach(), amax / 127, torch.zeros(channels), -127, 127, axis)[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_quantize_module_keeps_names_and_type(case: str) -> None:
    factory, _, quant_class, axis, _ = CASES[case]
    module = factory()
    original_class = type(module)
    original_state = {k: v.clone() for k, v in module.state_dict().items()}
    parameter_ids = {name: id(p) for name, p in module.named_parameters()}
    returned = quantize_module(module, WEIGHT_SPEC, "block.layer")
    assert returned is module and type(module) is quant_class and isinstance(module, original_class)
    quantizer_keys = {f"weight_quantizer.{k}" for k in ("scale", "zero_point", "enabled", "calibrated", "_extra_state")}
    assert set(module.state_dict()) == set(original_state) | quantizer_keys
    assert all(torch.equal(module.state_dict()[k], v) for k, v in original_state.items())
    # The same Parameter objects: an optimizer built before compile would still update them.
    assert {name: id(p) for name, p in module.named_parameters()} == parameter_ids
    quantizer = module.weight_quantizer
    assert quantizer.name == "block.layer.weight_quantizer" and quantizer.is_weight and quantizer.is_calibrated
    assert quantizer.axis == axis and quantizer.scale.shape == (module.weight.shape[axis],)
    assert module.input_quantizer is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_functional_op_with_fake_quantized_weight(case: str) -> None:
    factory, input_shape, _, axis, functional = CASES[case]
    module = factory()
    x = torch.randn(input_shape)
    float_out = module(x)
    quantize_module(module, WEIGHT_SPEC, "layer")
    expected_weight = reference_weight(module.weight, axis)
    for mode in ("train", "eval"):
        getattr(module, mode)()
        assert torch.equal(module.quantized_weight(), expected_weight)
        out = module(x)
        assert torch.equal(out, functional(module, x, expected_weight))
        # Fake-quantizing the weight changes the output, but only by a little.
        assert not torch.equal(out, float_out)
        assert torch.allclose(out, float_out, atol=0.05 * float_out.abs().max().item())


def test_conv_transpose_output_size_is_honoured() -> None:
    module = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1)
    x = torch.randn(1, 4, 5, 5)
    quantize_module(module, WEIGHT_SPEC, "up")
    out = module(x, output_size=[10, 10])
    assert out.shape == (1, 6, 10, 10)
    expected = F.conv_transpose2d(x, reference_weight(module.weight, 1), module.bias, 2, 1, (1, 1))
    assert torch.equal(out, expected)


def test_gradients_reach_weight_and_input() -> None:
    module = quantize_module(nn.Conv2d(3, 4, 3), WEIGHT_SPEC, "conv")
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    module(x).square().sum().backward()
    assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_input_quantizer_for_module_wise_quantization() -> None:
    module = quantize_module(nn.Linear(8, 4), WEIGHT_SPEC, "head.fc", input_spec=ACTIVATION_SPEC)
    quantizer = module.input_quantizer
    assert quantizer is not None and quantizer.name == "head.fc.input_quantizer" and not quantizer.is_weight
    assert "input_quantizer.scale" in module.state_dict()
    x = torch.randn(3, 8)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    expected_input = quantize_linear(x, torch.tensor(1.0 / 127), torch.tensor(0), -128, 127)[0]
    assert torch.equal(module.eval()(x), F.linear(expected_input, reference_weight(module.weight, 0), module.bias))


def test_weight_spec_bits_and_per_tensor() -> None:
    four_bit = QuantSpec(bits=4, granularity="per_channel", narrow_range=True)
    module = quantize_module(nn.Conv2d(2, 3, 1), four_bit, "conv")
    codes = module.quantized_weight() / module.weight_quantizer.scale.reshape(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.abs().max().item() == pytest.approx(7.0)
    per_tensor = quantize_module(nn.Linear(5, 3), QuantSpec(bits=8, narrow_range=True), "fc")
    assert per_tensor.weight_quantizer.axis is None and per_tensor.weight_quantizer.scale.shape == ()
    assert per_tensor.weight_quantizer.scale.item() == pytest.approx(per_tensor.weight.abs().max().item() / 127)


def test_weight_axis() -> None:
    assert weight_axis(nn.Conv2d(2, 3, 1)) == 0
    assert weight_axis(nn.Linear(2, 3)) == 0
    assert weight_axis(nn.ConvTranspose2d(2, 3, 1)) == 1
    assert weight_axis(nn.ConvTranspose1d(2, 3, 1)) == 1
    assert weight_axis(quantize_module(nn.ConvTranspose3d(2, 3, 1), WEIGHT_SPEC, "t")) == 1


class SubclassedConv(nn.Conv2d):
    """A user subclass whose forward is not Conv2d's (here: weight standardization)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, weight, self.bias)


def test_op_kind() -> None:
    assert op_kind(nn.Conv1d(1, 1, 1)) == op_kind(nn.Conv2d(1, 1, 1)) == op_kind(nn.Conv3d(1, 1, 1)) == "conv"
    assert op_kind(nn.ConvTranspose2d(1, 1, 1)) == "conv_transpose"
    assert op_kind(nn.Linear(1, 1)) == "linear"
    assert op_kind(nn.BatchNorm2d(1)) is None and op_kind(nn.ReLU()) is None
    # Subclasses are matched by exact type on purpose: their forward may differ from the base
    # class's (weight standardization, LoRA, custom padding), and swapping in QuantConv2d would
    # replace that forward with a plain convolution, silently changing the model.
    assert op_kind(SubclassedConv(1, 1, 1)) is None
