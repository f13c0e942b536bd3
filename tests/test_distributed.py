"""qatgraph under torch.distributed: two CPU processes joined by gloo (tests/distributed_ranks.py).

Oracles: every rank ends with bit-identical state, and that state equals what one process
computes on the union of the ranks' data (the reference runs inside rank 0 under
``qatgraph.distributed.this_rank_only``, with the same thread count). Tiny models, few samples:
each test is one spawn of two processes (a few seconds, mostly imports).
"""
from __future__ import annotations

import pytest
import torch
from distributed_ranks import run_ranks
from torch import nn

import qatgraph
from qatgraph.distributed import this_rank_only
from qatgraph.policy import QuantSpec
from qatgraph.quant.calibration_merge import merge_across_processes
from qatgraph.quant.histograms import NUM_BINS
from qatgraph.quant.quantizer import FakeQuantizer

CALIBRATORS = ("max", "percentile", "entropy", "mse")


class TinyNet(nn.Module):
    """Conv -> ReLU -> Conv -> pool -> Linear, wide enough (16 channels) for the tensorrt preset."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


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
            qmodel = qatgraph.compile(_model(), policy, example_inputs=(shards[0][0],))
            # a DDP-wrapped model is looked through
            target = nn.parallel.DistributedDataParallel(qmodel) if calibrator == "max" else qmodel
            qatgraph.calibrate(target, shards[rank])
            entry = {"scales": _scales(qmodel),
                     "zero_points": {n: q.zero_point.clone() for n, q in qatgraph.iter_quantizers(qmodel)}}
            if rank == 0:
                with this_rank_only():
                    reference = qatgraph.compile(_model(), policy, example_inputs=(shards[0][0],))
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
    qmodel = qatgraph.compile(_model(), "tensorrt", example_inputs=(torch.randn(2, 3, 8, 8),))
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


# ------------------------------------------------------------------------------------- fine-tuning
LEARNABLE = {"preset": "tensorrt", "weight": {"learnable_scale": True}}


def _training_batches(steps: int = 3, batch: int = 8, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 16, (batch,), generator=generator))
            for _ in range(steps)]


def _accuracy(model: nn.Module, batches) -> float:
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def _calibrated(policy) -> nn.Module:
    qmodel = qatgraph.compile(_model(), policy, example_inputs=(torch.randn(2, 3, 8, 8),))
    qatgraph.calibrate(qmodel, [x for x, _ in _training_batches(seed=4)], show_progress=False)
    return qmodel


def _halves(batches, rank: int):
    return [(x[rank * len(x) // 2:(rank + 1) * len(x) // 2], y[rank * len(y) // 2:(rank + 1) * len(y) // 2])
            for x, y in batches]


def _finetune_five_steps(rank: int, folder: str) -> dict:
    """5 DDP steps on half batches vs one process on the whole batches, from the same calibrated state."""
    import torch.nn.functional as F

    qmodel = _calibrated(LEARNABLE)
    start = {k: v.clone() for k, v in qmodel.state_dict().items()}
    # 5 steps: the recipe freezes the learnable scales after step 4 (80%), so step 5 runs without their gradients
    batches, validation = _training_batches(steps=5), _training_batches(steps=2, seed=5)
    checkpoint = f"{folder}/finetune.pt"
    history = qatgraph.finetune(qmodel, _halves(batches, rank), F.cross_entropy, epochs=1, base_lr=0.1,
                                val_loader=_halves(validation, rank), metric=_accuracy, checkpoint_path=checkpoint)
    result = {"state": qmodel.state_dict(), "history": history.epochs,
              "checkpoint": torch.load(checkpoint, weights_only=True)}  # rank 1 reads what rank 0 wrote
    if rank == 0:
        with this_rank_only():
            reference = qatgraph.compile(_model(), LEARNABLE, example_inputs=(torch.randn(2, 3, 8, 8),))
            reference.load_state_dict(start)
            reference_history = qatgraph.finetune(reference, batches, F.cross_entropy, epochs=1, base_lr=0.1,
                                                  val_loader=validation, metric=_accuracy)
        result.update(reference_state=reference.state_dict(), reference_history=reference_history.epochs)
    return result


def test_ddp_finetune_matches_one_process_on_the_whole_batches(tmp_path):
    rank0, rank1 = run_ranks(_finetune_five_steps, str(tmp_path))
    moved = 0
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), f"{key} differs between the ranks"
        reference = rank0["reference_state"][key]
        if value.is_floating_point():
            assert torch.allclose(value, reference, rtol=1e-4, atol=1e-6), \
                f"{key}: max difference to one process {float((value - reference).abs().max())}"
            moved += not torch.equal(value, reference) or key.endswith("weight")
        else:
            assert torch.equal(value, reference), key
    assert moved, "nothing trained"
    for mine, other, alone in zip(rank0["history"], rank1["history"], rank0["reference_history"]):
        assert mine["train_loss"] == other["train_loss"] and mine["val_metric"] == other["val_metric"]
        assert mine["train_loss"] == pytest.approx(alone["train_loss"], rel=1e-5)
        assert mine["val_metric"] == alone["val_metric"]  # equal halves: the mean of the ranks' accuracies
    checkpoint = rank1["checkpoint"]
    assert checkpoint["format"] == "qatgraph-finetune/1" and checkpoint["epoch"] == 1
    assert all(torch.equal(v, rank0["state"][k]) for k, v in checkpoint["state_dict"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune.pt"]  # no temporary file left


# ------------------------------------------------------------------------------------- EfQAT
def _efqat_model(mode: str, ratio: float, interval: int) -> nn.Module:
    """TinyNet whose fc rows matter most (10x the weights): conv2 is left with no trainable row."""
    model = _model()
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    policy = {**LEARNABLE, "freeze": {"mode": mode, "ratio": ratio, "interval": interval}}
    qmodel = qatgraph.compile(model, policy, example_inputs=(torch.randn(2, 3, 8, 8),))
    qatgraph.calibrate(qmodel, [x for x, _ in _training_batches(seed=4)], show_progress=False)
    return qmodel


def _efqat_state(qmodel: nn.Module) -> dict:
    controller = qmodel.qatgraph_freeze
    return {"refreshes": controller.refreshes, "state": {k: v.clone() for k, v in qmodel.state_dict().items()},
            "frozen": {layer.name: None if layer.frozen_rows is None else layer.frozen_rows.clone()
                       for layer in controller.layers}}


def _efqat_under_ddp(rank: int) -> dict:
    import torch.nn.functional as F

    results = {}
    # CWPN, no refresh: frozen rows (all of conv2's, some of fc's) must not move on any rank
    qmodel = _efqat_model("cwpn", 0.25, 10**9)
    results["cwpn_before"] = _efqat_state(qmodel)
    qatgraph.finetune(qmodel, _halves(_training_batches(), rank), F.cross_entropy, epochs=1, base_lr=0.1)
    results["cwpn_after"] = _efqat_state(qmodel)
    # a refresh every 16 samples of the whole (8-sample) batch: at the same steps as one process
    qmodel = _efqat_model("cwpn", 0.25, 16)
    start = {k: v.clone() for k, v in qmodel.state_dict().items()}
    batches = _training_batches(steps=5)
    qatgraph.finetune(qmodel, _halves(batches, rank), F.cross_entropy, epochs=1, base_lr=0.1)
    results["refresh"] = _efqat_state(qmodel)
    if rank == 0:
        with this_rank_only():
            reference = _efqat_model("cwpn", 0.25, 16)
            reference.load_state_dict(start)
            qatgraph.finetune(reference, batches, F.cross_entropy, epochs=1, base_lr=0.1)
        results["refresh_reference"] = _efqat_state(reference)
    # LWPN in a hand-written loop: conv2 is frozen when DDP is built, then trains after a refresh
    qmodel = _efqat_model("lwpn", 0.5, 10**9)
    ddp_model = qatgraph.wrap_ddp(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    results["lwpn_before"] = _efqat_state(qmodel)
    for step, (inputs, targets) in enumerate(_halves(_training_batches(steps=4), rank)):
        if step == 2:
            with torch.no_grad():
                qmodel.conv2.weight.mul_(100.0)  # the same on every rank: conv2 now matters most
            qmodel.qatgraph_freeze.refresh()
            results["lwpn_refreshed"] = _efqat_state(qmodel)
        optimizer.zero_grad()
        F.cross_entropy(ddp_model(inputs), targets).backward()
        optimizer.step()
    results["lwpn_after"] = _efqat_state(qmodel)
    return results


def _assert_same_on_both_ranks(rank0: dict, rank1: dict, what: str) -> None:
    assert rank0["refreshes"] == rank1["refreshes"], what
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), f"{what}: {key} differs between the ranks"
    for name, rows in rank0["frozen"].items():
        other = rank1["frozen"][name]
        assert (rows is None and other is None) or torch.equal(rows, other), f"{what}: {name} frozen rows differ"


def test_efqat_under_ddp_keeps_frozen_rows_and_refreshes_in_step():
    rank0, rank1 = run_ranks(_efqat_under_ddp)
    for key in ("cwpn_after", "refresh", "lwpn_refreshed", "lwpn_after"):
        _assert_same_on_both_ranks(rank0[key], rank1[key], key)
    # frozen rows are bit-identical to before training; trainable ones moved
    before, after = rank0["cwpn_before"], rank0["cwpn_after"]
    assert before["frozen"]["conv2"].numel() == 16, "conv2 should have no trainable row in this model"
    for name, rows in before["frozen"].items():
        weight_before, weight_after = before["state"][f"{name}.weight"], after["state"][f"{name}.weight"]
        assert torch.equal(weight_before[rows], weight_after[rows]), f"{name}: frozen rows moved"
    trainable = torch.ones(16, dtype=torch.bool)
    trainable[before["frozen"]["fc"]] = False
    assert not torch.equal(before["state"]["fc.weight"][trainable], after["state"]["fc.weight"][trainable])
    # refreshes: as many, at the same steps, choosing the same rows as one process on the whole batches
    refreshed, alone = rank0["refresh"], rank0["refresh_reference"]
    assert refreshed["refreshes"] == alone["refreshes"] == 3  # at compile, and after 16 and 32 samples
    for name, rows in refreshed["frozen"].items():
        assert torch.equal(rows, alone["frozen"][name]), name
    for key, value in refreshed["state"].items():
        assert torch.allclose(value.float(), alone["state"][key].float(), rtol=1e-4, atol=1e-6), key
    # LWPN: conv2 was frozen when DDP was built; after the refresh it trains, in step on both ranks
    assert rank0["lwpn_before"]["frozen"]["conv2"].numel() == 16 and rank0["lwpn_before"]["frozen"]["fc"] is None
    assert rank0["lwpn_refreshed"]["frozen"]["conv2"] is None and rank0["lwpn_refreshed"]["frozen"]["fc"].numel() == 16
    refreshed, final = rank0["lwpn_refreshed"]["state"], rank0["lwpn_after"]["state"]
    assert not torch.equal(refreshed["conv2.weight"], final["conv2.weight"]), "conv2 did not train after the refresh"
    assert torch.equal(refreshed["fc.weight"], final["fc.weight"]), "fc moved while frozen"


# ------------------------------------------------------------------------------------- fine-tune plumbing
def _finetune_plumbing(rank: int) -> dict:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    results: dict = {}
    # a plain DataLoader is sharded (disjoint halves) and reshuffled every epoch
    inputs = torch.randn(16, 3, 8, 8)
    inputs[:, 0, 0, 0] = torch.arange(16, dtype=torch.float32)  # each sample carries its index
    loader = DataLoader(TensorDataset(inputs, torch.randint(0, 16, (16,))), batch_size=4, shuffle=True)
    qmodel = _calibrated("tensorrt")
    seen: list[list[int]] = []
    qmodel.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 0, 0, 0].long().tolist()))
    qatgraph.finetune(qmodel, loader, F.cross_entropy, epochs=2, base_lr=0.1)
    results["seen"] = seen
    # different numbers of steps per rank: every rank stops with the same clear error
    uneven = _halves(_training_batches(), rank)[: 3 - rank]
    with pytest.raises(qatgraph.DistributedError) as caught:
        qatgraph.finetune(_calibrated("tensorrt"), uneven, F.cross_entropy, epochs=1, base_lr=0.1)
    results["uneven"] = str(caught.value)
    # a user's DDP that would wait for frozen learnable scales is refused before training
    user_ddp = nn.parallel.DistributedDataParallel(_calibrated(LEARNABLE))
    with pytest.raises(qatgraph.DistributedError) as caught:
        qatgraph.finetune(user_ddp, _halves(_training_batches(), rank), F.cross_entropy, epochs=1, base_lr=0.1)
    results["user_ddp"] = str(caught.value)
    return results


def test_finetune_shards_a_dataloader_and_refuses_what_would_hang():
    rank0, rank1 = run_ranks(_finetune_plumbing)
    for epoch in range(2):
        mine, other = rank0["seen"][2 * epoch:2 * epoch + 2], rank1["seen"][2 * epoch:2 * epoch + 2]
        samples = [i for batch in mine + other for i in batch]
        assert len(rank0["seen"]) == len(rank1["seen"]) == 4, "each rank: 2 steps of 4 samples per epoch"
        assert sorted(samples) == list(range(16)), f"epoch {epoch}: the ranks' shards are not disjoint halves"
    assert rank0["seen"][:2] != rank0["seen"][2:], "the sampler was not given the epoch (same order twice)"
    for message in (rank0["uneven"], rank1["uneven"]):
        assert "rank 0: 3, rank 1: 2" in message and "DistributedSampler" in message
    for message in (rank0["user_ddp"], rank1["user_ddp"]):
        assert "find_unused_parameters=False" in message and "wrap_ddp" in message


def test_ddp_without_a_process_group_is_a_clear_error():
    import torch.nn.functional as F

    qmodel = _calibrated("tensorrt")
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.finetune(qmodel, _training_batches(), F.cross_entropy, epochs=1, base_lr=0.1, ddp=True)
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.wrap_ddp(qmodel)
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.distributed.setup()


# ------------------------------------------------------------------------------------- sensitivity
class FiveLayers(nn.Module):
    """Five quantized Linear layers (an odd count: the last round leaves a rank idle) and a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(5))
        self.head = nn.Linear(32, 10)  # N=10 < 16: stays in floating point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _report(report) -> dict:
    data = report.to_dict()
    data["baseline"].pop("seconds")
    return data


