"""Test model zoo: small torchvision-style blocks and networks for qatgraph's tests.

What it provides:
- golden blocks (``ConvBNReLUStack``, ``BasicBlock``, ``Bottleneck``, ``InvertedResidual``,
  ``DepthwiseSeparable``, ``InceptionBlock``, ``LinearHead``, ``AttentionBlock``), defined in
  tests/model_blocks.py and re-exported here, and the registry
  ``BLOCKS = {name: (factory, input_shape)}``;
- zoo networks (``resnet18_like``, ``mobilenetv2_like``, ``vgg_like``, ``vit_like``) and the
  registry ``ZOO = {name: (factory, input_shape)}``;
- helpers ``example_input``, ``seed_everything`` and ``randomize_batchnorm`` (BN statistics and
  affine parameters made non-trivial, with negative gammas, so fusion tests can fail).

Guarantees: plain ``nn.Module``s with no qatgraph imports; every model and block traces with
``torch.fx.symbolic_trace`` (no data-dependent control flow, ``torch.flatten(x, 1)``); submodule
names follow torchvision (``conv1``, ``bn1``, ``relu``, ``downsample`` = Sequential(conv, bn), ...)
so state-dict keys look like real models'; every conv/linear has >= 16 channels except the RGB
input and the final classifier (so the "tiny layer" rule never skips them); attention head_dim
>= 16; everything runs in milliseconds on CPU at the default 2x3x32x32 input.

ReLUs are built with ``inplace=False`` (torchvision uses ``inplace=True``): in-place activations
would overwrite tensors that inserted fake-quantizers may save for their backward pass.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from model_blocks import (
    NUM_CLASSES,
    AttentionBlock,
    BasicBlock,
    Bottleneck,
    ConvBNAct,
    ConvBNReLUStack,
    DepthwiseSeparable,
    InceptionBlock,
    InvertedResidual,
    LinearHead,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class ResNetLike(nn.Module):
    """ResNet-18 layout for 32px inputs: stem conv3x3-BN-ReLU (no maxpool), layer1..layer4 of
    two BasicBlocks each (widths width*(1, 2, 4, 8), strides 1, 2, 2, 2), avgpool, flatten, fc."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        widths = [width * factor for factor in (1, 2, 4, 8)]
        in_channels = width
        for index, (stage_width, stride) in enumerate(zip(widths, (1, 2, 2, 2)), start=1):
            stage = nn.Sequential(BasicBlock(in_channels, stage_width, stride), BasicBlock(stage_width, stage_width))
            setattr(self, f"layer{index}", stage)
            in_channels = stage_width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# (in_channels, out_channels, stride, expand_ratio): residual and strided blocks, ratios 1 and 6.
MOBILENET_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (16, 16, 1, 1),
    (16, 24, 2, 6),
    (24, 24, 1, 6),
    (24, 32, 2, 6),
    (32, 32, 1, 6),
    (32, 64, 2, 6),
)


