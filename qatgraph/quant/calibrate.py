"""``qatgraph.calibrate``: post-training calibration of activation scales (the QAT starting point)."""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qatgraph.distributed import all_reduce, gather_failures, is_main_process, unwrap
from qatgraph.errors import CalibrationError
from qatgraph.progress import progress

from .calibration_merge import merge_across_processes
from .quantizer import FakeQuantizer, iter_quantizers

log = logging.getLogger(__name__)


def run_batch(model: nn.Module, batch: Any, device: torch.device | None) -> Any:
    """Call ``model`` on one batch: a tensor, a tuple/list of forward's arguments, or a dict of kwargs."""
    batch = _to_device(batch, device)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, dict):
        return model(**batch)
    raise CalibrationError(f"a calibration batch must be a tensor, a tuple/list of tensors or a dict of keyword "
                           f"arguments, not {type(batch).__name__}; use input_fn= to extract the inputs")


def _to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in model.parameters()), None)


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
    quantizers = [(n, q) for n, q in iter_quantizers(model) if q.is_enabled]
    activations = [(n, q) for n, q in quantizers if not q.is_weight]
    for _, quantizer in quantizers:
        if quantizer.is_weight:
            _recalibrate_weight(model, quantizer)
    if not activations:
        log.warning("qatgraph.calibrate: the model has no enabled activation quantizer; nothing to calibrate")
        return {}
    device = model_device(model)
    was_training = model.training
    model.eval()
    for _, quantizer in activations:
        quantizer.start_calibration()
    try:
        seen = _collect(model, batches, num_batches, input_fn, device, show_progress)
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
    if is_main_process():
        log.info("qatgraph.calibrate: %d activation quantizers calibrated from %d batches", len(activations), seen)
    return {name: float(q.amax().max()) for name, q in activations}


def _collect(model: nn.Module, batches: Iterable[Any], num_batches: int | None,
             input_fn: Callable[[Any], Any] | None, device: torch.device | None, show_progress: bool) -> int:
    """Run the batches through the collecting model; returns how many batches all ranks ran."""
    seen, failure = 0, None
    try:
        stream = itertools.islice(batches, num_batches) if num_batches is not None else batches
        total = num_batches if num_batches is not None else _length(batches)
        for item in progress(stream, total=total, desc="calibrating", unit="batch", enabled=show_progress):
            run_batch(model, input_fn(item) if input_fn is not None else item, device)
            seen += 1
    except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it before the merge's collectives
        failure = exc
    gather_failures(failure, "calibration")
    return int(all_reduce(torch.tensor([seen], dtype=torch.float64), "sum")[0])


def _recalibrate_weight(model: nn.Module, quantizer: FakeQuantizer) -> None:
    for module in model.modules():
        if getattr(module, "weight_quantizer", None) is quantizer:
            quantizer.calibrate_from(module.weight.detach())
            return


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
