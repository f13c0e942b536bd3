"""Tests for the quantization policy (qatgraph/policy/) applied to a compiled model.

Covers: rules that match no module of a compiled model (the PolicyError names the rule and
suggests close module names); the end-to-end effect of overrides on
``qatgraph.compile(models.resnet18_like())`` (skipped layers stay float, a 4-bit glob override
reaches the weight quantizer, ``qatgraph_info.layers`` records why); and the low-bit recipe
options (``activation.input_bits`` for the network input, the ``auto`` calibrator per bit width).
The policy itself (presets, ``Policy.from_any``, precedence, errors): tests/test_policy.py.
"""
from __future__ import annotations

import models
import pytest
import torch
from torch import nn

import qatgraph
from qatgraph import Policy, PolicyError, QuantSpec
from qatgraph.quant.qmodules import QuantConv2d, QuantLinear


# --------------------------------------------------------------------------- rules vs the model
def test_override_naming_no_module_fails_compile_with_suggestion() -> None:
    with pytest.raises(PolicyError) as info:
        qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt",
                                                  "overrides": [{"name": "layer1.0.convv1", "skip": True}]})
    message = str(info.value)
    assert "overrides[0] (name='layer1.0.convv1') matches no module" in message
    assert "did you mean 'layer1.0.conv1'" in message
    assert "Modules are:" in message and "layer1.0.conv1" in message.split("Modules are:")[1]


def test_type_and_glob_rules_naming_nothing_fail_compile() -> None:
    with pytest.raises(PolicyError, match=r"type='Conv2D'.*did you mean 'Conv2d'"):
        qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "overrides": [{"type": "Conv2D", "skip": True}]})
    with pytest.raises(PolicyError, match=r"overrides\[0\] \(glob='layer5\.\*'\) matches no module.*Modules are: "):
        qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "overrides": [{"glob": "layer5.*", "skip": True}]})


def test_skip_list_naming_no_module_fails_compile() -> None:
    with pytest.raises(PolicyError) as info:
        qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "skip": ["layer1.0.conv3"]})
    message = str(info.value)
    assert "skip lists 'layer1.0.conv3'" in message and "not a module of the model" in message
    assert "did you mean" in message and "'layer1.0.conv1'" in message


def test_check_rules_match_directly() -> None:
    policy = Policy.from_any({"preset": "tensorrt", "overrides": [{"type": "Linear", "skip": True}]})
    policy.check_rules_match(["fc"], {"fc": nn.Linear})
    with pytest.raises(PolicyError, match="matches no module"):
        policy.check_rules_match(["conv"], {"conv": nn.Conv2d})


# --------------------------------------------------------------------------- end to end on resnet18_like
@pytest.fixture(scope="module")
def overridden_resnet() -> nn.Module:
    torch.manual_seed(0)
    return qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "overrides": [
        {"name": "layer1.0.conv1", "skip": True},
        {"regex": r"layer4\..*conv.*", "skip": True},
        {"glob": "layer2.*", "weight": {"bits": 4}},
    ]})


def test_skip_by_exact_name(overridden_resnet: nn.Module) -> None:
    layer = overridden_resnet.get_submodule("layer1.0.conv1")
    assert type(layer) is nn.Conv2d and not hasattr(layer, "weight_quantizer")
    decision = overridden_resnet.qatgraph_info.layer("layer1.0.conv1")
    assert not decision.quantized and decision.reason == "skipped by override name='layer1.0.conv1'"
    assert decision.input_quantizers == []
    assert isinstance(overridden_resnet.get_submodule("layer1.0.conv2"), QuantConv2d)


def test_skip_by_regex(overridden_resnet: nn.Module) -> None:
    info = overridden_resnet.qatgraph_info
    for name in ("layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"):
        assert type(overridden_resnet.get_submodule(name)) is nn.Conv2d
        assert info.layer(name).reason == r"skipped by override regex='layer4\\..*conv.*'"
    # The regex is a full match on "conv": the projection shortcut layer4.0.downsample.0 stays quantized.
    assert info.layer("layer4.0.downsample.0").quantized
    assert isinstance(overridden_resnet.get_submodule("layer4.0.downsample.0"), QuantConv2d)


