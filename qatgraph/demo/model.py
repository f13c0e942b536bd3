"""Demo models: a small ResNet (images) and a 1-D CNN with a residual add (MNIST-1D)."""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, ...] = (32, 64),
                 blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            blocks = [BasicBlock(channels, width, 1 if index == 0 else 2)]
            blocks += [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Conv1dNet(nn.Module):
    """Four Conv1d+BN+ReLU layers (the third and fourth around a residual add), global average
    pool, a linear head: small enough for a CPU, deep enough that low-bit PTQ errors compound."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, 5, stride, 2, bias=False), nn.BatchNorm1d(cout))

        self.conv1, self.conv2 = block(in_channels, width, 1), block(width, 2 * width, 2)
        self.conv3, self.conv4 = block(2 * width, 2 * width, 1), block(2 * width, 2 * width, 1)
        self.relu1, self.relu2, self.relu3, self.relu4 = nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


def demo_model(in_channels: int = 1, num_classes: int = 10, input_rank: int = 3) -> nn.Module:
    """``input_rank`` 3 (N, C, L) gets the 1-D CNN, 4 (N, C, H, W) the small ResNet."""
    if input_rank == 3:
        return Conv1dNet(in_channels, num_classes)
    return SmallResNet(in_channels, num_classes)
