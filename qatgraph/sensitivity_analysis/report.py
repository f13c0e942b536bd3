"""The result of a sensitivity analysis and the files people read: JSON, Markdown and HTML.

:class:`SensitivityReport` holds the ranking (most sensitive layer first), each layer's score and
every number measured for it, the baselines, and the skip recommendation once
:meth:`SensitivityReport.recommend_skip` ran. ``save(dir)`` writes ``sensitivity.json``,
``sensitivity.md`` (ranked table and what the score means) and a self-contained
``sensitivity.html`` (a bar chart embedded as a base64 PNG, skipped layers in another colour,
plus the table). Each file is written to a temporary name, fsynced and renamed, so a reader never
sees half a file. The numbers are computed in :mod:`qatgraph.sensitivity_analysis.scores`; the skip
recommendation is :mod:`qatgraph.sensitivity_analysis.recommend`'s.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qatgraph.atomic_files import write_text
from qatgraph.distributed import run_on_main
from qatgraph.errors import SensitivityError

from .recommend import SkipRecommendation, recommend_skip

log = logging.getLogger(__name__)

# (details key, column title): shown when at least one layer has a value.
COLUMNS: list[tuple[str, str]] = [
    ("score_fast", "fast score"), ("nmse_only", "NMSE only this layer"), ("sqnr_only_db", "SQNR only (dB)"),
    ("nmse_all_but", "NMSE all but this layer"), ("sqnr_all_but_db", "SQNR all but (dB)"),
    ("error_drop", "error removed by skipping"), ("fisher", "Fisher (Taylor)"),
    ("metric_without", "metric with layer skipped"), ("metric_gain", "metric gain from skipping"),
]

EXPLANATIONS = {
    "fast": (
        "Score (fast mode): each layer is measured by how far the model output moves from the floating-point "
        "output, as NMSE = sum((y_q - y)^2) / sum(y^2) over the samples (SQNR = -10 log10 NMSE). "
        "\"Only this layer\" quantizes just the layer's weight, input and residual quantizers; \"all but this "
        "layer\" quantizes everything else. Score = NMSE with only this layer quantized + the error removed by "
        "returning this layer to floating point (NMSE of the fully quantized model - NMSE all but this layer, "
        "floored at 0). Higher means more sensitive: those layers are the first candidates to skip."),
    "full": (
        "Score (full mode): the task metric (higher is better) is evaluated with this layer left in floating point "
        "and everything else quantized; score = metric with the layer skipped - metric of the fully quantized "
        "model, i.e. how much of the quantization loss skipping this one layer recovers. Layers without a score "
        "were not evaluated (top_k) and are ranked after the evaluated ones by the fast proxy."),
}


@dataclass
class SensitivityReport:
    """Per-layer sensitivity: ``ranking`` (most sensitive first), ``scores``, ``details``, ``baseline``."""

    mode: str
    ranking: list[str]
    scores: dict[str, float | None]
    details: dict[str, dict[str, Any]]
    baseline: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)
    recommendation: SkipRecommendation | None = None
    _model: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    # ----------------------------------------------------------------- skip selection
    def recommend_skip(self, metric: Callable[[Any], float], max_drop: float = 0.01,
                       max_skipped: int | None = None) -> SkipRecommendation:
        """Greedy skip list on the analysed model (see :func:`qatgraph.recommend_skip`)."""
        model = self._model() if self._model is not None else None
        if model is None:
            raise SensitivityError("this report is not attached to a live model (it was loaded from a file, or the "
                                   "model was deleted): call qatgraph.recommend_skip(report, qmodel, "
                                   "metric) with the model instead")
        return recommend_skip(self, model, metric, max_drop=max_drop, max_skipped=max_skipped)

    def ranking_by(self, key: str) -> list[str]:
        """Layers ordered by another measured number (e.g. ``"fisher"``), largest first; missing values last."""
        return sorted(self.ranking, key=lambda layer: (self.details[layer].get(key) is None,
                                                       -(self.details[layer].get(key) or 0.0)))

    # ----------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return _finite({"mode": self.mode, "ranking": list(self.ranking), "scores": dict(self.scores),
                        "details": self.details, "baseline": self.baseline, "options": self.options,
                        "recommendation": self.recommendation.to_dict() if self.recommendation else None})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityReport:
        recommendation = data.get("recommendation")
        return cls(mode=data["mode"], ranking=list(data["ranking"]), scores=dict(data["scores"]),
                   details=dict(data["details"]), baseline=dict(data["baseline"]), options=dict(data.get("options", {})),
                   recommendation=SkipRecommendation.from_dict(recommendation) if recommendation else None)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SensitivityReport:
        """Read a ``sensitivity.json`` (or the directory holding one) written by :meth:`save`."""
        path = Path(path)
        with open(path / "sensitivity.json" if path.is_dir() else path, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def save(self, directory: str | os.PathLike, skip: list[str] | None = None) -> dict[str, Path]:
        """Write sensitivity.json/.md/.html into ``directory`` (created if needed); returns the paths.

        ``skip`` (default: the recommendation's skip list) is highlighted in the chart and table.
        Each file is written atomically; under ``torch.distributed`` rank 0 writes them and every
        rank returns once they are complete (call it on every rank)."""
        skip = list(skip if skip is not None else self.recommendation.skip if self.recommendation else [])
        directory = Path(directory)
        paths = {"json": directory / "sensitivity.json", "md": directory / "sensitivity.md",
                 "html": directory / "sensitivity.html"}

        def write() -> None:
            directory.mkdir(parents=True, exist_ok=True)
            write_text(paths["json"], json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
            write_text(paths["md"], self.markdown(skip))
            write_text(paths["html"], self.html(skip))

        run_on_main(write, f"saving the sensitivity report to {str(directory)!r}")
        return paths

    # ----------------------------------------------------------------- rendering
    def _columns(self) -> list[tuple[str, str]]:
        primary = "score_fast" if self.mode == "fast" else "metric_gain"  # already the "score" column
        return [(key, title) for key, title in COLUMNS
                if key != primary and any(d.get(key) is not None for d in self.details.values())]

    def _rows(self, skip: list[str]) -> list[list[str]]:
        rows = []
        for rank, layer in enumerate(self.ranking, start=1):
            values = [_number(self.details[layer].get(key)) for key, _ in self._columns()]
            rows.append([str(rank), layer, _number(self.scores.get(layer)), *values, "yes" if layer in skip else ""])
        return rows

    def _headers(self) -> list[str]:
        return ["rank", "layer", "score", *(title for _, title in self._columns()), "skipped"]

    def _baseline_lines(self) -> list[str]:
        names = {"nmse_all": "NMSE of the fully quantized model", "sqnr_all_db": "SQNR of the fully quantized model (dB)",
                 "metric_fp": "metric, floating point", "metric_int8": "metric, fully quantized",
                 "num_samples": "samples", "forward_passes": "forward passes over the samples",
                 "backward_passes": "backward passes (batches)", "metric_evaluations": "metric evaluations",
                 "cached_results": "results reused from the cache", "seconds": "seconds"}
        return [f"{label}: {_number(self.baseline[key])}" for key, label in names.items() if key in self.baseline]

    def _recommendation_lines(self) -> list[str]:
        rec = self.recommendation
        if rec is None:
            return []
        verdict = "within" if rec.within_budget else "NOT within"
        summary = (f"Skip {len(rec.skip)} layer(s): {', '.join(rec.skip) or '(none)'}. Metric: FP "
                   f"{_number(rec.metric_fp)}, fully quantized {_number(rec.metric_int8)}, after skipping "
                   f"{_number(rec.metric_reached)} ({verdict} the budget of {_number(rec.max_drop)} below FP).")
        lines = [summary]
        lines += [f"after skipping {layer}: {_number(value)}" for layer, value in rec.steps]
        return lines

    def markdown(self, skip: list[str] | None = None) -> str:
        skip = skip if skip is not None else (self.recommendation.skip if self.recommendation else [])
        headers = self._headers()
        out = [f"# Quantization sensitivity ({self.mode} mode)", "", EXPLANATIONS[self.mode], "", "## Baseline", ""]
        out += [f"- {line}" for line in self._baseline_lines()]
        if self.recommendation is not None:
            out += ["", "## Skip recommendation", ""] + [f"- {line}" for line in self._recommendation_lines()]
        out += ["", "## Layers, most sensitive first", "", "| " + " | ".join(headers) + " |",
                "|" + "|".join("---:" if i != 1 else "---" for i in range(len(headers))) + "|"]
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in self._rows(skip)]
        return "\n".join(out) + "\n"

    def html(self, skip: list[str] | None = None) -> str:
        skip = skip if skip is not None else (self.recommendation.skip if self.recommendation else [])
        esc = html.escape
        head = "".join(f"<th>{esc(h)}</th>" for h in self._headers())
        body = "".join("<tr" + (' class="skipped"' if row[-1] else "") + ">" +
                       "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in self._rows(skip))
        chart = _chart_png(self.ranking, self.scores, skip, self.mode)
        image = (f'<img alt="per-layer sensitivity scores" src="data:image/png;base64,{chart}">' if chart else
                 "<p><em>Install matplotlib to get the bar chart of the scores.</em></p>")
        recommendation = f"<h2>Skip recommendation</h2>{_html_list(self._recommendation_lines())}" \
            if self.recommendation else ""
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>qatgraph sensitivity</title><style>"
                "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse}"
                "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:nth-child(2){text-align:left}"
                "tr.skipped{background:#fde2cc}img{max-width:100%}</style></head><body>"
                f"<h1>Quantization sensitivity ({esc(self.mode)} mode)</h1><p>{esc(EXPLANATIONS[self.mode])}</p>"
                f"<h2>Baseline</h2>{_html_list(self._baseline_lines())}{recommendation}{image}"
                f"<h2>Layers, most sensitive first</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
                "</table></body></html>\n")


def _chart_png(ranking: list[str], scores: dict[str, float | None], skip: list[str], mode: str) -> str | None:
    """Horizontal bars, most sensitive on top, skipped layers in orange; base64 PNG or None without matplotlib."""
    try:
        from matplotlib.figure import (
            Figure,  # the OO API renders with Agg and never touches pyplot's backend
        )
    except ImportError:
        return None
    layers = [layer for layer in ranking if scores.get(layer) is not None]
    values = [float(scores[layer]) for layer in layers]  # type: ignore[arg-type]
    figure = Figure(figsize=(9, 1.2 + 0.28 * max(len(layers), 1)), dpi=100)
    axes = figure.subplots()
    colours = ["#e8710a" if layer in skip else "#1f77b4" for layer in layers]
    axes.barh(range(len(layers)), values, color=colours)
    axes.set_yticks(range(len(layers)), labels=layers, fontsize=8)
    axes.invert_yaxis()
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 1e3:
        axes.set_xscale("log")  # NMSE scores span decades; a linear axis would show one bar
    axes.set_xlabel("sensitivity score (" + ("output-error proxy" if mode == "fast" else "metric gain from skipping")
                    + ")" + ("; orange = skipped" if skip else ""))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _html_list(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>"


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _finite(value: Any) -> Any:
    """Replace non-finite floats by None so the JSON is strict (no NaN/Infinity tokens)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