class MobileNetV2Like(nn.Module):
    """MobileNetV2 layout: ``features`` = stem ConvBNAct(3->16, stride 1, ReLU6), the
    InvertedResidual blocks of MOBILENET_SETTINGS, 1x1 ConvBNAct(64->128, ReLU6); then the
    functional ``adaptive_avg_pool2d`` (as torchvision does), flatten,
    ``classifier = Sequential(Dropout(0.2), Linear(128, num_classes))``."""

    def __init__(self, num_classes: int = NUM_CLASSES, last_channels: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(3, 16, stride=1, activation=nn.ReLU6)]
        layers += [InvertedResidual(*setting) for setting in MOBILENET_SETTINGS]
        layers.append(ConvBNAct(MOBILENET_SETTINGS[-1][1], last_channels, kernel_size=1, activation=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class VGGLike(nn.Module):
    """VGG layout for 32px inputs: ``features`` = three stages of (ConvBNAct x2, MaxPool2d(2)) with
    32/64/128 channels (32px -> 4px), flatten, ``classifier`` = Linear(2048, 128)-ReLU-Dropout-Linear."""

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, ...] = (32, 64, 128),
                 image_size: int = 32, hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            layers += [ConvBNAct(in_channels, width), ConvBNAct(width, width), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        final_size = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels * final_size * final_size, hidden),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class ViTLike(nn.Module):
    """Vision transformer: ``patch_embed`` Conv2d(3, dim, patch, stride=patch) -> flatten(2) ->
    transpose(1, 2); prepend ``cls_token`` (Parameter), add ``pos_embed`` (Parameter);
    ``blocks`` = depth x AttentionBlock; final LayerNorm ``norm``; ``head`` Linear on token 0."""

    def __init__(self, num_classes: int = NUM_CLASSES, dim: int = 64, depth: int = 2, heads: int = 4,
                 patch: int = 8, image_size: int = 32, mlp_ratio: int = 2) -> None:
        super().__init__()
        num_patches = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        # Zero-initialised embeddings would make the token positions indistinguishable.
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[AttentionBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls_token, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


class UntraceableRoot(nn.Module):
    """Data-dependent control flow at the root: compile traces only ``inner`` (a subclass names its
    class as ``inner_class``), the root stays eager."""

    inner_class: type[nn.Module]

    def __init__(self) -> None:
        super().__init__()
        self.inner = self.inner_class()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x if x.sum() > 0 else -x)


def resnet18_like(num_classes: int = NUM_CLASSES, width: int = 16) -> ResNetLike:
    """ResNet-18-like network for 3x32x32 inputs (about 0.7M parameters at width 16)."""
    return ResNetLike(num_classes, width)


def mobilenetv2_like(num_classes: int = NUM_CLASSES) -> MobileNetV2Like:
    """MobileNetV2-like network for 3x32x32 inputs."""
    return MobileNetV2Like(num_classes)


def vgg_like(num_classes: int = NUM_CLASSES) -> VGGLike:
    """VGG-like network (32/64/128 channels) for 3x32x32 inputs."""
    return VGGLike(num_classes)


def vit_like(num_classes: int = NUM_CLASSES, dim: int = 64, depth: int = 2, heads: int = 4,
             patch: int = 8) -> ViTLike:
    """ViT-like network for 3x32x32 inputs (16 patches + cls token)."""
    return ViTLike(num_classes, dim, depth, heads, patch)


ModelFactory = Callable[[], nn.Module]

ZOO: dict[str, tuple[ModelFactory, tuple[int, ...]]] = {
    "resnet18": (resnet18_like, (2, 3, 32, 32)),
    "mobilenetv2": (mobilenetv2_like, (2, 3, 32, 32)),
    "vgg": (vgg_like, (2, 3, 32, 32)),
    "vit": (vit_like, (2, 3, 32, 32)),
}

# Golden blocks at fixed configurations; names say which structural case each one covers.
BLOCKS: dict[str, tuple[ModelFactory, tuple[int, ...]]] = {
    "conv_bn_relu_stack": (ConvBNReLUStack, (2, 16, 16, 16)),
    "basic_identity": (lambda: BasicBlock(16, 16), (2, 16, 16, 16)),
    "basic_downsample": (lambda: BasicBlock(16, 32, stride=2), (2, 16, 16, 16)),
    "bottleneck_identity": (lambda: Bottleneck(64, 16), (2, 64, 16, 16)),
    "bottleneck_downsample": (lambda: Bottleneck(32, 16, stride=2), (2, 32, 16, 16)),
    "inverted_residual": (lambda: InvertedResidual(32, 32, stride=1, expand_ratio=6), (2, 32, 16, 16)),
    "inverted_residual_strided": (lambda: InvertedResidual(16, 24, stride=2, expand_ratio=6), (2, 16, 16, 16)),
    "inverted_residual_no_expand": (lambda: InvertedResidual(16, 16, stride=1, expand_ratio=1), (2, 16, 16, 16)),
    "depthwise_separable": (DepthwiseSeparable, (2, 32, 16, 16)),
    "inception": (InceptionBlock, (2, 32, 16, 16)),
    "linear_head": (LinearHead, (2, 64, 8, 8)),
    "attention": (AttentionBlock, (2, 16, 64)),
}


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal input for the ZOO or BLOCKS entry ``name``."""
    registry = ZOO if name in ZOO else BLOCKS
    if name not in registry:
        known = ", ".join(sorted([*ZOO, *BLOCKS]))
        raise KeyError(f"example_input: unknown model or block {name!r}; known names: {known}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(registry[name][1], generator=generator)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators so tests are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm in ``model`` non-trivial statistics and affine parameters.

    running_mean ~ N(0, 0.5^2); running_var ~ U[0.5, 2]; |gamma| ~ U[0.5, 1.5] with a random sign
    (at least one negative channel per BN, because a negative gamma flips the sign of a folded
    per-channel scale, which is what fusion code gets wrong); beta ~ N(0, 0.5^2). Default-initialised
    BNs (mean 0, var 1, gamma 1, beta 0) are nearly the identity and would let fusion bugs pass.
    Returns ``model`` (modified in place) for chaining.
    """
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        channels = module.num_features
        if module.running_mean is not None and module.running_var is not None:
            module.running_mean.copy_(0.5 * torch.randn(channels, generator=generator))
            module.running_var.copy_(0.5 + 1.5 * torch.rand(channels, generator=generator))
        if module.weight is not None and module.bias is not None:
            magnitude = 0.5 + torch.rand(channels, generator=generator)
            sign = torch.where(torch.rand(channels, generator=generator) < 0.5, -1.0, 1.0)
            sign[0] = -1.0 if (sign > 0).all() else sign[0]
            module.weight.copy_(sign * magnitude)
            module.bias.copy_(0.5 * torch.randn(channels, generator=generator))
    return model
