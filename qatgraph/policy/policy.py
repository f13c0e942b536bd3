"""The quantization policy: what gets quantized, how, and which layers are exceptions.

A :class:`Policy` is plain data (dataclasses). Build one from a preset name (``"tensorrt"``,
``"onnxruntime"``), a dict, a YAML file, or directly. Dicts and YAML may start from a preset and
override parts of it::

    preset: tensorrt
    activation: {calibrator: entropy}
    overrides:
      - {name: fc, skip: true}                 # exact module name
      - {regex: 'layer4\\..*', weight: {bits: 4}}
      - {glob: 'blocks.*.attn.*', activation: {calibrator: max}}
      - {type: Linear, weight: {granularity: per_tensor}}
    freeze: {mode: cwpn, ratio: 0.05, interval: 4096}

Override precedence is name > regex/glob > type > global; among rules of one level the later
rule wins. Every rule must match at least one module of the model being compiled.

The sections (:class:`QuantSpec`, :class:`LayerRule`, :class:`FreezeConfig`,
:class:`SensitivityConfig`, :class:`TracingConfig`) are defined in qatgraph/policy/sections.py
and importable from here.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qatgraph.errors import PolicyError, did_you_mean, listing

from .presets import PRESETS
from .sections import CALIBRATORS as CALIBRATORS
from .sections import FREEZE_MODES as FREEZE_MODES
from .sections import GRANULARITIES as GRANULARITIES
from .sections import CalibratorName as CalibratorName
from .sections import (
    FreezeConfig,
    LayerRule,
    QuantSpec,
    SensitivityConfig,
    TracingConfig,
    _check_keys,
    _check_spec_keys,
    _field_names,
)
from .sections import Granularity as Granularity

TARGETS = ("tensorrt", "onnxruntime", "generic")
BN_MODES = ("train", "fold")
OP_KINDS = ("conv", "conv_transpose", "linear", "matmul")


@dataclass
class Policy:
    """Everything ``qatgraph.compile`` needs to know about how to quantize a model."""

    name: str = "custom"
    target: Literal["tensorrt", "onnxruntime", "generic"] = "tensorrt"
    activation: QuantSpec = field(default_factory=QuantSpec)
    weight: QuantSpec = field(default_factory=lambda: QuantSpec(granularity="per_channel", narrow_range=True))
    bn: Literal["train", "fold"] = "train"
    min_channels: int = 16
    quantize: list[str] = field(default_factory=lambda: list(OP_KINDS))
    residual: bool = True
    tracing: TracingConfig = field(default_factory=TracingConfig)
    overrides: list[LayerRule] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    freeze: FreezeConfig | None = None
    sensitivity: SensitivityConfig | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def preset(cls, name: str) -> Policy:
        if name not in PRESETS:
            raise PolicyError(f"unknown preset {name!r}: valid presets are {', '.join(PRESETS)}"
                              f"{did_you_mean(name, PRESETS)}")
        return cls.from_dict({"preset": name})

    @classmethod
    def from_any(cls, policy: Policy | str | Mapping[str, Any] | os.PathLike | None) -> Policy:
        """Accept a Policy, a preset name, a dict, or a path to a YAML file."""
        if policy is None:
            return cls.preset("tensorrt")
        if isinstance(policy, Policy):
            result = copy.deepcopy(policy)
            result.validate()
            return result
        if isinstance(policy, Mapping):
            return cls.from_dict(policy)
        if isinstance(policy, (str, os.PathLike)):
            text = os.fspath(policy)
            if text in PRESETS:
                return cls.preset(text)
            if text.endswith((".yaml", ".yml")) or os.path.exists(text):
                return cls.from_yaml(text)
            raise PolicyError(f"policy {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing "
                              f"YAML file{did_you_mean(text, PRESETS)}")
        raise PolicyError(f"policy must be a Policy, a preset name, a dict or a YAML path, not {type(policy).__name__}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Policy:
        import yaml

        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except FileNotFoundError:
            raise PolicyError(f"policy file {os.fspath(path)!r} does not exist") from None
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy file {os.fspath(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise PolicyError(f"policy file {os.fspath(path)!r} must hold a mapping (key: value), "
                              f"not {type(data).__name__}")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        data = dict(data)
        _check_keys(data, _POLICY_KEYS | {"preset"}, "policy")
        base: dict[str, Any] = {}
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise PolicyError(f"unknown preset {preset!r}: valid presets are {', '.join(PRESETS)}"
                                  f"{did_you_mean(str(preset), PRESETS)}")
            base = copy.deepcopy(PRESETS[preset])
        merged = _deep_merge(base, data)
        policy = cls._build(merged)
        policy.validate()
        return policy

    @classmethod
    def _build(cls, data: dict[str, Any]) -> Policy:
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("activation", "weight"):
                _check_spec_keys(value, key)
                kwargs[key] = QuantSpec(**value)
            elif key == "tracing":
                _check_keys(value, _field_names(TracingConfig), "tracing")
                kwargs[key] = TracingConfig(**value)
            elif key == "overrides":
                kwargs[key] = [_build_rule(rule, i) for i, rule in enumerate(value or [])]
            elif key == "freeze":
                kwargs[key] = None if value is None else _build_section(FreezeConfig, value, "freeze")
            elif key == "sensitivity":
                kwargs[key] = None if value is None else _build_section(SensitivityConfig, value, "sensitivity")
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        if self.target not in TARGETS:
            raise PolicyError(f"target = {self.target!r}: valid targets are {', '.join(TARGETS)}"
                              f"{did_you_mean(str(self.target), TARGETS)}")
        if self.bn not in BN_MODES:
            raise PolicyError(f"bn = {self.bn!r}: use 'train' (BN keeps training, folded at export) or "
                              "'fold' (folded into the conv before QAT)")
        if not isinstance(self.min_channels, int) or self.min_channels < 0:
            raise PolicyError(f"min_channels = {self.min_channels!r}: use a non-negative integer (0 quantizes tiny layers too)")
        unknown = [k for k in self.quantize if k not in OP_KINDS]
        if unknown:
            raise PolicyError(f"quantize lists unknown op kinds {unknown}: valid kinds are {', '.join(OP_KINDS)}")
        self.activation.validate("activation")
        self.weight.validate("weight")
        self.tracing.validate()
        if self.activation.per_channel:
            raise PolicyError("activation.granularity = 'per_channel': activations are quantized per tensor "
                              "(TensorRT and ONNX Runtime take per-channel scales for weights only)")
        if self.target == "tensorrt":
            for kind, spec in (("activation", self.activation), ("weight", self.weight)):
                if not spec.symmetric:
                    raise PolicyError(f"target tensorrt needs symmetric {kind} quantization (zero-point 0); "
                                      f"set {kind}.symmetric: true or target: onnxruntime/generic")
        for i, rule in enumerate(self.overrides):
            rule.validate(f"overrides[{i}]")
        if self.freeze is not None:
            self.freeze.validate()

    # ----------------------------------------------------------------- resolution
    def resolve(self, module_name: str, module_type: type) -> ResolvedLayer:
        """The spec (or skip) for one weighted layer, after applying overrides by precedence."""
        weight = dataclasses.asdict(self.weight)
        activation = dataclasses.asdict(self.activation)
        skip_rule: str | None = None
        applied: list[str] = []
        matching = [(rule.level, i, rule) for i, rule in enumerate(self.overrides)
                    if rule.matches(module_name, module_type)]
        for _, _, rule in sorted(matching, key=lambda item: (item[0], item[1])):
            if rule.skip:  # a later or more specific rule decides whether the layer is skipped
                skip_rule = rule.describe()
                continue
            skip_rule = None
            weight.update(rule.weight)
            activation.update(rule.activation)
            applied.append(rule.describe())
        if module_name in self.skip:
            skip_rule = skip_rule or "skip list"
        weight_spec, activation_spec = QuantSpec(**weight), QuantSpec(**activation)
        where = f"layer {module_name!r} (after overrides {applied})"
        weight_spec.validate(where + " weight")
        activation_spec.validate(where + " activation")
        return ResolvedLayer(weight=weight_spec.resolved(is_weight=True), activation=activation_spec.resolved(False),
                             skip_rule=skip_rule, applied_rules=applied,
                             input_activation=activation_spec.for_network_input().resolved(False))

    def check_rules_match(self, module_names: list[str], module_types: dict[str, type]) -> None:
        """Raise if an override or skip entry matches none of the model's modules."""
        for i, rule in enumerate(self.overrides):
            if not any(rule.matches(n, module_types[n]) for n in module_names):
                hint = did_you_mean(rule.name or rule.glob or rule.regex or rule.type or "",
                                    module_names if rule.type is None else {t.__name__ for t in module_types.values()})
                raise PolicyError(f"overrides[{i}] ({rule.describe()}) matches no module of the model{hint}. "
                                  f"Modules are: {listing(module_names)}")
        for name in self.skip:
            if name not in module_names:
                raise PolicyError(f"skip lists {name!r}, which is not a module of the model"
                                  f"{did_you_mean(name, module_names)}")


@dataclass
class ResolvedLayer:
    """``activation`` quantizes the layer's inputs; ``input_activation`` those that are network
    inputs (``activation.input_bits``). ``calibrator: auto`` is resolved in both."""

    weight: QuantSpec
    activation: QuantSpec
    input_activation: QuantSpec
    skip_rule: str | None
    applied_rules: list[str]


_POLICY_KEYS = _field_names(Policy)


def _build_section(klass: type, value: Any, where: str) -> Any:
    _check_keys(value, _field_names(klass), where)
    return klass(**value)


def _build_rule(rule: Any, index: int) -> LayerRule:
    if isinstance(rule, LayerRule):
        return rule
    _check_keys(rule, _field_names(LayerRule), f"overrides[{index}]")
    return LayerRule(**rule)


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``update`` into ``base``: nested dicts merge, lists and scalars replace."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            base[key] = _deep_merge(dict(base[key]), value)
        else:
            base[key] = copy.deepcopy(value)
    return base
