"""Tests for the quantization policy (qatgraph/policy/).

Covers: the ``tensorrt`` and ``onnxruntime`` presets; ``Policy.from_any`` with a preset name, a
dict starting from a preset with partial overrides, a YAML file and a Policy; override
precedence (name > regex/glob > type > global, later rule wins within a level) through
``Policy.resolve``; skip rules and the skip list; every PolicyError the policy raises (the
message must name the bad key/value and list valid choices or suggest close matches). Rules
applied to a compiled model and the low-bit recipe options: tests/test_policy_compile.py.
"""
from __future__ import annotations

import pytest
from torch import nn

from qatgraph import FreezeConfig, LayerRule, Policy, PolicyError, QuantSpec


def policy_error(data: object) -> str:
    """The message of the PolicyError that building ``data`` raises."""
    with pytest.raises(PolicyError) as info:
        Policy.from_any(data)  # type: ignore[arg-type]
    return str(info.value)


# --------------------------------------------------------------------------- presets
def test_tensorrt_preset_is_symmetric_int8_per_channel_narrow_weights() -> None:
    policy = Policy.from_any("tensorrt")
    assert (policy.name, policy.target, policy.min_channels) == ("tensorrt", "tensorrt", 16)
    act, weight = policy.activation, policy.weight
    assert (act.bits, act.symmetric, act.granularity, act.qmin, act.qmax) == (8, True, "per_tensor", -128, 127)
    assert (weight.bits, weight.symmetric, weight.granularity) == (8, True, "per_channel")
    assert weight.narrow_range and (weight.qmin, weight.qmax) == (-127, 127)


def test_onnxruntime_preset_is_u8_asymmetric_activations_s8_per_channel_weights() -> None:
    policy = Policy.from_any("onnxruntime")
    assert policy.target == "onnxruntime"
    act, weight = policy.activation, policy.weight
    assert (act.symmetric, act.granularity, act.qmin, act.qmax) == (False, "per_tensor", 0, 255)
    assert (weight.symmetric, weight.granularity, weight.qmin, weight.qmax) == (True, "per_channel", -127, 127)


def test_none_means_tensorrt_and_presets_are_independent_copies() -> None:
    assert Policy.from_any(None) == Policy.from_any("tensorrt")
    first = Policy.from_any("tensorrt")
    first.weight.bits = 4
    first.overrides.append(LayerRule(name="fc", skip=True))
    fresh = Policy.from_any("tensorrt")  # mutating one policy must not leak into the preset table
    assert fresh.weight.bits == 8 and fresh.overrides == []


def test_quant_spec_ranges_for_other_bit_widths() -> None:
    assert (QuantSpec(bits=4, narrow_range=True).qmin, QuantSpec(bits=4, narrow_range=True).qmax) == (-7, 7)
    assert (QuantSpec(bits=4).qmin, QuantSpec(bits=4).qmax) == (-8, 7)
    assert (QuantSpec(bits=4, symmetric=False).qmin, QuantSpec(bits=4, symmetric=False).qmax) == (0, 15)


# --------------------------------------------------------------------------- from_any
def test_dict_starts_from_preset_and_merges_partial_overrides() -> None:
    policy = Policy.from_any({
        "preset": "tensorrt",
        "activation": {"calibrator": "entropy"},
        "freeze": {"mode": "cwpl", "ratio": 0.1},
        "overrides": [{"name": "fc", "skip": True}, {"glob": "layer2.*", "weight": {"bits": 4}}],
    })
    # Only the calibrator changed; the rest of the preset's activation spec is kept.
    assert policy.activation == QuantSpec(bits=8, symmetric=True, granularity="per_tensor", calibrator="entropy",
                                          percentile=99.99)
    assert policy.weight == Policy.from_any("tensorrt").weight
    assert policy.freeze == FreezeConfig(mode="cwpl", ratio=0.1, interval=4096)
    assert policy.overrides == [LayerRule(name="fc", skip=True), LayerRule(glob="layer2.*", weight={"bits": 4})]
    assert policy.min_channels == 16 and policy.target == "tensorrt"


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "preset: onnxruntime\n"
        "activation: {calibrator: mse}\n"
        "min_channels: 8\n"
        "overrides:\n"
        "  - {regex: 'layer4\\..*', weight: {bits: 4}}\n"
        "  - {type: Linear, skip: true}\n"
        "freeze: {mode: lwpn, ratio: 0.25, interval: 128}\n", encoding="utf-8")
    for source in (path, str(path)):
        policy = Policy.from_any(source)
        assert policy.target == "onnxruntime" and policy.min_channels == 8
        assert policy.activation.calibrator == "mse" and policy.activation.qmax == 255
        assert policy.overrides == [LayerRule(regex=r"layer4\..*", weight={"bits": 4}),
                                    LayerRule(type="Linear", skip=True)]
        assert policy.freeze == FreezeConfig(mode="lwpn", ratio=0.25, interval=128)
        assert policy.resolve("layer4.0.conv1", nn.Conv2d).weight.bits == 4


