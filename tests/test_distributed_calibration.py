"""Calibration under torch.distributed: two CPU processes joined by gloo (tests/distributed_ranks.py).

Oracles: every rank ends with bit-identical scales, equal to what one process computes on the union
of the ranks' shards (the reference runs inside rank 0 under ``qatgraph.distributed.this_rank_only``,
with the same thread count): exactly for ``max``, within one bin for ``percentile``; the merged
histograms (``entropy``, ``mse``) are the histogram of all shards, exactly when no rank re-bins.
"""
from __future__ import annotations

import pytest
import torch
from distributed_cases import tiny_model
from distributed_ranks import run_ranks
from torch import nn

import qatgraph
from qatgraph.distributed import this_rank_only
from qatgraph.policy import QuantSpec
from qatgraph.quant.calibration_merge import merge_across_processes
from qatgraph.quant.histograms import NUM_BINS
from qatgraph.quant.quantizer import FakeQuantizer

CALIBRATORS = ("max", "percentile", "entropy", "mse")


def _calibration_shards() -> list[list[torch.Tensor]]:
    """Rank 0: three batches, rank 1: two, of growing ranges, so that every histogram is re-binned
    at other moments on each rank than in one process reading all of them in order."""
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=generator) * (1.0 + 0.6 * i) + 0.2 * i for i in range(5)]
    return [[batches[0], batches[2], batches[4]], [batches[1], batches[3]]]


def _scales(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {name: q.scale.detach().clone() for name, q in qatgraph.iter_quantizers(qmodel) if not q.is_weight}


def _calibrate_everywhere(rank: int) -> dict[str, dict]:
    shards = _calibration_shards()
    results: dict[str, dict] = {}
    for preset in ("tensorrt", "onnxruntime"):  # symmetric INT8 and asymmetric UINT8 activations
        for calibrator in CALIBRATORS:
            policy = {"preset": preset, "activation": {"calibrator": calibrator}}
            qmodel = qatgraph.compile(tiny_model(), policy, example_inputs=(shards[0][0],))
            # a DDP-wrapped model is looked through
            target = nn.parallel.DistributedDataParallel(qmodel) if calibrator == "max" else qmodel
            qatgraph.calibrate(target, shards[rank])
            entry = {"scales": _scales(qmodel),
                     "zero_points": {n: q.zero_point.clone() for n, q in qatgraph.iter_quantizers(qmodel)}}
            if rank == 0:
                with this_rank_only():
                    reference = qatgraph.compile(tiny_model(), policy, example_inputs=(shards[0][0],))
                    qatgraph.calibrate(reference, shards[0] + shards[1])
                entry["reference"] = _scales(reference)
            results[f"{preset}/{calibrator}"] = entry
    return results


def test_calibration_gives_every_rank_the_same_scales_those_of_one_process_on_all_shards():
    rank0, rank1 = run_ranks(_calibrate_everywhere)
    for case, entry in rank0.items():
        for name, scale in entry["scales"].items():
            assert torch.equal(scale, rank1[case]["scales"][name]), f"{case} {name}: the ranks' scales differ"
        for name, zero_point in entry["zero_points"].items():
            assert torch.equal(zero_point, rank1[case]["zero_points"][name]), f"{case} {name}: zero-points differ"
    for preset in ("tensorrt", "onnxruntime"):
        for name, scale in rank0[f"{preset}/max"]["scales"].items():
            reference = rank0[f"{preset}/max"]["reference"][name]
            assert torch.equal(scale, reference), f"{preset} {name}: {scale} != one process's {reference}"
        # percentile: within one bin of the histogram, whose range is the max calibrator's
        span, ends = (127, 1) if preset == "tensorrt" else (255, 2)  # asymmetric: both ends move
        for name, scale in rank0[f"{preset}/percentile"]["scales"].items():
            bin_width = float(rank0[f"{preset}/max"]["reference"][name]) * span / NUM_BINS
            difference = abs(float(scale) - float(rank0[f"{preset}/percentile"]["reference"][name])) * span
            assert difference <= ends * bin_width * 1.0001, f"{preset} {name}: {difference / bin_width:.2f} bins apart"


# ------------------------------------------------------------------------------------- one quantizer
def _quantizer_shards(pinned: bool) -> list[list[torch.Tensor]]:
    """Growing ranges (each histogram re-binned at other moments on each rank than in one process), or
    ``pinned``: every rank's first batch already holds the extremes of all data, so nothing re-bins."""
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(2048, generator=generator) * (1.0 + 0.6 * i) + 0.2 * i for i in range(5)]
    shards = [[batches[0], batches[2], batches[4]], [batches[1], batches[3]]]
    if pinned:
        low, high = float(torch.cat(batches).min()) - 1.0, float(torch.cat(batches).max()) + 1.0
        for shard in shards:
            shard[0] = torch.cat([shard[0], torch.tensor([low, high])])
    return shards


