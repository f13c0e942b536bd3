"""Room ``sensitivity_analysis``: which quantized layers hurt the model most, and which to skip.

Floors, bottom up (each module imports only those below it):

* :mod:`.probes` — a layer's quantizers, switching them on and off (:func:`apply_skip`);
* :mod:`.data` — batches, outputs, metrics, the resumable result cache (``ResultLog``);
* :mod:`.recommend` — :class:`SkipRecommendation` and the greedy :func:`recommend_skip`;
* :mod:`.report` — :class:`SensitivityReport` and the JSON/Markdown/HTML files people read;
* :mod:`.sharing` — the probes shared among ``torch.distributed`` ranks, results gathered;
* :mod:`.scores` — :func:`qatgraph.sensitivity` and ``auto_skip``.

May import: :mod:`qatgraph.quant`, :mod:`qatgraph.graph`, :mod:`qatgraph.passes` (names only),
:mod:`qatgraph.info`, :mod:`qatgraph.policy`, :mod:`qatgraph.progress`, :mod:`qatgraph.errors`,
:mod:`qatgraph.distributed`, :mod:`qatgraph.atomic_files`.
"""
from __future__ import annotations

from .probes import LayerQuantizers, apply_skip, layer_quantizers
from .recommend import SkipRecommendation, recommend_skip
from .report import SensitivityReport
from .scores import MODES, agreement_metric, auto_skip, sensitivity

__all__ = ["MODES", "LayerQuantizers", "SensitivityReport", "SkipRecommendation", "agreement_metric", "apply_skip",
           "auto_skip", "layer_quantizers", "recommend_skip", "sensitivity"]