def test_policy_instance_is_validated_and_copied() -> None:
    original = Policy.from_any("tensorrt")
    copied = Policy.from_any(original)
    assert copied == original and copied is not original
    copied.activation.bits = 6
    assert original.activation.bits == 8
    broken = Policy.from_any("tensorrt")
    broken.weight.bits = 9
    assert "weight.bits = 9" in policy_error(broken)


def test_to_dict_round_trips() -> None:
    policy = Policy.from_any({"preset": "onnxruntime", "overrides": [{"type": "Linear", "skip": True}],
                              "freeze": {"ratio": 0.5}})
    assert Policy.from_any(policy.to_dict()) == policy


# --------------------------------------------------------------------------- resolve
class MyConv(nn.Conv2d):
    """A user subclass: type rules match through the MRO."""


def test_precedence_name_over_pattern_over_type_over_global() -> None:
    policy = Policy.from_any({"preset": "tensorrt", "overrides": [
        {"name": "fc", "weight": {"bits": 6}},          # level 3, listed first on purpose
        {"glob": "f*", "weight": {"bits": 5}},           # level 2
        {"type": "Linear", "weight": {"bits": 4, "calibrator": "mse"}},  # level 1, listed last
    ]})
    assert policy.resolve("fc", nn.Linear).weight.bits == 6
    assert policy.resolve("fx", nn.Linear).weight.bits == 5
    assert policy.resolve("head", nn.Linear).weight.bits == 4
    assert policy.resolve("head", nn.Conv2d).weight.bits == 8
    # Lower levels still contribute the fields higher levels do not set.
    assert policy.resolve("fc", nn.Linear).weight.calibrator == "mse"
    assert policy.resolve("fc", nn.Linear).applied_rules == ["type='Linear'", "glob='f*'", "name='fc'"]


def test_later_rule_wins_within_a_level() -> None:
    policy = Policy.from_any({"preset": "tensorrt", "overrides": [
        {"regex": r"layer\d\..*", "weight": {"bits": 4}},
        {"glob": "layer2.*", "weight": {"bits": 6}},
        {"type": "Conv2d", "activation": {"calibrator": "max"}},
        {"type": "MyConv", "activation": {"calibrator": "mse"}},
    ]})
    assert policy.resolve("layer2.0.conv1", MyConv).weight.bits == 6
    assert policy.resolve("layer3.0.conv1", MyConv).weight.bits == 4
    assert policy.resolve("layer3.0.conv1", MyConv).activation.calibrator == "mse"
    assert policy.resolve("layer3.0.conv1", nn.Conv2d).activation.calibrator == "max"


def test_type_rule_by_dotted_path() -> None:
    policy = Policy.from_any({"preset": "tensorrt", "overrides": [
        {"type": "torch.nn.modules.linear.Linear", "weight": {"bits": 4}}]})
    assert policy.resolve("fc", nn.Linear).weight.bits == 4
    assert policy.resolve("conv", nn.Conv2d).weight.bits == 8


def test_skip_rules_and_skip_list() -> None:
    policy = Policy.from_any({"preset": "tensorrt", "skip": ["stem"], "overrides": [
        {"regex": r"layer4\..*", "skip": True}, {"type": "Linear", "skip": True}]})
    assert policy.resolve("layer4.1.conv2", nn.Conv2d).skip_rule == r"regex='layer4\\..*'"
    assert policy.resolve("fc", nn.Linear).skip_rule == "type='Linear'"
    assert policy.resolve("stem", nn.Conv2d).skip_rule == "skip list"
    assert policy.resolve("layer3.0.conv1", nn.Conv2d).skip_rule is None


def test_rule_spec_is_validated_when_resolved() -> None:
    policy = Policy.from_any({"preset": "onnxruntime", "overrides": [
        {"name": "fc", "activation": {"learnable_scale": True}}]})
    with pytest.raises(PolicyError, match=r"'fc'.*learnable_scale"):
        policy.resolve("fc", nn.Linear)


# --------------------------------------------------------------------------- errors
def test_unknown_top_level_key_suggests_close_match() -> None:
    message = policy_error({"preset": "tensorrt", "activaton": {"bits": 8}})
    assert "'activaton'" in message and "did you mean 'activation'" in message
    assert "valid keys are" in message and "min_channels" in message


@pytest.mark.parametrize("section, bad, good", [
    ("activation", "calibrater", "calibrator"),
    ("weight", "granularty", "granularity"),
    ("freeze", "rate", "ratio"),
    ("tracing", "leaf_module", "leaf_modules"),
])
def test_unknown_section_key_suggests_close_match(section: str, bad: str, good: str) -> None:
    message = policy_error({"preset": "tensorrt", section: {bad: 1}})
    assert f"'{bad}'" in message and f"did you mean '{good}'" in message and section in message


def test_unknown_rule_key_suggests_close_match() -> None:
    message = policy_error({"preset": "tensorrt", "overrides": [{"nmae": "fc", "skip": True}]})
    assert "overrides[0]" in message and "'nmae'" in message and "did you mean 'name'" in message


def test_bad_calibrator_lists_valid_ones() -> None:
    message = policy_error({"preset": "tensorrt", "activation": {"calibrator": "minmax"}})
    assert "'minmax'" in message
    assert all(name in message for name in ("max", "percentile", "entropy", "mse"))


