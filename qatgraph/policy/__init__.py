"""Room ``policy``: what to quantize and how, as plain data.

* :mod:`.sections` — the policy's sections (:class:`QuantSpec`, :class:`LayerRule`,
  :class:`FreezeConfig`, :class:`SensitivityConfig`, :class:`TracingConfig`) and their validation;
* :mod:`.presets` — the ``tensorrt`` and ``onnxruntime`` presets as dicts;
* :mod:`.policy` — :class:`Policy`: building from a preset/dict/YAML, override resolution.

May import: :mod:`qatgraph.errors` only. Everything else in qatgraph reads policies; nothing here
knows about modules, graphs or tensors.
"""
from __future__ import annotations

from .policy import BN_MODES, OP_KINDS, TARGETS, Policy, ResolvedLayer
from .sections import (
    CALIBRATORS,
    FREEZE_MODES,
    GRANULARITIES,
    CalibratorName,
    FreezeConfig,
    Granularity,
    LayerRule,
    QuantSpec,
    SensitivityConfig,
    TracingConfig,
)

__all__ = [
    "Policy", "ResolvedLayer", "QuantSpec", "LayerRule", "FreezeConfig", "SensitivityConfig", "TracingConfig",
    "CALIBRATORS", "FREEZE_MODES", "GRANULARITIES", "CalibratorName", "Granularity", "TARGETS", "BN_MODES",
    "OP_KINDS",
]
