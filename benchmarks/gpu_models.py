"""Workloads of the GPU benchmarks: ResNet-50, MobileNetV2 and BERT-base, and their QAT variants.

Models are torchvision's ``resnet50`` / ``mobilenet_v2`` (random init) when torchvision imports,
else the closest models written in this repository (``tests/models.py`` ``ResNetLike`` with
bottleneck blocks at ResNet-50's depths and widths, ``mobilenetv2_like``), and transformers'
``BertModel(BertConfig())`` (BERT-base: 12 layers, hidden 768) with a token-classification-style
loss on ``last_hidden_state``. Every variant of a workload starts from the same float weights.

Variants: ``fp32`` (the float model, trained as is; "fp32" names the weights, the step may run
under bf16 autocast), ``qatgraph`` (``qatgraph.compile`` with the issue's policy, calibrated on one
batch with the ``max`` calibrator), ``torch.ao`` (``prepare_qat_fx`` with the default x86 QAT
qconfig: the deprecated baseline, used here only), and qatgraph with EfQAT freezing.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import qatgraph

POLICY = {"preset": "tensorrt", "activation": {"calibrator": "max"}}
NEVER = 10**12  # no EfQAT importance refresh while timing


@dataclass
class Workload:
    name: str
    model: nn.Module  # float weights, on the device
    inputs: tuple[torch.Tensor, ...]
    loss: Callable[[object], torch.Tensor]
    source: str


def resnet50_from_test_blocks(num_classes: int = 1000) -> nn.Module:
    """ResNet-50's layout (7x7/2 stem, max-pool, bottlenecks 3-4-6-3 at widths 64..512) built from
    tests/models.py's Bottleneck: what the benchmark runs when torchvision is missing."""
    import models

    stages, in_channels = [], 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        layers = [models.Bottleneck(in_channels, mid, stride)]
        layers += [models.Bottleneck(mid * 4, mid) for _ in range(blocks - 1)]
        stages.append(nn.Sequential(*layers))
        in_channels = mid * 4
    return nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                         *stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes))


def _vision(name: str, batch: int, device: torch.device, size: int = 224) -> Workload:
    torch.manual_seed(0)
    try:
        import torchvision

        model = {"resnet50": torchvision.models.resnet50, "mobilenetv2": torchvision.models.mobilenet_v2}[name]()
        source = f"torchvision {torchvision.__version__} {name} (random init)"
    except ImportError:
        import models

        if name == "resnet50":
            model = resnet50_from_test_blocks()
            source = "ResNet-50 from tests/models.py Bottleneck blocks (torchvision not importable)"
        else:
            model, source = models.mobilenetv2_like(num_classes=1000), "tests/models.py mobilenetv2_like"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return Workload(f"{name} b{batch} {size}px", model.to(device).train(), (images,),
                    lambda out: F.cross_entropy(out.float(), labels), source)


def _bert(batch: int, tokens: int, device: torch.device) -> Workload:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(max_position_embeddings=max(512, tokens))
    model = BertModel(config, add_pooling_layer=False)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, tokens), generator=generator).to(device)
    target = torch.randn(batch, tokens, config.hidden_size, generator=generator).to(device)
    return Workload(f"bert-base b{batch} seq{tokens}", model.to(device).train(), (ids,),
                    lambda out: F.mse_loss(out.last_hidden_state.float(), target), "transformers BertModel(BertConfig())")


def workload(name: str, batch: int, device: torch.device, tokens: int = 384, size: int = 224) -> Workload:
    if name == "bert":
        return _bert(batch, tokens, device)
    return _vision(name, batch, device, size)


def qat_model(work: Workload) -> nn.Module:
    """``qatgraph.compile`` of the workload's float model (a copy), calibrated on one batch."""
    example = tuple(t[:2] for t in work.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = qatgraph.compile(copy.deepcopy(work.model), POLICY, example_inputs=example)
    qatgraph.calibrate(qmodel, [work.inputs], show_progress=False)
    return qmodel.train()


def efqat_model(full_qat: nn.Module, freeze: dict) -> nn.Module:
    """A copy of a calibrated QAT model with EfQAT freezing applied (same weights and scales)."""
    from qatgraph.passes import freeze as freeze_pass

    model = copy.deepcopy(full_qat)
    freeze_pass.apply(model, qatgraph.Policy.from_any({**POLICY, "freeze": {"interval": NEVER, **freeze}}))
    return model.train()


def torch_ao_model(work: Workload) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        example = tuple(t[:2] for t in work.inputs)
        return prepare_qat_fx(copy.deepcopy(work.model), get_default_qat_qconfig_mapping("x86"),
                              example_inputs=example).train()


def set_compiled_form(model: nn.Module, form: str | None) -> None:
    """Give every per-tensor quantizer one compiled form (``None``: keep the pass's per-producer split)."""
    if form is None:
        return
    for _, quantizer in qatgraph.iter_quantizers(model):
        if quantizer.axis is None:
            quantizer.compiled_form = form


def training_step(model: nn.Module, work: Workload, amp: torch.dtype | None, compiled: bool,
                  before: Callable[[], None] | None = None) -> Callable[[], None]:
    """forward + loss + backward + SGD(momentum) step, optionally under autocast / torch.compile."""
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

    def step() -> None:
        if before is not None:
            before()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            loss = work.loss(forward(*work.inputs))
        loss.backward()
        optimizer.step()

    return step


def backward_preparer(model: nn.Module, work: Workload, amp: torch.dtype | None,
                      before: Callable[[], None] | None = None) -> Callable[[], Callable[[], object]]:
    """Untimed: a fresh forward under autocast; timed: ``loss.backward()``."""
    def prepare() -> Callable[[], object]:
        if before is not None:
            before()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            loss = work.loss(model(*work.inputs))
        return loss.backward
    return prepare


def trainable_rows(model: nn.Module) -> str:
    controller = getattr(model, "qatgraph_freeze", None)
    return "" if controller is None else f"{controller.trainable_rows}/{controller.total_rows}"
