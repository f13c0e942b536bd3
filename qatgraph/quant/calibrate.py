"""``qatgraph.calibrate``: post-training calibration of activation scales (the QAT starting point).

Refuses, in one paragraph each: a model that was never compiled (it has no quantizer), batches
that do not fit ``forward`` (e.g. ``(inputs, labels)`` pairs without ``input_fn``), and a batch the
model fails on (wrong shape), naming the batch and what it held (:mod:`.batches`). Warns when the
data held fewer batches than ``num_batches`` asked for.

A model that ``compile`` traced only in part, without ``example_inputs``, has its untraced code
analysed on the first batch, before any range is collected (one quantizer per tensor, Conv-BN
folds: a hook qatgraph/pipeline.py registers, :mod:`.first_batch`).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qatgraph.distributed import all_reduce, gather_failures, is_main_process, unwrap
from qatgraph.errors import CalibrationError, UsageError, plural, warn
from qatgraph.progress import progress

from .batches import model_device, run_checked
from .calibration_merge import merge_across_processes
from .first_batch import run_first_batch_hooks, wanted
from .quantizer import FakeQuantizer, iter_quantizers

log = logging.getLogger(__name__)


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: int | None = None, *,
              input_fn: Callable[[Any], Any] | None = None, show_progress: bool = True) -> dict[str, float]:
    """Calibrate every enabled activation quantizer of a compiled model from ``batches``.

    ``batches`` is any iterable of input batches (a tensor, a tuple of forward's arguments, or
    a dict of keyword arguments); ``input_fn`` maps each item to such a batch (e.g.
    ``lambda b: b[0]`` for a loader of ``(inputs, labels)``). Runs in eval mode without
    gradients; at most ``num_batches`` batches. Weight scales are recomputed from the current
    weights. Scales change only if every quantizer calibrates successfully. Returns each
    activation quantizer's amax (its clipping threshold).

    Under a ``torch.distributed`` process group (:mod:`qatgraph.distributed`) each rank passes
    its own shard (``num_batches`` counts this rank's batches; a rank may have fewer, or none) and
    the statistics are merged across ranks, so every rank ends with the same scales: those one
    process computes from all the shards, exactly for ``max``; for ``percentile``, ``entropy``
    and ``mse`` the merged histogram is the histogram of all the shards to within a bin (see
    :mod:`qatgraph.quant.calibration_merge`). Call it on every rank. A
    ``DistributedDataParallel`` wrapper is looked through: its forward would synchronize buffers
    on every batch.
    """
    if num_batches is not None and num_batches <= 0:
        raise CalibrationError(f"num_batches={num_batches}: use a positive number of batches (or None for all)")
    model = unwrap(model)
    check_compiled(model, "qatgraph.calibrate")
    total = num_batches if num_batches is not None else _length(batches)
    hooks = wanted(model)
    if hooks:  # e.g. compile had no example_inputs for the untraced code (first_batch.py)
        batches = run_first_batch_hooks(model, hooks, batches, input_fn)
    quantizers = [(n, q) for n, q in iter_quantizers(model) if q.is_enabled]
    activations = [(n, q) for n, q in quantizers if not q.is_weight]
    for name, quantizer in quantizers:
        if quantizer.is_weight:
            _recalibrate_weight(model, name, quantizer)
    if not activations:
        log.warning("qatgraph.calibrate: the model has no enabled activation quantizer; nothing to calibrate")
        return {}
    device = model_device(model)
    was_training = model.training
    model.eval()
    for _, quantizer in activations:
        quantizer.start_calibration()
    try:
        local, seen = _collect(model, batches, num_batches, total, input_fn, device, show_progress)
        if seen == 0:
            raise CalibrationError("the calibration data yielded no batches: pass a non-empty iterable of input "
                                   "batches (e.g. a DataLoader or a list of tensors)")
        merge_across_processes([q for _, q in activations])
        ranges = [(q, q.collected_range()) for _, q in activations]  # all or nothing
    finally:
        for _, quantizer in activations:
            quantizer.stop_calibration()
        model.train(was_training)
    for quantizer, (lo, hi) in ranges:
        quantizer.set_range(lo, hi)
    if num_batches is not None and local < num_batches:
        warn(f"qatgraph.calibrate: asked for {plural(num_batches, 'batch')}, the data held only {local}; the scales "
             f"come from those {plural(local, 'batch')}. Pass more data (or num_batches={local} to silence this).")
    if is_main_process():
        log.info("qatgraph.calibrate: %d activation quantizers calibrated from %d batches", len(activations), seen)
    return {name: float(q.amax().max()) for name, q in activations}


def _collect(model: nn.Module, batches: Iterable[Any], num_batches: int | None, total: int | None,
             input_fn: Callable[[Any], Any] | None, device: torch.device | None,
             show_progress: bool) -> tuple[int, int]:
    """Run the batches through the collecting model; returns (batches this rank ran, all ranks ran)."""
    seen, failure = 0, None
    try:
        stream = itertools.islice(batches, num_batches) if num_batches is not None else batches
        for item in progress(stream, total=total, desc="calibrating", unit="batch", enabled=show_progress):
            seen += 1
            run_checked(model, input_fn(item) if input_fn is not None else item, device, seen, input_fn is not None)
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it before the merge's collectives
        failure = exc
    gather_failures(failure, "calibration")
    return seen, int(all_reduce(torch.tensor([seen], dtype=torch.float64), "sum")[0])


def check_compiled(model: nn.Module, caller: str) -> None:
    """Refuse a model that ``qatgraph.compile`` never saw: it has no quantizer to work with."""
    if not hasattr(model, "qatgraph_info") and not any(isinstance(m, FakeQuantizer) for m in model.modules()):
        raise UsageError(f"{caller}: {type(model).__name__} has no qatgraph quantizer, it was not compiled. Compile it "
                         "first: qmodel = qatgraph.compile(model, 'tensorrt', example_inputs=(x,)), then pass qmodel.")


def _recalibrate_weight(model: nn.Module, name: str, quantizer: FakeQuantizer) -> None:
    """From the weight the quantizer (qualified ``name``) sits next to: ``weight`` for
    ``weight_quantizer``, ``<tensor>`` for ``<tensor>_quantizer`` (functional ops on a parameter,
    passes/materialize.py)."""
    owner, _, child_name = name.rpartition(".")
    if not child_name.endswith("_quantizer"):
        return
    tensor = getattr(model.get_submodule(owner), child_name.removesuffix("_quantizer"), None)
    if isinstance(tensor, torch.Tensor):
        quantizer.calibrate_from(tensor.detach())


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