def _collected(spec: QuantSpec, batches: list[torch.Tensor], merge: bool) -> FakeQuantizer:
    quantizer = FakeQuantizer(spec, name="q")
    quantizer.start_calibration()
    for batch in batches:
        quantizer(batch)
    if merge:
        merge_across_processes([quantizer])
    return quantizer


def _histogram_of(quantizer: FakeQuantizer) -> tuple[float, float, torch.Tensor]:
    histogram = quantizer.calibrator._histogram
    return histogram.lo, histogram.hi, histogram.counts.clone()


def _merge_one_quantizer(rank: int) -> dict:
    results: dict = {}
    for pinned in (True, False):
        shards = _quantizer_shards(pinned)
        for calibrator in CALIBRATORS:
            for symmetric in (True, False):
                spec = QuantSpec(calibrator=calibrator, symmetric=symmetric)
                merged = _collected(spec, shards[rank], merge=True)
                entry = {"range": merged.collected_range()}
                if calibrator != "max":
                    entry["histogram"] = _histogram_of(merged)
                if rank == 0:
                    with this_rank_only():
                        alone = _collected(spec, shards[0] + shards[1], merge=False)
                    entry["reference_range"] = alone.collected_range()
                    if calibrator != "max":
                        entry["reference_histogram"] = _histogram_of(alone)
                results[(pinned, calibrator, symmetric)] = entry
    # a rank without batches contributes nothing and fails nothing
    spec = QuantSpec(calibrator="entropy")
    results["empty shard"] = _collected(spec, _quantizer_shards(False)[0] if rank == 0 else [], merge=True) \
        .collected_range()
    return results


def test_merged_histograms_are_the_histogram_of_all_shards():
    rank0, rank1 = run_ranks(_merge_one_quantizer)
    for key, entry in rank0.items():
        if key == "empty shard":
            continue
        pinned, calibrator, _symmetric = key
        for mine, other in zip(entry["range"], rank1[key]["range"]):
            assert torch.equal(mine, other), f"{key}: the ranks' ranges differ"
        if calibrator == "max" or pinned:
            # no re-binning anywhere: the summed counts are exactly the counts of one process
            for mine, alone in zip(entry["range"], entry["reference_range"]):
                assert torch.allclose(mine, alone, rtol=1e-6, atol=0), f"{key}: {mine} != one process's {alone}"
        if calibrator != "max":
            lo, hi, counts = entry["histogram"]
            lo_alone, hi_alone, counts_alone = entry["reference_histogram"]
            assert (lo, hi) == (lo_alone, hi_alone), key
            # re-binned at other moments: cumulative counts agree to within one bin's count at every edge
            gap = (counts.cumsum(0) - counts_alone.cumsum(0)).abs().max()
            assert gap <= (0 if pinned else counts_alone.max()) + 1e-6, f"{key}: cumulative counts {float(gap)} apart"
    for mine, other in zip(rank0["empty shard"], rank1["empty shard"]):
        assert torch.equal(mine, other)


def _calibrate_with_a_bad_batch(rank: int) -> str:
    qmodel = qatgraph.compile(tiny_model(), "tensorrt", example_inputs=(torch.randn(2, 3, 8, 8),))
    batch = torch.randn(2, 3, 8, 8)
    if rank == 1:
        batch[0, 0, 0, 0] = float("nan")
    with pytest.raises(qatgraph.QatgraphError) as caught:
        qatgraph.calibrate(qmodel, [batch])
    return f"{type(caught.value).__name__}: {caught.value}"


def test_a_calibration_error_on_one_rank_stops_every_rank():
    rank0, rank1 = run_ranks(_calibrate_with_a_bad_batch)
    assert rank1.startswith("CalibrationError") and "NaN" in rank1
    assert rank0.startswith("DistributedError") and "rank 1" in rank0 and "NaN" in rank0
