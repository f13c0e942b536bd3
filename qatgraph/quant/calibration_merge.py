"""Merging the calibration statistics of every process of a ``torch.distributed`` group.

Expects quantizers in calibration mode (``start_calibration`` called; each rank collected its own
shard, possibly no batch at all) and the same quantizers, in the same order, on every rank.
Guarantees: afterwards every rank's calibrators hold the statistics of the union of the shards,
so ``compute_range`` gives identical ranges on every rank. ``max``: the running minimum and
maximum are reduced by MIN and MAX, exactly what one process would have seen. ``percentile``,
``entropy`` and ``mse``: the ranks first agree on the histogram range (MIN of the lower ends, MAX
of the upper ends), each re-bins its counts onto it, then the counts are summed bin by bin and
the percentile / KL / MSE search runs on the merged histogram; one process would have re-binned
at other moments (whenever a batch grew its range), so results match it to about a bin.

Cost: four collectives for the whole model (a layout check, then MIN, MAX and SUM over all
quantizers' statistics concatenated), 2049 float64 values per histogram. Without a process group it does nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from qatgraph.distributed import all_gather_objects, all_reduce, is_distributed
from qatgraph.errors import CalibrationError, DistributedError

from .quantizer import FakeQuantizer


def merge_across_processes(quantizers: Sequence[FakeQuantizer]) -> None:
    """Give every rank's calibrators the statistics of all ranks (see the module docstring). Collective."""
    if not is_distributed() or not quantizers:
        return
    calibrators = [quantizer.calibrator for quantizer in quantizers]
    if any(calibrator is None for calibrator in calibrators):
        missing = [q.name for q, c in zip(quantizers, calibrators) if c is None]
        raise CalibrationError(f"quantizers {missing} are not collecting calibration data: call start_calibration() "
                               "on every quantizer before merging")
    extremes = []
    for quantizer, calibrator in zip(quantizers, calibrators):
        try:
            extremes.append(calibrator.extremes(quantizer.scale.numel()))
        except CalibrationError as exc:
            raise CalibrationError(f"quantizer {quantizer.name!r}: {exc}") from None
    sizes = [low.numel() for low, _ in extremes]
    layouts = all_gather_objects((len(quantizers), sum(sizes)))
    if len(set(layouts)) > 1:
        raise DistributedError(
            "calibration: the ranks' models differ (quantizers and statistics per rank: "
            f"{', '.join(f'rank {i}: {n} / {m}' for i, (n, m) in enumerate(layouts))}); compile the same model with "
            "the same policy on every rank")
    minima = all_reduce(torch.cat([low for low, _ in extremes]), "min")
    maxima = all_reduce(torch.cat([high for _, high in extremes]), "max")
    for calibrator, low, high in zip(calibrators, minima.split(sizes), maxima.split(sizes)):
        calibrator.agree_extremes(low, high)
    local_sums = [calibrator.sums() for calibrator in calibrators]
    sums = all_reduce(torch.cat(local_sums), "sum")
    for calibrator, part in zip(calibrators, sums.split([s.numel() for s in local_sums])):
        calibrator.take_sums(part)
