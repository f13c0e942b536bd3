"""The skip recommendation: which layers to leave in floating point so the metric stays in budget.

:func:`recommend_skip` walks a :class:`~qatgraph.sensitivity_analysis.report.SensitivityReport`'s ranking
greedily, re-evaluating the user's metric after each skip, and returns a
:class:`SkipRecommendation` (also stored on the report). It restores the model afterwards; only
:meth:`SkipRecommendation.apply` (``qatgraph.apply_skip``) changes it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from qatgraph.errors import SensitivityError

from .data import _evaluate
from .probes import Metric, RankedLayers, _Probe, apply_skip

log = logging.getLogger(__name__)

__all__ = ["SkipRecommendation", "recommend_skip"]


@dataclass
class SkipRecommendation:
    """The greedy skip selection: layers to leave in floating point and the metric after each skip."""

    skip: list[str]
    metric_fp: float
    metric_int8: float
    metric_reached: float
    within_budget: bool
    steps: list[tuple[str, float]]
    max_drop: float = 0.01

    def apply(self, qmodel: Any, report: RankedLayers | None = None) -> list[str]:
        """Disable the recommended layers' quantizers in ``qmodel`` (see ``qatgraph.apply_skip``)."""
        return apply_skip(qmodel, self.skip, report=report)

    def to_dict(self) -> dict[str, Any]:
        return {"skip": list(self.skip), "metric_fp": self.metric_fp, "metric_int8": self.metric_int8,
                "metric_reached": self.metric_reached, "within_budget": self.within_budget,
                "max_drop": self.max_drop, "steps": [[layer, value] for layer, value in self.steps]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipRecommendation:
        return cls(skip=list(data["skip"]), metric_fp=data["metric_fp"], metric_int8=data["metric_int8"],
                   metric_reached=data["metric_reached"], within_budget=data["within_budget"],
                   steps=[(layer, value) for layer, value in data["steps"]], max_drop=data.get("max_drop", 0.01))


def recommend_skip(report: RankedLayers, qmodel: nn.Module, metric: Metric, max_drop: float = 0.01,
                   max_skipped: int | None = None) -> SkipRecommendation:
    """Greedy: skip layers in ``report.ranking`` order, re-evaluating ``metric`` after each, until
    ``metric >= metric_fp - max_drop`` or ``max_skipped`` layers are skipped. Restores the model."""
    if max_skipped is not None and max_skipped < 0:
        raise SensitivityError(f"max_skipped={max_skipped}: use a non-negative number of layers (or None)")
    probe = _Probe(qmodel)
    candidates = [layer for layer in report.ranking if layer in probe.layers]
    was_training = qmodel.training
    qmodel.eval()
    try:
        probe.disable_all()
        metric_fp = _evaluate(metric, qmodel, "the floating-point model")
        probe.restore()
        current = metric_int8 = _evaluate(metric, qmodel, "the fully quantized model")
        skip: list[str] = []
        steps: list[tuple[str, float]] = []
        for layer in candidates:
            if current >= metric_fp - max_drop or (max_skipped is not None and len(skip) >= max_skipped):
                break
            skip.append(layer)
            probe.enable_all_but(skip)
            current = _evaluate(metric, qmodel, f"the model with {skip} skipped")
            steps.append((layer, current))
    finally:
        probe.restore()
        qmodel.train(was_training)
    recommendation = SkipRecommendation(skip=skip, metric_fp=metric_fp, metric_int8=metric_int8, metric_reached=current,
                                        within_budget=current >= metric_fp - max_drop, steps=steps, max_drop=max_drop)
    report.recommendation = recommendation
    log.info("sensitivity: skipping %d layer(s) %s: metric %.4g -> %.4g (FP %.4g, budget %.4g)", len(skip), skip,
             metric_int8, current, metric_fp, max_drop)
    return recommendation
