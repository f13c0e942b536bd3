"""Shared pieces of the two-rank tests (tests/test_distributed_*.py): a tiny model, its data, and the
EfQAT state compared across ranks. Workers and references build them the same way on every rank."""
from __future__ import annotations

import torch
from torch import nn

import qatgraph


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


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


LEARNABLE = {"preset": "tensorrt", "weight": {"learnable_scale": True}}


def training_batches(steps: int = 3, batch: int = 8, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 8, 8, generator=generator), torch.randint(0, 16, (batch,), generator=generator))
            for _ in range(steps)]


def accuracy(model: nn.Module, batches) -> float:
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def calibrated(policy) -> nn.Module:
    qmodel = qatgraph.compile(tiny_model(), policy, example_inputs=(torch.randn(2, 3, 8, 8),))
    qatgraph.calibrate(qmodel, [x for x, _ in training_batches(seed=4)], show_progress=False)
    return qmodel


def halves(batches, rank: int):
    return [(x[rank * len(x) // 2:(rank + 1) * len(x) // 2], y[rank * len(y) // 2:(rank + 1) * len(y) // 2])
            for x, y in batches]


def efqat_model(mode: str, ratio: float, interval: int) -> nn.Module:
    """TinyNet whose fc rows matter most (10x the weights, ranked by raw mean |w|): conv2 is left
    with no trainable row."""
    model = tiny_model()
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    policy = {**LEARNABLE, "freeze": {"mode": mode, "ratio": ratio, "interval": interval, "importance": "raw"}}
    qmodel = qatgraph.compile(model, policy, example_inputs=(torch.randn(2, 3, 8, 8),))
    qatgraph.calibrate(qmodel, [x for x, _ in training_batches(seed=4)], show_progress=False)
    return qmodel


class AttentionNet(nn.Module):
    """nn.MultiheadAttention on a query and a memory (its packed in-projection read in three row
    slices: a functional weight under EfQAT) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        memory = torch.flip(x, [1])
        return self.fc(self.attn(x, memory, memory, need_weights=False)[0].mean(1))


def attention_batches(steps: int = 3, batch: int = 8, seed: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 5, 16, generator=generator), torch.randint(0, 16, (batch,), generator=generator))
            for _ in range(steps)]


def attention_efqat_model(mode: str, ratio: float) -> nn.Module:
    torch.manual_seed(0)
    policy = {**LEARNABLE, "freeze": {"mode": mode, "ratio": ratio, "interval": 10**9}}
    qmodel = qatgraph.compile(AttentionNet().eval(), policy, example_inputs=(torch.randn(2, 5, 16),))
    qatgraph.calibrate(qmodel, [x for x, _ in attention_batches(seed=4)], show_progress=False)
    return qmodel


def efqat_state(qmodel: nn.Module) -> dict:
    controller = qmodel.qatgraph_freeze
    return {"refreshes": controller.refreshes, "state": {k: v.clone() for k, v in qmodel.state_dict().items()},
            "frozen": {layer.name: None if layer.frozen_rows is None else layer.frozen_rows.clone()
                       for layer in controller.layers}}


def assert_same_on_both_ranks(rank0: dict, rank1: dict, what: str) -> None:
    assert rank0["refreshes"] == rank1["refreshes"], what
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), f"{what}: {key} differs between the ranks"
    for name, rows in rank0["frozen"].items():
        other = rank1["frozen"][name]
        assert (rows is None and other is None) or torch.equal(rows, other), f"{what}: {name} frozen rows differ"
