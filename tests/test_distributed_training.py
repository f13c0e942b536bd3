"""Fine-tuning and EfQAT under torch.distributed: two CPU processes joined by gloo (tests/distributed_ranks.py).

Oracles: every rank ends with bit-identical parameters and EfQAT state, equal (within float
tolerance) to one process training on the concatenated batches (run inside rank 0 under
``qatgraph.distributed.this_rank_only``); frozen rows do not move; a plain DataLoader is sharded and
reshuffled per epoch; what would hang is refused with a clear error.
"""
from __future__ import annotations

import pytest
import torch
from distributed_cases import (
    LEARNABLE,
    accuracy,
    assert_same_on_both_ranks,
    attention_batches,
    attention_efqat_model,
    calibrated,
    efqat_model,
    efqat_state,
    halves,
    tiny_model,
    training_batches,
)
from distributed_ranks import run_ranks
from torch import nn

import qatgraph
from qatgraph.distributed import this_rank_only


def _finetune_five_steps(rank: int, folder: str) -> dict:
    """5 DDP steps on half batches vs one process on the whole batches, from the same calibrated state."""
    import torch.nn.functional as F

    qmodel = calibrated(LEARNABLE)
    start = {k: v.clone() for k, v in qmodel.state_dict().items()}
    # 5 steps: the recipe freezes the learnable scales after step 4 (80%), so step 5 runs without their gradients
    batches, validation = training_batches(steps=5), training_batches(steps=2, seed=5)
    checkpoint = f"{folder}/finetune.pt"
    history = qatgraph.finetune(qmodel, halves(batches, rank), F.cross_entropy, epochs=1, base_lr=0.1,
                                val_loader=halves(validation, rank), metric=accuracy, checkpoint_path=checkpoint)
    result = {"state": qmodel.state_dict(), "history": history.epochs,
              "checkpoint": torch.load(checkpoint, weights_only=True)}  # rank 1 reads what rank 0 wrote
    if rank == 0:
        with this_rank_only():
            reference = qatgraph.compile(tiny_model(), LEARNABLE, example_inputs=(torch.randn(2, 3, 8, 8),))
            reference.load_state_dict(start)
            reference_history = qatgraph.finetune(reference, batches, F.cross_entropy, epochs=1, base_lr=0.1,
                                                  val_loader=validation, metric=accuracy)
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


