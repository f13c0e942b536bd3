"""Architectures written the way their authors write them (torchvision-style, no torchvision here).

What it provides (plain ``nn.Module``s, no qatgraph imports; import as ``import models_arch``):
- ``VitMha``: a ViT like torchvision's ``VisionTransformer``: Conv2d patch embedding, class token,
  position embedding, encoder blocks ``x = x + attn(ln_1(x), ln_1(x), ln_1(x), need_weights=False)[0]``
  on ``nn.MultiheadAttention`` (packed in-projection, ``batch_first=True``), Dropout after the
  attention and in the MLP, LayerNorm, a Linear head on the class token.
- ``SwinWindowAttention`` / ``SwinLike``: Swin-T style window attention written with ``F.linear`` on
  the module's own ``qkv.weight`` / ``proj.weight`` (as torchvision's ``shifted_window_attention``),
  a learned relative position bias table gathered by a buffer index, windows of 4x4 tokens, an MLP
  block, patch merging (a ``Linear`` on 4 concatenated neighbours) and a classifier.
- ``MBConv`` / ``EfficientNetLike``: EfficientNet-B0 style blocks: 1x1 expand Conv-BN-SiLU,
  depthwise 3x3 Conv-BN-SiLU, squeeze-excitation (``x * scale``), 1x1 project Conv-BN,
  ``StochasticDepth`` (written here like torchvision's: an fx-wrapped ``stochastic_depth`` function)
  and ``result += input`` when the shapes allow a residual.

Guarantees: every weighted op has >= 16 channels except the RGB stems, the SE reduction convs and
the classifiers; everything runs in milliseconds on CPU.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- ViT on nn.MultiheadAttention
class MhaEncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=batch_first)
        self.dropout = nn.Dropout(0.1)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class VitMha(nn.Module):
    """torchvision-style ViT for 3x32x32 images: 16 patches of 8x8 + the class token."""

    def __init__(self, num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128,
                 patch: int = 8, image_size: int = 32) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, (image_size // patch) ** 2 + 1, dim).normal_(std=0.02))
        self.layers = nn.Sequential(*[MhaEncoderBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


# ---------------------------------------------------------------------------- Swin-style window attention
class SwinWindowAttention(nn.Module):
    """Window attention on (batch, H, W, C) with windows of ``window`` x ``window`` tokens."""

    def __init__(self, dim: int, heads: int, window: int = 4) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window - 1) ** 2, heads).normal_(std=0.02))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", (relative[..., 0] * (2 * window - 1) + relative[..., 1]).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        window, heads = self.window, self.heads
        x = x.view(batch, height // window, window, width // window, window, channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (channels // heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
        bias = self.relative_position_bias_table[self.relative_position_index]
        attn = attn + bias.view(window * window, window * window, -1).permute(2, 0, 1).unsqueeze(0)
        attn = F.softmax(attn, dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), channels)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(batch, height // window, width // window, window, window, channels)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SwinWindowAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class SwinLike(nn.Module):
    """Patch embedding (4x4 conv) on 3x32x32 -> 8x8 tokens of 32, two window-attention blocks, patch
    merging to 4x4 tokens of 64, one block, LayerNorm, mean over tokens, classifier."""

    def __init__(self, num_classes: int = 10, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=4, stride=4)
        self.norm0 = nn.LayerNorm(dim)
        self.stage1 = nn.Sequential(SwinBlock(dim, 2), SwinBlock(dim, 2))
        self.merge = PatchMerging(dim)
        self.stage2 = nn.Sequential(SwinBlock(2 * dim, 4))
        self.norm = nn.LayerNorm(2 * dim)
        self.head = nn.Linear(2 * dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.patch_embed(x).permute(0, 2, 3, 1))
        x = self.stage2(self.merge(self.stage1(x)))
        return self.head(self.norm(x).mean((1, 2)))


# ---------------------------------------------------------------------------- EfficientNet-style MBConv
def stochastic_depth(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop whole samples with probability ``p`` in training (torchvision's "row" mode)."""
    if not training or p == 0.0:
        return x
    survival = 1.0 - p
    noise = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(survival)
    return x * noise.div_(survival)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.training)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale


def conv_bn(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(out_channels)]
    return nn.Sequential(*layers, nn.SiLU()) if act else nn.Sequential(*layers)


class MBConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, expand: int, stride: int, drop: float) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [conv_bn(in_channels, hidden)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
                   SqueezeExcitation(hidden, max(4, in_channels // 4)),
                   conv_bn(hidden, out_channels, act=False)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_residual:
            result = self.stochastic_depth(result)
            result += x
        return result


class EfficientNetLike(nn.Module):
    """Stem (3->16, stride 2) on 3x32x32, six MBConv blocks (four with residuals), head conv, classifier."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        config = [(16, 16, 1, 1), (16, 24, 4, 2), (24, 24, 4, 1), (24, 32, 4, 2), (32, 32, 4, 1), (32, 32, 4, 1)]
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(*[MBConv(i, o, e, s, 0.1 * index / len(config))
                                      for index, (i, o, e, s) in enumerate(config)])
        self.head = conv_bn(32, 64)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