def test_glob_spec_override_reaches_weight_quantizer(overridden_resnet: nn.Module) -> None:
    for name in ("layer2.0.conv1", "layer2.1.conv2", "layer2.0.downsample.0"):
        quantizer = overridden_resnet.get_submodule(name).weight_quantizer
        assert quantizer.spec.bits == 4 and (quantizer.qmin, quantizer.qmax) == (-7, 7)
        assert overridden_resnet.qatgraph_info.layer(name).reason == "quantized by policy (overrides: glob='layer2.*')"
        weight = overridden_resnet.get_submodule(name).weight.detach()
        codes = quantizer(weight) / quantizer.scale.reshape(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7 + 1e-4
    untouched = overridden_resnet.get_submodule("layer3.0.conv1").weight_quantizer
    assert untouched.spec.bits == 8 and (untouched.qmin, untouched.qmax) == (-127, 127)
    assert overridden_resnet.qatgraph_info.layer("layer3.0.conv1").reason == "quantized by policy"


def test_tiny_layers_reason_in_tensorrt_preset(overridden_resnet: nn.Module) -> None:
    info = overridden_resnet.qatgraph_info
    assert info.layer("conv1").reason.startswith("tiny layer: in_channels=3 < min_channels=16")
    assert info.layer("fc").reason.startswith("tiny layer: N (out_features)=10 < min_channels=16")
    assert not info.layer("fc").quantized and type(overridden_resnet.get_submodule("fc")) is nn.Linear


def test_skip_by_type_with_min_channels_zero() -> None:
    compiled = qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "min_channels": 0,
                                                         "overrides": [{"type": "Linear", "skip": True}]})
    info = compiled.qatgraph_info
    assert info.layer("fc").reason == "skipped by override type='Linear'"
    assert type(compiled.get_submodule("fc")) is nn.Linear
    # min_channels 0 quantizes the 3-channel stem that the preset would leave in float.
    assert info.layer("conv1").quantized and isinstance(compiled.get_submodule("conv1"), QuantConv2d)
    without_rule = qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "min_channels": 0})
    assert isinstance(without_rule.get_submodule("fc"), QuantLinear)  # the rule, not the size, skipped fc


def test_skip_list_reason() -> None:
    compiled = qatgraph.compile(models.resnet18_like(), {"preset": "tensorrt", "skip": ["layer3.1.conv2"]})
    decision = compiled.qatgraph_info.layer("layer3.1.conv2")
    assert not decision.quantized and decision.reason == "skipped by skip list"
    assert type(compiled.get_submodule("layer3.1.conv2")) is nn.Conv2d


# --------------------------------------------------------------- low-bit recipe options
class Conv1dStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.relu, self.second = nn.Conv1d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.relu(self.first(x)))


def activation_quantizers(policy: dict) -> dict[str, tuple[int, str]]:
    from qatgraph.quant.quantizer import FakeQuantizer

    qmodel = qatgraph.compile(Conv1dStack(), {"preset": "tensorrt", "min_channels": 0, **policy},
                              example_inputs=(torch.randn(2, 1, 8),))
    return {name.rsplit(".", 1)[-1]: (q.spec.bits, q.spec.calibrator) for name, q in qmodel.named_modules()
            if isinstance(q, FakeQuantizer) and not q.is_weight}


@pytest.mark.parametrize("bits, input_bits, expected", [
    (4, 8, 8), (4, None, 4), (3, 6, 6), (4, 4, 4), (4, 2, 4),  # never fewer bits than the activations
    (6, 8, 6), (8, 8, 8),  # only <= 4-bit activations change the input
])
def test_network_input_quantizer_gets_input_bits_at_low_bit_activations(bits, input_bits, expected) -> None:
    found = activation_quantizers({"activation": {"bits": bits, "input_bits": input_bits}})
    auto = lambda b: "mse" if b <= 4 else "percentile"  # noqa: E731  (the preset's calibrator: auto)
    assert found == {"x": (expected, auto(expected)), "relu": (bits, auto(bits))}


def test_input_bits_defaults_to_8_and_an_override_on_the_first_layer_still_wins() -> None:
    assert QuantSpec().input_bits == 8
    found = activation_quantizers({"activation": {"bits": 4}, "overrides": [
        {"name": "first", "activation": {"bits": 3, "input_bits": None}}]})
    assert found == {"x": (3, "mse"), "relu": (4, "mse")}
    explicit = activation_quantizers({"activation": {"bits": 4, "calibrator": "percentile"}})
    assert explicit == {"x": (8, "percentile"), "relu": (4, "percentile")}


def test_presets_calibrate_activations_with_auto() -> None:
    for preset in ("tensorrt", "onnxruntime"):
        spec = Policy.from_any(preset).activation
        assert (spec.calibrator, spec.input_bits) == ("auto", 8)
        assert spec.resolved(is_weight=False).calibrator == "percentile"  # INT8 as before


def test_auto_calibrator_resolves_per_bit_width_and_for_the_input_bits() -> None:
    found = activation_quantizers({"activation": {"bits": 4, "calibrator": "auto"}})
    assert found == {"x": (8, "percentile"), "relu": (4, "mse")}
    assert activation_quantizers({"activation": {"bits": 8, "calibrator": "auto"}}) == {
        "x": (8, "percentile"), "relu": (8, "percentile")}
    for bits, expected in ((8, "max"), (4, "mse"), (3, "mse")):
        assert QuantSpec(bits=bits, calibrator="auto").resolved(is_weight=True).calibrator == expected
    assert QuantSpec(bits=6, calibrator="auto").resolved(is_weight=False).calibrator == "percentile"
    assert QuantSpec(calibrator="entropy").resolved(is_weight=False).calibrator == "entropy"


@pytest.mark.parametrize("value", [1, 9, 4.0, True, "8"])
def test_bad_input_bits_is_named(value) -> None:
    with pytest.raises(PolicyError, match="activation.input_bits"):
        Policy.from_any({"preset": "tensorrt", "activation": {"input_bits": value}})
