"""Golden blocks of the test model zoo: small torchvision-style building blocks for qatgraph's tests.

What it provides: ``ConvBNAct``, ``ConvBNReLUStack``, ``BasicBlock``, ``Bottleneck``,
``InvertedResidual``, ``DepthwiseSeparable``, ``InceptionBlock``, ``LinearHead``,
``AttentionBlock`` (used by the placement tests and tests/models.py's networks) and
``NUM_CLASSES``. tests/models.py re-exports them all (``models.BasicBlock``) and holds the
``BLOCKS`` registry of fixed configurations.

Guarantees: plain ``nn.Module``s with no qatgraph imports; every block traces with
``torch.fx.symbolic_trace`` (no data-dependent control flow); submodule names follow torchvision
(``conv1``, ``bn1``, ``relu``, ``downsample`` = Sequential(conv, bn), ...) so state-dict keys look
like real models'; every conv/linear has >= 16 channels except an RGB input and a final
classifier (so the "tiny layer" rule never skips them); attention head_dim >= 16.

ReLUs are built with ``inplace=False`` (torchvision uses ``inplace=True``): in-place activations
would overwrite tensors that inserted fake-quantizers may save for their backward pass.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

NUM_CLASSES = 10


class ConvBNAct(nn.Sequential):
    """Conv2d(bias=False) -> BatchNorm2d -> activation, children named "0", "1", "2".

    Mirrors torchvision's ``Conv2dNormActivation``; padding keeps the spatial size at stride 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type[nn.Module] = nn.ReLU) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            activation(),
        )
        self.out_channels = out_channels


class ConvBNReLUStack(nn.Module):
    """Repeated Conv2d(3x3, bias=False) -> BatchNorm2d -> ReLU, one ``ConvBNAct`` per width.

    Structure: ``layers = Sequential(ConvBNAct(in, w0), ConvBNAct(w0, w1), ...)``.
    """

    def __init__(self, in_channels: int = 16, widths: tuple[int, ...] = (32, 32, 64)) -> None:
        super().__init__()
        channels = (in_channels, *widths)
        self.layers = nn.Sequential(*[ConvBNAct(cin, cout) for cin, cout in zip(channels, channels[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """ResNet projection shortcut (1x1 conv with stride + BN), or None when the identity fits."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + identity)``.

    conv1 is 3x3 with ``stride``, conv2 3x3; ``identity = downsample(x)`` (1x1 conv + BN) when
    the stride or the channel count changes, else ``x``. As in torchvision, the single
    ``self.relu`` module is called twice (after bn1 and after the residual add).
    """

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 (in->mid) -> 3x3 (mid->mid, stride) -> 1x1 (mid->mid*expansion).

    Each conv is followed by its BN (bn1, bn2, bn3); ReLU after bn1 and bn2, then
    ``relu(bn3(...) + identity)`` with ``identity = downsample(x)`` when the stride or the
    channel count changes. The single ``self.relu`` module is reused three times (torchvision).
    """

    def __init__(self, in_channels: int, mid_channels: int, stride: int = 1, expansion: int = 4) -> None:
        super().__init__()
        out_channels = mid_channels * expansion
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = nn.Conv2d(mid_channels, mid_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + identity
        return self.relu(out)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: ``conv = Sequential([expand,] depthwise, project_conv, project_bn)``.

    expand: 1x1 ConvBNAct(ReLU6) to ``in * expand_ratio`` channels (only when expand_ratio != 1);
    depthwise: 3x3 grouped ConvBNAct(ReLU6) with ``stride``; project: 1x1 conv + BN, no activation.
    Returns ``x + conv(x)`` when stride == 1 and in == out (``use_res_connect``), else ``conv(x)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual stride must be 1 or 2, got {stride}")
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(in_channels, hidden, kernel_size=1, activation=nn.ReLU6))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden, activation=nn.ReLU6),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction, so fx sees a single branch
            return x + self.conv(x)
        return self.conv(x)


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 unit: depthwise 3x3 (conv1, groups=channels) -> bn1 -> relu1, then
    pointwise 1x1 (conv2) -> bn2 -> relu2.

    Unlike BasicBlock, each ReLU is its own module, so tests cover both shared and
    unshared activation modules.
    """

    def __init__(self, channels: int = 32, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)))


class InceptionBlock(nn.Module):
    """GoogLeNet-style block, every conv a ConvBNAct(ReLU), branches concatenated on channels:

    branch1: 1x1 (in->16); branch2: 1x1 (in->16) -> 3x3 (16->32);
    branch3: 1x1 (in->16) -> 5x5 (16->16); branch4: 3x3 maxpool (stride 1) -> 1x1 (in->16);
    ``torch.cat([b1, b2, b3, b4], 1)`` (80 channels) -> project: 1x1 ConvBNAct (80->64).
    """

    def __init__(self, in_channels: int = 32) -> None:
        super().__init__()
        self.branch1 = ConvBNAct(in_channels, 16, kernel_size=1)
        self.branch2 = nn.Sequential(ConvBNAct(in_channels, 16, kernel_size=1), ConvBNAct(16, 32, kernel_size=3))
        self.branch3 = nn.Sequential(ConvBNAct(in_channels, 16, kernel_size=1), ConvBNAct(16, 16, kernel_size=5))
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
            ConvBNAct(in_channels, 16, kernel_size=1),
        )
        self.project = ConvBNAct(16 + 32 + 16 + 16, 64, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return self.project(torch.cat(branches, 1))


class LinearHead(nn.Module):
    """Classifier head: conv1 (3x3) -> bn1 -> relu1 -> avgpool(1) -> flatten ->
    fc1 (in->hidden) -> relu2 -> fc2 (hidden->num_classes)."""

    def __init__(self, in_channels: int = 64, num_classes: int = NUM_CLASSES, hidden: int = 128) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.relu1(self.bn1(self.conv1(x))))
        out = torch.flatten(out, 1)
        return self.fc2(self.relu2(self.fc1(out)))


class AttentionBlock(nn.Module):
    """Pre-norm ViT encoder block with explicit matmuls, input (batch, tokens, dim):

    ``x = x + proj(softmax((q @ k^T) * scale) @ v)`` with q, k, v from ``qkv(norm1(x))``
    reshaped to (B, N, 3, heads, head_dim) and permuted to (3, B, heads, N, head_dim);
    then ``x = x + mlp(norm2(x))`` with ``mlp = Sequential(fc1, act=GELU, fc2)``.
    """

    def __init__(self, dim: int = 64, heads: int = 4, mlp_ratio: int = 2) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"AttentionBlock dim={dim} is not divisible by heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(dim, dim * mlp_ratio)),
            ("act", nn.GELU()),
            ("fc2", nn.Linear(dim * mlp_ratio, dim)),
        ]))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))
