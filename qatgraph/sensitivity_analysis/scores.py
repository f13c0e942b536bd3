"""Layer-wise sensitivity analysis: which quantized layers hurt the model most, and which to skip.

    report = qatgraph.sensitivity(qmodel, batches)                        # fast proxy, no labels needed
    rec = report.recommend_skip(metric, max_drop=0.01)                    # greedy, real metric
    qatgraph.apply_skip(qmodel, rec.skip, report=report)                  # or Policy(skip=rec.skip)
    report.save("reports/")                                               # .json, .md, .html

Expects a model from :func:`qatgraph.compile`, calibrated. Guarantees: every quantizer's enabled
flag and the train/eval mode are restored afterwards (also on errors); only ``apply_skip``
changes the model.

**A layer's quantizers** are its weight quantizer, the activation quantizers feeding it and the
residual-skip quantizer placed because of it (TensorRT rule 4). Activation quantizers can be
shared (one tensor feeding two convs). "Only L quantized" enables every quantizer L needs, so a
shared one also quantizes that tensor for its other consumers, as it would in the deployed
graph. "All but L" and :func:`apply_skip` disable only the quantizers no other still-quantized
layer needs -- the same rule as the compile-time skip pass.

**Scores.** ``fast``: with the FP output (all quantizers off) as reference, NMSE =
sum((y_q - y)^2) / sum(y^2) over all samples; per layer, ``nmse_only`` (only L quantized) and
``nmse_all_but`` (everything but L); ``score = nmse_only + max(0, nmse_all - nmse_all_but)``:
the error L causes alone plus the error removed by returning it to FP (2 passes per layer).
``gradient=True`` adds ``fisher``: per sample, the first-order Taylor estimate of the loss change
dL/dY . (Y_q - Y) (Y_q: layer output in the quantized model, Y: the same layer in FP on its
unquantized input), squared and averaged; one backward pass per batch; loss ``loss_fn(output,
item)`` (item: the data item, before ``input_fn``) or the summed squared error to the FP output;
not available for functional matmuls (no module to hook).
``full``: ``metric(model)`` (higher is better, called in eval mode) with each layer skipped;
``score = metric_without - metric_int8``. With ``top_k`` only the k layers ranked worst by the
fast tier get full evaluations and rank first; the rest follow in fast order.

**Processes.** Under a ``torch.distributed`` group (:mod:`qatgraph.distributed`) every rank
calls ``sensitivity`` with the same model and the same samples; the per-layer probes (and the
gradient tier's batches) are shared among the ranks and their results gathered, so the report
is the one a single process computes, and each rank runs ``1 / ranks`` of the probes
(:mod:`.sharing`). ``recommend_skip`` is not shared: every rank runs the same greedy search.

**Cache.** With ``cache_dir``, results go to ``<cache_dir>/sensitivity-<fingerprint>.jsonl``
(one JSON line per result, flushed and fsynced; rank 0's alone under torch.distributed) keyed by
a sha256 over the state_dict, the policy, the data and the options, so a rerun or a crashed run
resumes. The metric and loss functions enter the fingerprint by qualified name only: clear the
cache after editing them.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qatgraph.distributed import unwrap
from qatgraph.errors import SensitivityError, did_you_mean, plural, warn
from qatgraph.policy import SensitivityConfig
from qatgraph.quant.batches import model_device, run_batch
from qatgraph.quant.quantizer import FakeQuantizer, iter_quantizers

from .data import (
    ResultLog,
    _batch_size,
    _evaluate,
    _flat_output,
    _map_tensors,
    _materialize,
    _output_nmse,
    _output_tensors,
    _qualname,
    _result_log,
    _sqnr_db,
)
from .probes import (
    LayerQuantizers,
    Metric,
    _compile_info,
    _Probe,
    apply_skip,
    layer_quantizers,
)
from .recommend import SkipRecommendation, recommend_skip
from .report import SensitivityReport
from .sharing import check_same_everywhere, shared_map, shared_results

log = logging.getLogger(__name__)

MODES = ("fast", "full")
FEW_SAMPLES = 32  # fewer samples than asked, and fewer than this: the ranking is noise-prone, say so
__all__ = ["MODES", "LayerQuantizers", "SensitivityReport", "SkipRecommendation", "agreement_metric", "apply_skip",
           "auto_skip", "layer_quantizers", "recommend_skip", "sensitivity"]


def sensitivity(qmodel: nn.Module, data: Iterable[Any], metric: Metric | None = None, mode: str = "fast",
                num_samples: int | None = 256, *, gradient: bool = False,
                loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, top_k: int | None = None,
                cache_dir: str | os.PathLike | None = None, input_fn: Callable[[Any], Any] | None = None,
                show_progress: bool = True) -> SensitivityReport:
    """Rank the quantized layers of ``qmodel`` by how much their quantization hurts (see the module doc)."""
    _check_options(mode, metric, num_samples, top_k)
    qmodel = unwrap(qmodel)
    info, probe = _compile_info(qmodel), _Probe(qmodel)
    batches, items, count = _materialize(data, input_fn, num_samples, model_device(qmodel))
    check_same_everywhere(qmodel, items)
    if num_samples is not None and count < min(num_samples, FEW_SAMPLES):
        warn(f"qatgraph.sensitivity: num_samples={num_samples}, but the data held only {plural(count, 'sample')}; the "
             "scores rest on those and rank layers unsteadily. Pass more data (at least "
             f"{min(num_samples, FEW_SAMPLES)} samples).")
    options = {"mode": mode, "num_samples": count, "gradient": gradient, "top_k": top_k, "layers": probe.layers,
               "metric": _qualname(metric), "loss_fn": _qualname(loss_fn), "version": 1}
    results = _result_log(cache_dir, qmodel, info, items, options)  # items, not batches: labels matter to loss_fn
    run = _Run(qmodel, probe, batches, items, results,
               details={layer: {"quantizers": list(probe.by_layer[layer].names), "shared_quantizers": probe.shared(layer)}
                        for layer in probe.layers},
               baseline={"num_samples": count, "num_batches": len(batches), "forward_passes": 0},
               show_progress=show_progress)
    started, was_training = time.perf_counter(), qmodel.training
    qmodel.eval()
    try:
        if mode == "fast" or top_k is not None or gradient:
            run.compute_references()
        if mode == "fast" or top_k is not None:
            run.fast_tier()
        if gradient:
            run.gradient_tier(loss_fn)
        if mode == "full":
            order = _rank(probe.layers, run.details, "score_fast") if top_k is not None else probe.layers
            run.full_tier(metric, order[:top_k])  # type: ignore[arg-type]
    finally:
        probe.restore()
        qmodel.train(was_training)
    run.baseline.update(seconds=time.perf_counter() - started, cached_results=run.log.hits)
    key = "score_fast" if mode == "fast" else "metric_gain"
    ranking = _rank(probe.layers, run.details, key, fallback="score_fast")
    report = SensitivityReport(mode=mode, ranking=ranking, scores={layer: run.details[layer].get(key) for layer in ranking},
                               details=run.details, baseline=run.baseline,
                               options={k: v for k, v in options.items() if k != "layers"})
    report._model = weakref.ref(qmodel)
    return report


def _check_options(mode: str, metric: Metric | None, num_samples: int | None, top_k: int | None) -> None:
    if mode not in MODES:
        raise SensitivityError(f"mode={mode!r}: use 'fast' (output-error proxy, no labels) or 'full' (a metric per "
                               f"layer){did_you_mean(str(mode), MODES)}")
    if mode == "full" and metric is None:
        raise SensitivityError("mode='full' evaluates metric(model) -> float for each layer, but metric is None: pass "
                               "metric= (e.g. a validation accuracy function) or use mode='fast'")
    if num_samples is not None and num_samples <= 0:
        raise SensitivityError(f"num_samples={num_samples}: use a positive number of samples (or None for all)")
    if top_k is not None and top_k <= 0:
        raise SensitivityError(f"top_k={top_k}: use a positive number of layers (or None for all of them)")


def _rank(layers: list[str], details: dict[str, dict[str, Any]], key: str, fallback: str | None = None) -> list[str]:
    """Most sensitive first: layers with ``key`` by it, then the rest by ``fallback`` (stable)."""
    def sort_key(layer: str) -> tuple[bool, float, float]:
        primary, secondary = details[layer].get(key), details[layer].get(fallback) if fallback else None
        return (primary is None, -(primary or 0.0), -(secondary or 0.0))
    return sorted(layers, key=sort_key)


@dataclass
class _Run:
    """One analysis: the model, its quantizer probe, the batches, the result log and what was measured."""

    model: nn.Module
    probe: _Probe
    batches: list[Any]
    items: list[Any]
    log: ResultLog
    details: dict[str, dict[str, Any]]
    baseline: dict[str, Any]
    show_progress: bool
    references: list[torch.Tensor] = field(default_factory=list)

    def compute_references(self) -> None:
        """The FP outputs (all quantizers disabled): the reference of every NMSE."""
        self.probe.disable_all()
        with torch.no_grad():
            self.references = [_flat_output(run_batch(self.model, batch, None)) for batch in self.batches]
        self.baseline["forward_passes"] += 1
        if not all(torch.isfinite(r).all() for r in self.references):
            raise SensitivityError("the floating-point model (all quantizers disabled) produces NaN/Inf outputs on "
                                   "the sensitivity data: check the model and the data in floating point first")

    def nmse(self) -> float:
        self.baseline["forward_passes"] += 1
        return _output_nmse(self.model, self.batches, self.references)

    def fast_tier(self) -> None:
        probe = self.probe

        def measure(layer: str) -> dict[str, float]:
            probe.enable_only(layer)
            only = _output_nmse(self.model, self.batches, self.references)
            probe.enable_all_but([layer])
            return {"nmse_only": only, "nmse_all_but": _output_nmse(self.model, self.batches, self.references)}

        nmse_all = self.log.get_or_compute("fast", "<all quantized>", lambda: (probe.restore(), self.nmse())[1])
        self.baseline.update(nmse_all=nmse_all, sqnr_all_db=_sqnr_db(nmse_all))
        hits = self.log.hits
        results = shared_results(self.log, "fast", probe.layers, measure, description="sensitivity (fast)",
                                 show_progress=self.show_progress)
        # counted here, not in measure(): under torch.distributed each rank runs only its share
        self.baseline["forward_passes"] += 2 * (len(probe.layers) - (self.log.hits - hits))
        for layer in probe.layers:
            result = dict(results[layer])
            drop = nmse_all - result["nmse_all_but"]
            result.update(sqnr_only_db=_sqnr_db(result["nmse_only"]), sqnr_all_but_db=_sqnr_db(result["nmse_all_but"]),
                          error_drop=drop, score_fast=result["nmse_only"] + max(drop, 0.0))
            self.details[layer].update(result)

    def full_tier(self, metric: Metric, layers: list[str]) -> None:
        probe, baseline = self.probe, self.baseline
        configurations: dict[str, tuple[Callable[[], None], str]] = {
            "<all quantized>": (probe.restore, "the fully quantized model"),
            "<floating point>": (probe.disable_all, "the floating-point model"),
            **{layer: (lambda layer=layer: probe.enable_all_but([layer]), f"the model with {layer!r} skipped")
               for layer in layers}}

        def evaluate(key: str) -> float:
            configure, what = configurations[key]
            configure()
            return _evaluate(metric, self.model, what)

        values = shared_results(self.log, "full", list(configurations), evaluate, description="sensitivity (full)",
                                show_progress=self.show_progress)
        baseline["metric_int8"], baseline["metric_fp"] = values["<all quantized>"], values["<floating point>"]
        for layer in layers:
            self.details[layer].update(metric_without=values[layer], metric_gain=values[layer] - baseline["metric_int8"])
        baseline["metric_evaluations"] = len(layers) + 2

    def gradient_tier(self, loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> None:
        modules = dict(self.model.named_modules())
        targets = {layer: modules[layer] for layer in self.probe.layers if isinstance(modules.get(layer), nn.Module)}

        def batch_scores(index: int) -> dict[str, float]:
            return _fisher_batch(self.model, targets, self.probe.modules.values(), self.batches[index],
                                 self.items[index], self.references[index], loss_fn)

        def compute() -> dict[str, float]:
            self.probe.restore()
            totals, samples = dict.fromkeys(targets, 0.0), 0
            # the batches are shared among the ranks; the sums run in batch order, as in one process
            for batch, scores in zip(self.batches, shared_map(list(range(len(self.batches))), batch_scores,
                                                              what="sensitivity (gradient)")):
                for layer, value in scores.items():
                    totals[layer] += value
                samples += _batch_size(batch) or 1
            self.baseline["backward_passes"] = len(self.batches)
            return {layer: total / samples for layer, total in totals.items()}

        fisher = self.log.get_or_compute("gradient", "<all layers>", compute)
        for layer in self.probe.layers:
            self.details[layer]["fisher"] = fisher.get(layer)


def _fisher_batch(model: nn.Module, targets: dict[str, nn.Module], quantizers: Iterable[FakeQuantizer], batch: Any,
                  item: Any, reference: torch.Tensor, loss_fn: Callable[[Any, Any], torch.Tensor] | None,
                  ) -> dict[str, float]:
    raw: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(quantized tensor) -> (it, its FP input)
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in targets}

    def remember_raw(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if args and output is not args[0]:
            raw[id(output)] = (output, args[0])

    def capture(layer: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        entry = raw.get(id(args[0]))
        fp_input = entry[1] if entry is not None and entry[0] is args[0] else args[0]
        with torch.no_grad(), _own_quantizers_off(module):
            captured[layer].append((output, module.forward(fp_input, *args[1:])))

    hooks = [q.register_forward_hook(remember_raw) for q in set(quantizers)]
    hooks += [m.register_forward_hook(lambda m, a, o, _layer=layer: capture(_layer, m, a, o))
              for layer, m in targets.items()]
    try:
        with torch.enable_grad():
            grad_batch = _map_tensors(batch, lambda t: t.detach().requires_grad_(True) if t.is_floating_point() else t)
            output = run_batch(model, grad_batch, None)
            loss = loss_fn(output, item) if loss_fn is not None else \
                (_flat_output(output, detach=False) - reference).pow(2).sum()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise SensitivityError(f"loss_fn returned {type(loss).__name__}: it must return a scalar tensor "
                                       "computed from the model output (e.g. cross-entropy with the labels)")
            pairs = [(layer, y_q, y_fp) for layer, items in captured.items() for y_q, y_fp in items if y_q.requires_grad]
            grads = torch.autograd.grad(loss, [p[1] for p in pairs], allow_unused=True)
    finally:
        for hook in hooks:
            hook.remove()
    result = dict.fromkeys(targets, 0.0)
    for (layer, y_q, y_fp), grad in zip(pairs, grads):
        if grad is not None:
            per_sample = (grad.double() * (y_q.detach().double() - y_fp.double())).reshape(grad.shape[0], -1).sum(1)
            result[layer] += float(per_sample.pow(2).sum())
    return result


@contextmanager
def _own_quantizers_off(module: nn.Module):
    own = [q for q in (getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None))
           if isinstance(q, FakeQuantizer)]
    states = [q.is_enabled for q in own]
    try:
        for quantizer in own:
            quantizer.disable()
        yield
    finally:
        for quantizer, state in zip(own, states):
            quantizer.enable(state)


# ------------------------------------------------------------------------------------- skip selection
def auto_skip(qmodel: nn.Module, data: Iterable[Any], config: SensitivityConfig | None = None,
              metric: Metric | None = None, *, input_fn: Callable[[Any], Any] | None = None,
              cache_dir: str | os.PathLike | None = None,
              show_progress: bool = True) -> tuple[SensitivityReport, SkipRecommendation]:
    """Analyse, pick the skip list and apply it, as ``Policy.sensitivity`` (a :class:`SensitivityConfig`)
    says; ``metric`` defaults to top-1 agreement with the FP model on the same samples (classifiers)."""
    config = config or SensitivityConfig()
    batches = _materialize(data, input_fn, config.num_samples, model_device(qmodel))[0]
    metric = metric or agreement_metric(batches, num_samples=None)
    report = sensitivity(qmodel, batches, metric if config.mode == "full" else None, config.mode, None,
                         top_k=config.top_k, cache_dir=cache_dir, show_progress=show_progress)
    recommendation = report.recommend_skip(metric, max_drop=config.max_drop, max_skipped=config.max_skipped)
    apply_skip(qmodel, recommendation.skip, report=report)
    return report, recommendation


def agreement_metric(data: Iterable[Any], *, num_samples: int | None = 256,
                     input_fn: Callable[[Any], Any] | None = None) -> Metric:
    """``metric(model)`` = fraction of samples whose top-1 class (argmax over the last dim of the first
    output tensor) equals the floating-point model's; the FP predictions are computed on first use
    with all quantizers disabled (the quantizer states are restored)."""
    materialized: dict[str, Any] = {}

    @torch.no_grad()
    def predictions(model: nn.Module) -> list[torch.Tensor]:
        if "batches" not in materialized:
            materialized["batches"] = _materialize(data, input_fn, num_samples, model_device(model))[0]
        return [_output_tensors(run_batch(model, b, None))[0].argmax(-1) for b in materialized["batches"]]

    def metric(model: nn.Module) -> float:
        if "reference" not in materialized or materialized["model"]() is not model:
            quantizers = [q for _, q in iter_quantizers(model)]
            states = [q.is_enabled for q in quantizers]
            try:
                for quantizer in quantizers:
                    quantizer.disable()
                materialized.update(reference=predictions(model), model=weakref.ref(model))
            finally:
                for quantizer, state in zip(quantizers, states):
                    quantizer.enable(state)
        agree = sum(int((p == r).sum()) for p, r in zip(predictions(model), materialized["reference"]))
        return agree / sum(r.numel() for r in materialized["reference"])

    return metric

