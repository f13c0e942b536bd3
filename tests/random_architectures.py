"""Random small CNNs written the way users write them, for tests/test_random_architectures.py.

Each model is a stem, a few random blocks and a classifier head (some with a Linear-BatchNorm1d
pair). Some blocks torch.fx traces (a ResNet basic block, a depthwise-separable block); others it
cannot (torch.export can): their ``forward`` branches on a tensor's shape, around an
``nn.Sequential`` body they index (``self.body[0]``), iterate (``for layer in self.body``) or
measure (``len(self.body)``), or ``nn.ModuleList`` branches they sum, with Conv-BN pairs and
residual ``out + x`` / ``out += ...`` in the untraced code itself, or an ``nn.MultiheadAttention``
called from untraced code. ``build(seed)`` returns the
model (eval mode, BatchNorm statistics randomized) and a description for failure messages.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

IMAGE = (3, 16, 16)


def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout))


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def always(x: torch.Tensor) -> bool:
    """A Python branch on a tensor's shape (always true): torch.fx cannot trace it (torch.export can)."""
    return x.shape[-1] > 0


# ---------------------------------------------------------------------------- traceable blocks
class BasicBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels)
        self.conv2, self.bn2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class Separable(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = conv_bn(channels, channels, groups=channels)
        self.pointwise = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pointwise(F.relu(self.depthwise(x))))


# ---------------------------------------------------------------------------- untraceable blocks
class IndexedBody(nn.Module):
    """``self.body[0]`` then the rest by index, a residual ``out + x`` in untraced code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body[0](x)
        if always(out):
            for index in range(1, len(self.body)):
                out = self.body[index](out)
        return F.relu(out + x)


class IteratedBody(nn.Module):
    """``for layer in self.body`` with a Conv-BN pair written out in untraced code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        if always(out):
            out = self.bn(self.conv(out))
        return F.relu(out)


class GatedResidual(nn.Module):
    """A traced body, an untraced Conv-BN shortcut, ``out += shortcut``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn(channels, channels))
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if always(x):
            out += self.bn(self.conv(x))
        return F.relu(out)


class Branches(nn.Module):
    """Two traced branches from an ``nn.ModuleList``, summed in untraced code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([conv_bn_relu(channels, channels), conv_bn(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [branch(x) for branch in self.branches]
        if always(x):
            return F.relu(outputs[0] + outputs[1])
        return outputs[0]


class TokenAttention(nn.Module):
    """Self-attention over the feature map's positions, called from untraced code, with a
    residual: an ``nn.MultiheadAttention`` (``batch_first`` either way) inside a forward torch.fx
    cannot trace, which compile makes a graph of the one call when it has example inputs."""

    def __init__(self, channels: int, batch_first: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, 2, batch_first=batch_first)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (batch, positions, channels)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        if always(x):
            mixed = self.attn(tokens, tokens, tokens, need_weights=False)[0]
        if not self.batch_first:
            mixed = mixed.transpose(0, 1)
        return x + mixed.transpose(1, 2).reshape(x.shape)


BLOCKS = {"basic": BasicBlock, "separable": Separable, "indexed": IndexedBody, "iterated": IteratedBody,
          "gated": GatedResidual, "branches": Branches, "attention": TokenAttention,
          "attention_seq_first": lambda channels: TokenAttention(channels, batch_first=False)}
ATTENTION_BLOCKS = ("attention", "attention_seq_first")


class Net(nn.Module):
    def __init__(self, blocks: list[str], channels: int, classes: int = 10, head_bn: bool = False) -> None:
        super().__init__()
        self.stem = conv_bn_relu(IMAGE[0], channels, stride=2)
        self.blocks = nn.Sequential(*[BLOCKS[name](channels) for name in blocks])
        self.hidden = nn.Linear(channels, channels) if head_bn else None
        self.hidden_bn = nn.BatchNorm1d(channels) if head_bn else None
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x)).mean((2, 3))
        if self.hidden is not None:  # a Linear-BatchNorm1d pair, in the root's (maybe untraced) code
            features = F.relu(self.hidden_bn(self.hidden(features)))
        return self.head(features)


def build(seed: int) -> tuple[nn.Module, str]:
    rng = random.Random(seed)
    blocks = [rng.choice(list(BLOCKS)) for _ in range(rng.randint(1, 3))]
    channels = rng.choice([16, 32])
    head_bn = rng.random() < 0.3
    torch.manual_seed(seed)
    model = Net(blocks, channels, head_bn=head_bn)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            count = module.num_features
            module.running_mean.copy_(torch.randn(count, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(count, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(count, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(count, generator=generator) * 0.1)
    return model.eval(), f"blocks={blocks} channels={channels} head_bn={head_bn}"


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, *IMAGE), generator=torch.Generator().manual_seed(seed))
