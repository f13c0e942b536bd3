"""Test zoo beyond ResNets: a YOLO-style detector, a UNet, ViT/BERT encoders on SDPA, Hugging Face BERT.

What it provides (plain ``nn.Module``s, no qatgraph imports; import as ``import models_extra``):
- ``YoloLike``: Conv-BN-SiLU blocks, C2f (chunk + bottlenecks + concat), SPPF (max-pool
  pyramid + concat), a PAN neck (nearest upsample + concat, strided conv + concat) and a
  detection head looping over the three levels; per level a box tower ending in a box-regression
  conv (64 = 4 x 16 DFL bins) whose outputs are scaled by the level stride (8/16/32: a large
  dynamic range) and a class tower ending in an 8-class conv (tiny: stays float on TensorRT).
  Output: (batch, 64 + 8, anchors), the levels flattened and concatenated.
- ``YoloWithInputCheck``: the same detector whose forward validates the input size with a
  Python ``if`` on the traced shape, which torch.fx cannot trace: the root stays eager and
  partial tracing traces ``backbone``/``neck`` and the head's towers (``ModuleList`` recursion).
- ``UNetLike``: double-conv encoder (max-pool downsampling), ConvTranspose2d upsampling,
  skip concatenation, 1x1 output conv with 2 channels (tiny).
- ``SdpaAttentionBlock`` / ``vit_sdpa_like``: tests/models.py's pre-norm ViT block and ViT with
  ``F.scaled_dot_product_attention`` instead of explicit matmuls (same parameter names).
- ``BertLikeEncoder``: a post-norm BERT classifier written by hand: word + position
  embeddings, ``F.scaled_dot_product_attention`` with a boolean padding mask built from
  ``attention_mask``, GELU feed-forward, tanh pooler on token 0, classifier.
  ``forward(input_ids, attention_mask)``.
- ``hf_bert(attn_implementation, ...)``: ``transformers.BertForSequenceClassification`` from a
  small ``BertConfig`` (hidden 64, 2 layers, 4 heads of 16, intermediate 128, vocab 100).
- ``image_batch`` / ``token_batch``: reproducible inputs (``(input_ids, attention_mask)`` with
  padded tails).

Guarantees: every conv/linear has >= 16 channels except the RGB stem, the YOLO class conv,
the UNet output conv and classifiers; sequences are 16 tokens so attention GEMMs are not
tiny; everything runs in milliseconds on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from models import AttentionBlock, ConvBNAct, ViTLike
from torch import nn

VOCAB_SIZE = 100
SEQUENCE_LENGTH = 16


def conv_bn_silu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> ConvBNAct:
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, activation=nn.SiLU)


# ---------------------------------------------------------------------------- YOLO
class YoloBottleneck(nn.Module):
    """``x + cv2(cv1(x))`` (both 3x3 Conv-BN-SiLU); the add follows an activation, so it is
    not a conv-fusable residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = conv_bn_silu(channels, channels)
        self.cv2 = conv_bn_silu(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8 C2f: 1x1 conv, split in two halves, bottlenecks on the second, concat all, 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int = 1) -> None:
        super().__init__()
        self.hidden = out_channels // 2
        self.cv1 = conv_bn_silu(in_channels, 2 * self.hidden, 1)
        self.m = nn.ModuleList(YoloBottleneck(self.hidden) for _ in range(blocks))
        self.cv2 = conv_bn_silu((2 + blocks) * self.hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = self.cv1(x).chunk(2, 1)
        parts = [first, second]
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max-pools, concat with the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = conv_bn_silu(channels, channels // 2, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.cv2 = conv_bn_silu(channels // 2 * 4, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloBackbone(nn.Module):
    """Strided Conv-BN-SiLU + C2f stages; returns P3, P4, P5 (strides 8, 16, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_silu(3, 16, 3, 2), conv_bn_silu(16, 32, 3, 2), C2f(32, 32))
        self.stage3 = nn.Sequential(conv_bn_silu(32, 64, 3, 2), C2f(64, 64))
        self.stage4 = nn.Sequential(conv_bn_silu(64, 64, 3, 2), C2f(64, 64))
        self.stage5 = nn.Sequential(conv_bn_silu(64, 128, 3, 2), C2f(128, 128), SPPF(128))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p3 = self.stage3(self.stem(x))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class PanNeck(nn.Module):
    """Top-down (nearest upsample + concat) then bottom-up (strided conv + concat) paths."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.top4 = C2f(128 + 64, 64)
        self.top3 = C2f(64 + 64, 64)
        self.down3 = conv_bn_silu(64, 64, 3, 2)
        self.bottom4 = C2f(64 + 64, 64)
        self.down4 = conv_bn_silu(64, 64, 3, 2)
        self.bottom5 = C2f(64 + 128, 128)

    def forward(self, p3: torch.Tensor, p4: torch.Tensor, p5: torch.Tensor) -> list[torch.Tensor]:
        t4 = self.top4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bottom4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bottom5(torch.cat([self.down4(n4), p5], 1))
        return [n3, n4, n5]


class DetectHead(nn.Module):
    """Decoupled head, one box tower and one class tower per level, applied in a Python loop."""

    def __init__(self, channels: tuple[int, ...] = (64, 64, 128), num_classes: int = 8, reg_max: int = 16,
                 strides: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.strides = strides
        self.box = nn.ModuleList(nn.Sequential(conv_bn_silu(c, 32), conv_bn_silu(32, 32), nn.Conv2d(32, 4 * reg_max, 1))
                                 for c in channels)
        self.cls = nn.ModuleList(nn.Sequential(conv_bn_silu(c, 32), conv_bn_silu(32, 32), nn.Conv2d(32, num_classes, 1))
                                 for c in channels)
        with torch.no_grad():  # box logits centred far from 0, as after DFL training: a wide range
            for tower in self.box:
                tower[-1].bias.fill_(2.0)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        outputs = []
        for level, feature in enumerate(features):
            box = self.box[level](feature) * self.strides[level]
            outputs.append(torch.cat([box, self.cls[level](feature)], 1).flatten(2))
        return torch.cat(outputs, 2)


class YoloLike(nn.Module):
    """YOLOv8-style detector for 3x64x64 inputs: backbone -> PAN neck -> detection head."""

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        self.backbone = YoloBackbone()
        self.neck = PanNeck()
        self.head = DetectHead(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.neck(*self.backbone(x)))


class YoloWithInputCheck(YoloLike):
    """YoloLike whose forward checks the input size in Python (untraceable by torch.fx)."""

    max_stride = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.max_stride or x.shape[-2] % self.max_stride:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not a multiple of {self.max_stride}")
        return super().forward(x)


# ---------------------------------------------------------------------------- UNet
class DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNAct(in_channels, out_channels), ConvBNAct(out_channels, out_channels))


class UNetLike(nn.Module):
    """Two-level UNet for 3x32x32 inputs: 16/32/64 channels, ConvTranspose2d(k=2, s=2) up, skip concat."""

    def __init__(self, out_channels: int = 2) -> None:
        super().__init__()
        self.enc1 = DoubleConv(3, 16)
        self.enc2 = DoubleConv(16, 32)
        self.bottleneck = DoubleConv(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec2 = DoubleConv(64, 32)
        self.up1 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec1 = DoubleConv(32, 16)
        self.out = nn.Conv2d(16, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip1 = self.enc1(x)
        skip2 = self.enc2(self.pool(skip1))
        x = self.bottleneck(self.pool(skip2))
        x = self.dec2(torch.cat([self.up2(x), skip2], 1))
        x = self.dec1(torch.cat([self.up1(x), skip1], 1))
        return self.out(x)


# ---------------------------------------------------------------------------- transformers on SDPA
class SdpaAttentionBlock(AttentionBlock):
    """tests/models.py's AttentionBlock with ``F.scaled_dot_product_attention`` (same parameters)."""

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def vit_sdpa_like(num_classes: int = 10, dim: int = 64, depth: int = 2, heads: int = 4) -> ViTLike:
    """tests/models.py's ViT-like network (3x32x32, 16 patches + cls) with SDPA blocks."""
    model = ViTLike(num_classes, dim, depth, heads)
    model.blocks = nn.Sequential(*[SdpaAttentionBlock(dim, heads) for _ in range(depth)])
    return model


class BertLikeLayer(nn.Module):
    """Post-norm encoder layer: ``norm1(x + out(sdpa(q, k, v, mask)))``, ``norm2(h + fc2(gelu(fc1(h))))``."""

    def __init__(self, hidden: int = 64, heads: int = 4, intermediate: int = 128) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape
        q, k, v = self.split_heads(self.query(x)), self.split_heads(self.key(x)), self.split_heads(self.value(x))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        h = self.norm1(x + self.out(context.transpose(1, 2).reshape(batch, tokens, hidden)))
        return self.norm2(h + self.fc2(self.act(self.fc1(h))))


class BertLikeEncoder(nn.Module):
    """Hand-written BERT classifier on SDPA; ``forward(input_ids, attention_mask)`` -> logits."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, hidden: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int = 128, max_positions: int = 64, num_labels: int = 2) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embedding_norm = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList(BertLikeLayer(hidden, heads, intermediate) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.embedding_norm(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        visible = attention_mask[:, None, None, :].bool()  # (batch, 1, 1, keys): padded keys are hidden
        for layer in self.layers:
            x = layer(x, visible)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def token_batch(batch: int = 2, seq: int = SEQUENCE_LENGTH, seed: int = 0,
                vocab_size: int = VOCAB_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``; row i > 0 has its last ``2 * i`` tokens padded (mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        attention_mask[row, seq - min(2 * row, seq - 1):] = 0
    return input_ids, attention_mask


def hf_bert(attn_implementation: str = "eager", num_labels: int = 2, layers: int = 2) -> nn.Module:
    """``transformers.BertForSequenceClassification`` from a small config, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels,
                        attn_implementation=attn_implementation)
    return BertForSequenceClassification(config).eval()


def image_batch(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor]:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)
