"""The sections a quantization :class:`~qatgraph.policy.Policy` is made of, as dataclasses.

* :class:`QuantSpec`: how activations or weights are quantized (bits, symmetry, granularity,
  calibrator); the ``activation`` and ``weight`` sections, and the partial specs of overrides.
* :class:`LayerRule`: one entry of ``overrides`` (a matcher plus skip or a partial spec).
* :class:`FreezeConfig`, :class:`SensitivityConfig`, :class:`TracingConfig`: the ``freeze``,
  ``sensitivity`` and ``tracing`` sections.

Each ``validate`` raises :class:`~qatgraph.errors.PolicyError` naming the bad key or value and
the valid choices. ``_check_keys`` rejects unknown keys in a dict (with a did-you-mean hint) before
a section is built from it. All public names are re-exported by ``qatgraph.policy``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from qatgraph.errors import PolicyError, did_you_mean

Granularity = Literal["per_tensor", "per_channel"]
CalibratorName = Literal["max", "percentile", "entropy", "mse", "auto"]
CALIBRATORS = ("max", "percentile", "entropy", "mse", "auto")
#: ``calibrator: auto`` resolves per bit width (see BENCHMARKS.md "Low-bit recipes"): MSE at <= 4
#: bits, where clipping outliers pays; at more bits percentile for activations, max for weights.
LOW_BITS = 4
GRANULARITIES = ("per_tensor", "per_channel")
FREEZE_MODES = ("cwpl", "cwpn", "lwpn")
FREEZE_IMPORTANCE = ("layer_normalized", "raw")


@dataclass
class QuantSpec:
    """How one kind of tensor (activation or weight) is quantized.

    ``symmetric`` specs are signed with zero-point 0; asymmetric ones are unsigned
    (``[0, 2**bits - 1]``) with a computed zero-point. ``narrow_range`` drops the most negative
    code (``[-127, 127]`` for INT8), which makes BN folding into per-channel scales exact even
    for negative gammas. ``axis`` is the channel axis for per-channel specs (``None`` picks the
    op's output-channel axis: 0 for Conv/Linear weights, 1 for ConvTranspose weights).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "per_tensor"
    calibrator: CalibratorName = "max"
    percentile: float = 99.99
    learnable_scale: bool = False
    narrow_range: bool = False
    axis: int | None = None
    #: activation specs only: bits of the network-input quantizer when ``bits`` <= 4 (``None``: the
    #: same as ``bits``). Raw inputs carry the most information per value and are where 4-bit
    #: activations cost the most; TensorRT and most QAT recipes keep them at 8 bits.
    input_bits: int | None = 8

    def resolved(self, is_weight: bool) -> QuantSpec:
        """This spec with ``calibrator: auto`` replaced by the calibrator for its bit width."""
        if self.calibrator != "auto":
            return self
        chosen = "mse" if self.bits <= LOW_BITS else ("max" if is_weight else "percentile")
        return dataclasses.replace(self, calibrator=chosen)

    def for_network_input(self) -> QuantSpec:
        """The spec of a quantizer on a network input: ``input_bits`` when ``bits`` <= 4, else this
        spec (call before :meth:`resolved`, so ``auto`` picks the calibrator for the input's bits)."""
        if self.input_bits is None or self.bits > LOW_BITS or self.input_bits <= self.bits:
            return self
        return dataclasses.replace(self, bits=self.input_bits)

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.granularity == "per_channel"

    def validate(self, where: str) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise PolicyError(f"{where}.bits = {self.bits!r}: use an integer from 2 to 8")
        if self.input_bits is not None and (not isinstance(self.input_bits, int) or isinstance(self.input_bits, bool)
                                            or not 2 <= self.input_bits <= 8):
            raise PolicyError(f"{where}.input_bits = {self.input_bits!r}: use an integer from 2 to 8, or null to "
                              "quantize the network input like every other activation")
        if self.granularity not in GRANULARITIES:
            raise PolicyError(f"{where}.granularity = {self.granularity!r}: valid values are "
                              f"{', '.join(GRANULARITIES)}{did_you_mean(self.granularity, GRANULARITIES)}")
        if self.calibrator not in CALIBRATORS:
            raise PolicyError(f"{where}.calibrator = {self.calibrator!r}: valid values are "
                              f"{', '.join(CALIBRATORS)}{did_you_mean(self.calibrator, CALIBRATORS)}")
        if not _is_number(self.percentile) or not 0.0 < float(self.percentile) <= 100.0:
            raise PolicyError(f"{where}.percentile = {self.percentile!r}: use a number in (0, 100], e.g. 99.99")
        if self.calibrator == "entropy" and self.per_channel:
            raise PolicyError(f"{where}: the entropy (KL) calibrator works on one histogram per tensor; "
                              "use granularity: per_tensor, or calibrator: max/percentile/mse for per-channel")
        if self.learnable_scale and not self.symmetric:
            raise PolicyError(f"{where}: learnable_scale is supported for symmetric specs only; "
                              "set symmetric: true or learnable_scale: false")
        if self.narrow_range and not self.symmetric:
            raise PolicyError(f"{where}: narrow_range applies to symmetric (signed) specs only")


@dataclass
class LayerRule:
    """A per-layer exception: skip matching layers or give them a different spec.

    Exactly one matcher: ``name`` (exact module name), ``regex`` (full match), ``glob``
    (fnmatch) or ``type`` (class name like ``"Conv2d"`` or a dotted path).
    ``weight``/``activation`` hold partial :class:`QuantSpec` fields applied over the global spec.
    """

    name: str | None = None
    regex: str | None = None
    glob: str | None = None
    type: str | None = None
    skip: bool = False
    weight: dict[str, Any] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """Precedence level: higher wins (name 3, regex/glob 2, type 1)."""
        return 3 if self.name is not None else 2 if (self.regex or self.glob) else 1

    def describe(self) -> str:
        for key in ("name", "regex", "glob", "type"):
            value = getattr(self, key)
            if value is not None:
                return f"{key}={value!r}"
        return "<no matcher>"

    def matches(self, module_name: str, module_type: type) -> bool:
        if self.name is not None:
            return module_name == self.name
        if self.regex is not None:
            return re.fullmatch(self.regex, module_name) is not None
        if self.glob is not None:
            return fnmatch.fnmatchcase(module_name, self.glob)
        wanted = self.type or ""
        if "." in wanted:
            return any(f"{k.__module__}.{k.__qualname__}" == wanted for k in module_type.__mro__)
        return any(k.__name__ == wanted for k in module_type.__mro__)

    def validate(self, where: str) -> None:
        given = [k for k in ("name", "regex", "glob", "type") if getattr(self, k) is not None]
        if len(given) != 1:
            raise PolicyError(f"{where}: give exactly one of name, regex, glob, type (got {given or 'none'})")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise PolicyError(f"{where}: regex {self.regex!r} does not compile: {exc}") from None
        if self.skip and (self.weight or self.activation):
            raise PolicyError(f"{where}: a rule either skips layers or changes their spec, not both")
        if not self.skip and not (self.weight or self.activation):
            raise PolicyError(f"{where}: the rule does nothing; add skip: true, weight: {{...}} or activation: {{...}}")
        for kind in ("weight", "activation"):
            _check_spec_keys(getattr(self, kind), f"{where}.{kind}")


@dataclass
class FreezeConfig:
    """EfQAT: train only the most important weight rows/layers (see passes/freeze.py)."""

    mode: Literal["cwpl", "cwpn", "lwpn"] = "cwpn"
    ratio: float = 0.05
    interval: int = 4096
    #: how rows are ranked: ``layer_normalized`` (mean |w| of the row divided by the mean over its
    #: layer, comparable across layers) or ``raw`` (the paper's mean |w|, which favours layers with
    #: large weights such as the first conv and the head)
    importance: Literal["layer_normalized", "raw"] = "layer_normalized"
    #: Conv/Linear layers and functional ops on parameters left in floating point (tiny, skipped):
    #: their weights ``train`` (the summary says so) or are ``freeze``-d too (so LWPN 0 % trains no
    #: weight at all)
    float_layers: Literal["train", "freeze"] = "train"

    def validate(self) -> None:
        if self.importance not in FREEZE_IMPORTANCE:
            raise PolicyError(f"freeze.importance = {self.importance!r}: valid values are "
                              f"{', '.join(FREEZE_IMPORTANCE)}{did_you_mean(self.importance, FREEZE_IMPORTANCE)}")
        if self.float_layers not in ("train", "freeze"):
            raise PolicyError(f"freeze.float_layers = {self.float_layers!r}: valid values are train, freeze"
                              f"{did_you_mean(str(self.float_layers), ('train', 'freeze'))}")
        if self.mode not in FREEZE_MODES:
            raise PolicyError(f"freeze.mode = {self.mode!r}: valid values are {', '.join(FREEZE_MODES)}"
                              f"{did_you_mean(self.mode, FREEZE_MODES)}")
        if not _is_number(self.ratio) or not 0.0 <= float(self.ratio) <= 1.0:
            raise PolicyError(f"freeze.ratio = {self.ratio!r}: use the fraction of rows to train, a number in [0, 1]")
        if not isinstance(self.interval, int) or isinstance(self.interval, bool) or self.interval <= 0:
            raise PolicyError(f"freeze.interval = {self.interval!r}: use a positive whole number of samples")


@dataclass
class SensitivityConfig:
    """Automatic skip-list selection when ``compile`` is given data (see qatgraph/sensitivity_analysis/scores.py)."""

    mode: Literal["fast", "full"] = "fast"
    num_samples: int = 256
    max_drop: float = 0.01
    max_skipped: int | None = None
    top_k: int | None = None


@dataclass
class TracingConfig:
    """How the model's graph is built.

    ``frontend``: ``auto`` (torch.fx; when it cannot trace the whole model and ``compile`` has
    example inputs, torch.export; partial torch.fx tracing last), ``fx`` (torch.fx, then partial
    tracing) or ``export`` (torch.export only; needs example inputs)."""

    leaf_modules: list[str] = field(default_factory=list)
    concrete_args: dict[str, Any] = field(default_factory=dict)
    partial: bool = True
    frontend: Literal["auto", "fx", "export"] = "auto"

    def validate(self) -> None:
        if self.frontend not in FRONTENDS:
            raise PolicyError(f"tracing.frontend = {self.frontend!r}: valid values are {', '.join(FRONTENDS)} "
                              f"(auto: torch.fx, then torch.export, then partial torch.fx tracing)"
                              f"{did_you_mean(str(self.frontend), FRONTENDS)}")


FRONTENDS = ("auto", "fx", "export")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_names(klass: type) -> set[str]:
    return {f.name for f in dataclasses.fields(klass)}


_SPEC_KEYS = _field_names(QuantSpec)


def _check_keys(data: Any, valid: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise PolicyError(f"{where} must be a mapping, not {type(data).__name__}")
    for key in data:
        if key not in valid:
            raise PolicyError(f"unknown key {key!r} in {where}{did_you_mean(str(key), valid)}; "
                              f"valid keys are {', '.join(sorted(valid))}")


def _check_spec_keys(data: Any, where: str) -> None:
    _check_keys(data, _SPEC_KEYS, where)