def _efqat_under_ddp(rank: int) -> dict:
    import torch.nn.functional as F

    results = {}
    # CWPN, no refresh: frozen rows (all of conv2's, some of fc's) must not move on any rank
    qmodel = efqat_model("cwpn", 0.25, 10**9)
    results["cwpn_before"] = efqat_state(qmodel)
    qatgraph.finetune(qmodel, halves(training_batches(), rank), F.cross_entropy, epochs=1, base_lr=0.1)
    results["cwpn_after"] = efqat_state(qmodel)
    # a refresh every 16 samples of the whole (8-sample) batch: at the same steps as one process
    qmodel = efqat_model("cwpn", 0.25, 16)
    start = {k: v.clone() for k, v in qmodel.state_dict().items()}
    batches = training_batches(steps=5)
    qatgraph.finetune(qmodel, halves(batches, rank), F.cross_entropy, epochs=1, base_lr=0.1)
    results["refresh"] = efqat_state(qmodel)
    if rank == 0:
        with this_rank_only():
            reference = efqat_model("cwpn", 0.25, 16)
            reference.load_state_dict(start)
            qatgraph.finetune(reference, batches, F.cross_entropy, epochs=1, base_lr=0.1)
        results["refresh_reference"] = efqat_state(reference)
    # LWPN in a hand-written loop: conv2 is frozen when DDP is built, then trains after a refresh
    qmodel = efqat_model("lwpn", 0.5, 10**9)
    ddp_model = qatgraph.wrap_ddp(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    results["lwpn_before"] = efqat_state(qmodel)
    for step, (inputs, targets) in enumerate(halves(training_batches(steps=4), rank)):
        if step == 2:
            with torch.no_grad():
                qmodel.conv2.weight.mul_(100.0)  # the same on every rank: conv2 now matters most
            qmodel.qatgraph_freeze.refresh()
            results["lwpn_refreshed"] = efqat_state(qmodel)
        optimizer.zero_grad()
        F.cross_entropy(ddp_model(inputs), targets).backward()
        optimizer.step()
    results["lwpn_after"] = efqat_state(qmodel)
    results["broadcast_buffers"] = sorted(ddp_model.named_module_buffers)  # what DDP sends from rank 0 each step
    return results


def test_efqat_under_ddp_keeps_frozen_rows_and_refreshes_in_step():
    rank0, rank1 = run_ranks(_efqat_under_ddp)
    for key in ("cwpn_after", "refresh", "lwpn_refreshed", "lwpn_after"):
        assert_same_on_both_ranks(rank0[key], rank1[key], key)
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
    # EfQAT's state (identical on every rank) stays out of DDP's per-step buffer broadcast
    broadcast = rank0["broadcast_buffers"]
    assert "fc.weight_quantizer.scale" in broadcast or "conv2.weight_quantizer.zero_point" in broadcast
    assert not [name for name in broadcast if "efqat" in name or "trainable_rows" in name], broadcast
    # LWPN: conv2 was frozen when DDP was built; after the refresh it trains, in step on both ranks
    assert rank0["lwpn_before"]["frozen"]["conv2"].numel() == 16 and rank0["lwpn_before"]["frozen"]["fc"] is None
    assert rank0["lwpn_refreshed"]["frozen"]["conv2"] is None and rank0["lwpn_refreshed"]["frozen"]["fc"].numel() == 16
    refreshed, final = rank0["lwpn_refreshed"]["state"], rank0["lwpn_after"]["state"]
    assert not torch.equal(refreshed["conv2.weight"], final["conv2.weight"]), "conv2 did not train after the refresh"
    assert torch.equal(refreshed["fc.weight"], final["fc.weight"]), "fc moved while frozen"


def _functional_efqat_under_ddp(rank: int) -> dict:
    import torch.nn.functional as F

    results = {}
    for mode, ratio in (("cwpn", 0.3), ("lwpn", 0.4)):
        qmodel = attention_efqat_model(mode, ratio)
        ddp_model = qatgraph.wrap_ddp(qmodel)
        optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
        results[f"{mode}_before"] = efqat_state(qmodel)
        for inputs, targets in halves(attention_batches(), rank):
            optimizer.zero_grad()
            F.cross_entropy(ddp_model(inputs), targets).backward()
            optimizer.step()
        results[f"{mode}_after"] = efqat_state(qmodel)
        results[f"{mode}_broadcast"] = sorted(ddp_model.named_module_buffers)
    return results


def test_efqat_on_a_functional_in_projection_under_ddp():
    """The packed in-projection of nn.MultiheadAttention (a functional weight) under DDP: the ranks
    stay identical, its frozen rows do not move, its EfQAT buffers stay out of DDP's broadcast."""
    rank0, rank1 = run_ranks(_functional_efqat_under_ddp)
    for mode in ("cwpn", "lwpn"):
        assert_same_on_both_ranks(rank0[f"{mode}_after"], rank1[f"{mode}_after"], mode)
        before, after = rank0[f"{mode}_before"], rank0[f"{mode}_after"]
        rows = before["frozen"]["attn.in_proj"]
        assert rows is not None and 0 < rows.numel(), f"{mode}: the in-projection froze rows"
        weight_before, weight_after = before["state"]["attn.in_proj_weight"], after["state"]["attn.in_proj_weight"]
        assert torch.equal(weight_before[rows], weight_after[rows]), f"{mode}: frozen in-projection rows moved"
        if rows.numel() < 48:
            assert not torch.equal(weight_before, weight_after), f"{mode}: trainable in-projection rows did not move"
        broadcast = rank0[f"{mode}_broadcast"]
        assert not [name for name in broadcast if "efqat" in name or "trainable_rows" in name], broadcast


def _finetune_plumbing(rank: int) -> dict:
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    results: dict = {}
    # a plain DataLoader is sharded (disjoint halves) and reshuffled every epoch
    inputs = torch.randn(16, 3, 8, 8)
    inputs[:, 0, 0, 0] = torch.arange(16, dtype=torch.float32)  # each sample carries its index
    loader = DataLoader(TensorDataset(inputs, torch.randint(0, 16, (16,))), batch_size=4, shuffle=True)
    qmodel = calibrated("tensorrt")
    seen: list[list[int]] = []
    qmodel.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:, 0, 0, 0].long().tolist()))
    qatgraph.finetune(qmodel, loader, F.cross_entropy, epochs=2, base_lr=0.1)
    results["seen"] = seen
    # different numbers of steps per rank: every rank stops with the same clear error
    uneven = halves(training_batches(), rank)[: 3 - rank]
    with pytest.raises(qatgraph.DistributedError) as caught:
        qatgraph.finetune(calibrated("tensorrt"), uneven, F.cross_entropy, epochs=1, base_lr=0.1)
    results["uneven"] = str(caught.value)
    # a user's DDP that would wait for frozen learnable scales is refused before training
    user_ddp = nn.parallel.DistributedDataParallel(calibrated(LEARNABLE))
    with pytest.raises(qatgraph.DistributedError) as caught:
        qatgraph.finetune(user_ddp, halves(training_batches(), rank), F.cross_entropy, epochs=1, base_lr=0.1)
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

    qmodel = calibrated("tensorrt")
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.finetune(qmodel, training_batches(), F.cross_entropy, epochs=1, base_lr=0.1, ddp=True)
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.wrap_ddp(qmodel)
    with pytest.raises(qatgraph.DistributedError, match="torchrun"):
        qatgraph.distributed.setup()


def _nccl_efqat_finetune(rank: int) -> dict:
    import torch.nn.functional as F

    device = torch.device("cuda", rank)
    qmodel = efqat_model("cwpn", 0.25, 10**9).to(device)
    qatgraph.calibrate(qmodel, [x.to(device) for x, _ in training_batches(seed=4)][rank::2])  # merged over nccl
    before = efqat_state(qmodel)
    qatgraph.finetune(qmodel, [(x.to(device), y.to(device)) for x, y in halves(training_batches(), rank)],
                      F.cross_entropy, epochs=1, base_lr=0.1)  # AMP (bf16 where supported) on CUDA
    after = efqat_state(qmodel)
    return {key: {"refreshes": state["refreshes"], "state": {k: v.cpu() for k, v in state["state"].items()},
                  "frozen": {k: None if v is None else v.cpu() for k, v in state["frozen"].items()}}
            for key, state in (("before", before), ("after", after))}


@pytest.mark.gpu
def test_nccl_ranks_on_two_gpus_calibrate_and_train_in_step():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs for two nccl ranks")
    rank0, rank1 = run_ranks(_nccl_efqat_finetune, backend="nccl")
    for key in ("before", "after"):
        assert_same_on_both_ranks(rank0[key], rank1[key], key)
    before, after = rank0["before"], rank0["after"]
    for name, rows in before["frozen"].items():
        assert torch.equal(before["state"][f"{name}.weight"][rows], after["state"][f"{name}.weight"][rows]), name