def _sensitivity_everywhere(rank: int, folder: str) -> dict:
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = FiveLayers().eval()
    with torch.no_grad():  # layers.2 is fragile (as in test_sensitivity.py): huge weights on a dead input
        model.layers[1].weight[0].zero_()
        model.layers[1].bias[0] = -1.0
        model.layers[2].weight[:, 0] = 40.0
    generator = torch.Generator().manual_seed(6)
    samples = [(torch.randn(16, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
               for _ in range(3)]
    inputs = [x for x, _ in samples]
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(inputs[0],))
    qatgraph.calibrate(qmodel, inputs[rank::2])

    def analyse():
        fast = qatgraph.sensitivity(qmodel, samples, input_fn=lambda item: item[0], gradient=True,
                                    loss_fn=lambda output, item: F.cross_entropy(output, item[1]))
        full = qatgraph.sensitivity(qmodel, inputs, qatgraph.sensitivity_analysis.agreement_metric(inputs), "full")
        return _report(fast), _report(full)

    results = {"reports": analyse()}
    calls = []
    hook = qmodel.register_forward_hook(lambda *_: calls.append(1))
    qatgraph.sensitivity(qmodel, inputs)  # fast: 3 batches x (FP reference + all quantized + 2 per probed layer)
    results["forward_calls"] = len(calls)
    hook.remove()
    cached = qatgraph.sensitivity(qmodel, inputs, cache_dir=folder)  # rank 0 writes the cache file ...
    rerun = qatgraph.sensitivity(qmodel, inputs, cache_dir=folder)   # ... every rank reads it through rank 0
    results["cache"] = (_report(cached), _report(rerun))
    rerun.save(f"{folder}/report")
    results["saved"] = qatgraph.SensitivityReport.load(f"{folder}/report").ranking  # rank 1 reads rank 0's file
    if rank == 0:
        with this_rank_only():
            results["reference"] = analyse()
            calls.clear()
            hook = qmodel.register_forward_hook(lambda *_: calls.append(1))
            qatgraph.sensitivity(qmodel, inputs)
            results["reference_forward_calls"] = len(calls)
            hook.remove()
    with pytest.raises(qatgraph.DistributedError) as caught:  # a shard of the data per rank is refused
        qatgraph.sensitivity(qmodel, inputs[rank:rank + 1])
    results["sharded"] = str(caught.value)
    return results


def test_sensitivity_split_across_ranks_equals_one_process(tmp_path):
    rank0, rank1 = run_ranks(_sensitivity_everywhere, str(tmp_path))
    assert rank0["reports"] == rank1["reports"]
    # the 5 layers' probes are shared: rank 0 scores 3 of them, rank 1 two (6 batch passes each)
    assert rank0["reference_forward_calls"] == 3 + 3 + 5 * 6
    assert (rank0["forward_calls"], rank1["forward_calls"]) == (3 + 3 + 3 * 6, 3 + 3 + 2 * 6)
    assert rank0["reports"] == rank0["reference"], "the ranks' shared analysis differs from one process's"
    fast, full = rank0["reports"]
    assert fast["ranking"][0] == "layers.2" and len(full["ranking"]) == 5
    assert all(fast["details"][layer]["fisher"] is not None for layer in fast["ranking"])
    cached, rerun = rank0["cache"]
    assert cached["baseline"]["cached_results"] == 0 and rerun["baseline"]["cached_results"] == 6  # 5 layers + all
    assert rank1["cache"][1]["baseline"]["cached_results"] == 6 and rerun["details"] == cached["details"]
    assert [p.name for p in tmp_path.glob("sensitivity-*.jsonl")] and rank1["saved"] == rerun["ranking"]
    assert "rank 1's samples differ" in rank0["sharded"] and "rank 1's samples differ" in rank1["sharded"]


# ------------------------------------------------------------------------------------- files
def _write_on_rank_0(rank: int, folder: str) -> dict:
    import onnx

    import qatgraph.checkpoint
    from qatgraph.checkpoint import ModelSource, load_checkpoint, save_checkpoint
    from qatgraph.policy import Policy

    writes: list[str] = []  # which files this rank writes itself
    save_onnx, save_torch = onnx.save, qatgraph.checkpoint.atomic_torch_save
    onnx.save = lambda model, path, *a, **k: (writes.append("onnx"), save_onnx(model, path, *a, **k))[1]
    qatgraph.checkpoint.atomic_torch_save = lambda obj, path: (writes.append("checkpoint"), save_torch(obj, path))[1]
    qmodel = _calibrated("tensorrt")
    example = torch.randn(2, 3, 8, 8)
    result = qatgraph.export_onnx(nn.parallel.DistributedDataParallel(qmodel), f"{folder}/model.onnx", example)
    with open(f"{folder}/model.onnx", "rb") as handle:  # complete as soon as export_onnx returns, on every rank
        onnx_bytes = handle.read()
    with pytest.raises(qatgraph.ExportError) as caught:  # rank 0's error is every rank's error
        qatgraph.export_onnx(qmodel, f"{folder}/bad.onnx", example, opset=11)
    save_checkpoint(f"{folder}/qat.pt", qmodel, ModelSource("test_distributed:_model", None, (2, 3, 8, 8)),
                    Policy.preset("tensorrt"))
    loaded, _, _ = load_checkpoint(f"{folder}/qat.pt")
    if rank == 0:
        with this_rank_only():  # rank 0 alone: no other rank takes part, nothing waits
            qatgraph.export_onnx(qmodel, f"{folder}/alone.onnx", example)
    return {"writes": writes, "result": (result.path, result.num_nodes, result.num_qdq, result.size_bytes, len(result.findings)),
            "onnx_bytes": len(onnx_bytes), "error": str(caught.value),
            "checkpoint_equal": all(torch.equal(v, qmodel.state_dict()[k]) for k, v in loaded.state_dict().items())}


def test_exports_and_checkpoints_are_written_by_rank_0_for_every_rank(tmp_path):
    rank0, rank1 = run_ranks(_write_on_rank_0, str(tmp_path))
    assert rank0["writes"] == ["onnx", "checkpoint", "onnx"] and rank1["writes"] == []
    assert rank0["result"] == rank1["result"] and rank1["onnx_bytes"] == rank0["result"][3] > 0
    assert rank0["error"] == rank1["error"] and "opset" in rank0["error"]
    assert rank0["checkpoint_equal"] and rank1["checkpoint_equal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.onnx", "model.onnx", "qat.pt"]


# ------------------------------------------------------------------------------------- GPUs
def _nccl_efqat_finetune(rank: int) -> dict:
    import torch.nn.functional as F

    device = torch.device("cuda", rank)
    qmodel = _efqat_model("cwpn", 0.25, 10**9).to(device)
    qatgraph.calibrate(qmodel, [x.to(device) for x, _ in _training_batches(seed=4)][rank::2])  # merged over nccl
    before = _efqat_state(qmodel)
    qatgraph.finetune(qmodel, [(x.to(device), y.to(device)) for x, y in _halves(_training_batches(), rank)],
                      F.cross_entropy, epochs=1, base_lr=0.1)  # AMP (bf16 where supported) on CUDA
    after = _efqat_state(qmodel)
    return {key: {"refreshes": state["refreshes"], "state": {k: v.cpu() for k, v in state["state"].items()},
                  "frozen": {k: None if v is None else v.cpu() for k, v in state["frozen"].items()}}
            for key, state in (("before", before), ("after", after))}


@pytest.mark.gpu
def test_nccl_ranks_on_two_gpus_calibrate_and_train_in_step():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs for two nccl ranks")
    rank0, rank1 = run_ranks(_nccl_efqat_finetune, backend="nccl")
    for key in ("before", "after"):
        _assert_same_on_both_ranks(rank0[key], rank1[key], key)
    before, after = rank0["before"], rank0["after"]
    for name, rows in before["frozen"].items():
        assert torch.equal(before["state"][f"{name}.weight"][rows], after["state"][f"{name}.weight"][rows]), name
