"""A small model factory for checkpoint tests (``qatgraph compile tests.checkpoint_models:small_residual``)."""
from __future__ import annotations

import torch
from torch import nn


class SmallResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.body(x) + x)
        return self.head(x.mean(dim=(2, 3)))


def small_residual() -> SmallResidual:
    torch.manual_seed(0)
    return SmallResidual()