@pytest.mark.parametrize("bits", [1, 9, 8.0, "8"])
def test_bad_bits(bits: object) -> None:
    message = policy_error({"preset": "tensorrt", "weight": {"bits": bits}})
    assert f"weight.bits = {bits!r}" in message and "2 to 8" in message


@pytest.mark.parametrize("percentile", [0, -1, 100.5])
def test_bad_percentile(percentile: float) -> None:
    message = policy_error({"preset": "tensorrt", "activation": {"percentile": percentile}})
    assert "activation.percentile" in message and "(0, 100]" in message


@pytest.mark.parametrize("data, expected", [
    ({"weight": {"calibrator": "entropy"}}, "entropy"),  # weights are per-channel in the preset
    ({"activation": {"granularity": "per_channel"}}, "per_channel"),
    ({"activation": {"granularity": "per-tensor"}}, "did you mean 'per_tensor'"),
    ({"activation": {"symmetric": False}}, "target tensorrt needs symmetric activation"),
    ({"weight": {"symmetric": False, "narrow_range": False}}, "target tensorrt needs symmetric weight"),
    ({"target": "tensorrtx"}, "did you mean 'tensorrt'"),
    ({"bn": "freeze"}, "bn = 'freeze'"),
    ({"min_channels": -1}, "min_channels = -1"),
    ({"quantize": ["conv", "lstm"]}, "['lstm']"),
])
def test_impossible_combinations_and_bad_values(data: dict, expected: str) -> None:
    assert expected in policy_error({"preset": "tensorrt", **data})


def test_learnable_scale_needs_symmetric() -> None:
    message = policy_error({"preset": "onnxruntime", "activation": {"learnable_scale": True}})
    assert "learnable_scale" in message and "symmetric" in message


def test_narrow_range_needs_symmetric() -> None:
    message = policy_error({"preset": "onnxruntime", "weight": {"symmetric": False}})  # preset is narrow
    assert "narrow_range" in message


@pytest.mark.parametrize("rule, expected", [
    ({"name": "fc", "glob": "f*", "skip": True}, "exactly one of name, regex, glob, type (got ['name', 'glob'])"),
    ({"skip": True}, "exactly one of name, regex, glob, type (got none)"),
    ({"name": "fc"}, "the rule does nothing"),
    ({"name": "fc", "skip": True, "weight": {"bits": 4}}, "either skips layers or changes their spec"),
    ({"regex": "layer(1", "skip": True}, "regex 'layer(1' does not compile"),
    ({"name": "fc", "weight": {"bitz": 4}}, "did you mean 'bits'"),
])
def test_bad_rules(rule: dict, expected: str) -> None:
    message = policy_error({"preset": "tensorrt", "overrides": [{"name": "ok", "skip": True}, rule]})
    assert "overrides[1]" in message and expected in message


@pytest.mark.parametrize("source", ["tensorrtt", {"preset": "tensorrtt"}])
def test_unknown_preset_suggests_close_match(source: object) -> None:
    message = policy_error(source)
    assert "'tensorrtt'" in message and "did you mean 'tensorrt'" in message and "onnxruntime" in message


def test_missing_yaml_file(tmp_path) -> None:
    path = tmp_path / "missing.yaml"
    message = policy_error(str(path))
    assert str(path) in message and "does not exist" in message


@pytest.mark.parametrize("text, kind", [("- tensorrt\n- onnxruntime\n", "list"), ("", "NoneType"),
                                        ("tensorrt\n", "str")])
def test_yaml_that_is_not_a_mapping(tmp_path, text: str, kind: str) -> None:
    path = tmp_path / "policy.yml"
    path.write_text(text, encoding="utf-8")
    message = policy_error(path)
    assert "must hold a mapping" in message and kind in message


def test_invalid_yaml_syntax(tmp_path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("preset: [tensorrt\n", encoding="utf-8")
    assert "is not valid YAML" in policy_error(path)


@pytest.mark.parametrize("freeze, expected", [
    ({"mode": "cwpx"}, "freeze.mode = 'cwpx'"),
    ({"ratio": 1.5}, "freeze.ratio = 1.5"),
    ({"ratio": -0.1}, "freeze.ratio = -0.1"),
    ({"interval": 0}, "freeze.interval = 0"),
])
def test_bad_freeze_config(freeze: dict, expected: str) -> None:
    message = policy_error({"preset": "tensorrt", "freeze": freeze})
    assert expected in message
    if "mode" in freeze:
        assert "cwpl" in message and "cwpn" in message and "lwpn" in message


@pytest.mark.parametrize("freeze", [{"ratio": "5%"}, {"interval": "often"}])
def test_non_numeric_freeze_values_raise_policy_error(freeze: dict) -> None:
    # A YAML typo such as `ratio: 5%` must surface as a PolicyError naming the option, not as a
    # bare ValueError from float()/int() inside validate().
    key = next(iter(freeze))
    assert f"freeze.{key}" in policy_error({"preset": "tensorrt", "freeze": freeze})


def test_non_policy_type_is_rejected() -> None:
    assert "not int" in policy_error(42)
