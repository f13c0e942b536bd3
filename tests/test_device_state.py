"""Every tensor a compiled model holds moves with it: ``.to()``, ``.cuda()``, ``.half()``, ``deepcopy``.

A tensor kept as a plain attribute (of a module, or of an object a module holds, such as the EfQAT
controller) is invisible to ``.to()``: after ``model.cuda()`` it stays on the CPU and the next
forward fails or, worse, silently mixes devices. So every tensor must be a registered parameter or
buffer (``persistent=False`` when it must not be saved). The walker below looks at every module of
compiled models (plain, each freeze mode, partially traced) and every object reachable from their
attributes, and names each stray tensor it finds.
"""
from __future__ import annotations

import copy
import dataclasses

import models
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import qatgraph

NEVER = 10**9


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.body(x) + x)
        x = F.relu(self.depthwise(x))
        return self.head(x.mean(dim=(2, 3)))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x))))).mean(dim=1)


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (its in-projection a functional weight: EfQAT state on its quantizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.attn(x, x, x, need_weights=False)[0]).mean(dim=1)


class UntraceableRoot(models.UntraceableRoot):
    inner_class = ConvNet


INPUTS = {ConvNet: (2, 3, 8, 8), TokenNet: (2, 6, 16), AttentionNet: (2, 6, 16), UntraceableRoot: (2, 3, 8, 8)}
FREEZES = [None, {"mode": "cwpl", "ratio": 0.3}, {"mode": "cwpn", "ratio": 0.2}, {"mode": "lwpn", "ratio": 0.5}]


def compiled(model_class, freeze, learnable: bool = False) -> nn.Module:
    torch.manual_seed(0)
    policy: dict = {"preset": "tensorrt", "min_channels": 0}
    if freeze is not None:
        policy["freeze"] = {"interval": NEVER, **freeze}
    if learnable:
        policy["weight"] = {"learnable_scale": True}
        policy["activation"] = {"learnable_scale": True}
    x = torch.randn(*INPUTS[model_class])
    qmodel = qatgraph.compile(model_class(), policy, example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x, 0.5 * x], show_progress=False)
    return qmodel.train()


def stray_tensors(model: nn.Module) -> list[str]:
    """Paths of tensors reachable from module attributes that are not registered parameters/buffers."""
    registered = {id(t) for t in (*model.parameters(), *model.buffers())}
    found: list[str] = []
    seen: set[int] = set()

    def visit(value, path: str, depth: int) -> None:
        if id(value) in seen or depth > 4:
            return
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            if id(value) not in registered:
                found.append(f"{path}: {type(value).__name__} {tuple(value.shape)} on {value.device}")
            return
        if isinstance(value, (nn.Module, fx.Graph, fx.Node, type)) or callable(value) and not hasattr(value, "__dict__"):
            return  # modules are walked on their own; graphs hold metadata, not state
        if isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{path}[{key!r}]", depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for index, item in enumerate(value):
                visit(item, f"{path}[{index}]", depth + 1)
        elif dataclasses.is_dataclass(value) or hasattr(value, "__dict__"):
            for key, item in vars(value).items():
                visit(item, f"{path}.{key}", depth + 1)

    skip = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "meta", "_graph", "graph"}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if key not in skip and not key.startswith("_forward") and not key.startswith("_backward") \
                    and not key.endswith("_hooks") and not key.endswith("_hooks_with_kwargs"):
                visit(value, f"{name or '<root>'}.{key}", 0)
    return found


@pytest.mark.parametrize("model_class", [ConvNet, TokenNet, AttentionNet, UntraceableRoot])
@pytest.mark.parametrize("freeze", FREEZES, ids=["plain", "cwpl", "cwpn", "lwpn"])
def test_compiled_models_hold_no_tensor_outside_parameters_and_buffers(model_class, freeze):
    qmodel = compiled(model_class, freeze, learnable=freeze is not None and freeze["mode"] == "cwpn")
    assert stray_tensors(qmodel) == []
    if freeze is not None:
        # the walker does look inside the controller: it would see a tensor kept there
        controller = qmodel.qatgraph_freeze
        controller.debug_tensor = torch.zeros(1)
        assert any("qatgraph_freeze.debug_tensor" in path for path in stray_tensors(qmodel))
        del controller.debug_tensor


def test_efqat_state_is_non_persistent_buffers_that_follow_dtype():
    qmodel = compiled(ConvNet, {"mode": "cwpn", "ratio": 0.2}, learnable=True)
    layer = next(layer for layer in qmodel.qatgraph_freeze.layers if layer.module.trainable_rows is not None)
    state = qmodel.state_dict()
    assert not any("efqat_" in key or "trainable_rows" in key for key in state), "EfQAT state is never saved"
    qmodel.to(torch.float64)
    assert layer.module.efqat_weight_snapshot.dtype == torch.float64
    assert layer.module.trainable_rows.dtype == torch.int64 and layer.module.efqat_frozen_rows.dtype == torch.int64


OPTIMIZERS = {
    "sgd_momentum_decay": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.05),
}


def train_and_check_frozen_rows(qmodel: nn.Module, device: torch.device, dtype: torch.dtype,
                                optimizer_name: str) -> None:
    """A few optimizer steps on ``qmodel`` (already moved) keep every frozen row bit-identical."""
    controller = qmodel.qatgraph_freeze
    x = torch.randn(*INPUTS[ConvNet], device=device, dtype=dtype)
    optimizer = OPTIMIZERS[optimizer_name](qmodel.parameters())
    before = {layer.name: (layer.module.efqat_frozen_rows.clone(), layer.module.weight.detach().clone())
              for layer in controller.layers if layer.frozen_rows is not None}
    assert before, "the selection froze some rows"
    for _ in range(3):
        optimizer.zero_grad(set_to_none=False)  # zero grads on frozen rows: momentum/decay would move them
        qmodel(x).square().mean().backward()
        optimizer.step()
    moved = False
    for name, (frozen_rows, weight) in before.items():
        current = qmodel.get_submodule(name).weight.detach()
        assert current.device.type == device.type and current.dtype == dtype
        assert torch.equal(current[frozen_rows], weight[frozen_rows]), f"{name}: frozen rows moved"
        moved |= not torch.equal(current, weight)
    assert moved, "trainable rows train"


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_frozen_rows_stay_identical_after_to_float64(optimizer_name):
    qmodel = compiled(ConvNet, {"mode": "cwpn", "ratio": 0.3}).to(torch.float64)
    train_and_check_frozen_rows(qmodel, torch.device("cpu"), torch.float64, optimizer_name)


def test_deepcopy_keeps_state_buffers_independent():
    qmodel = compiled(ConvNet, {"mode": "cwpl", "ratio": 0.3})
    clone = copy.deepcopy(qmodel)
    for layer, cloned in zip(qmodel.qatgraph_freeze.layers, clone.qatgraph_freeze.layers):
        if layer.frozen_rows is None:
            continue
        assert cloned.module.efqat_weight_snapshot is not layer.module.efqat_weight_snapshot
        assert torch.equal(cloned.module.efqat_weight_snapshot, layer.module.efqat_weight_snapshot)
    assert stray_tensors(clone) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("freeze", [{"mode": "cwpn", "ratio": 0.3}, {"mode": "lwpn", "ratio": 0.5}],
                         ids=["cwpn", "lwpn"])
def test_compile_on_cpu_then_cuda_keeps_frozen_rows_identical(optimizer_name, freeze):
    qmodel = compiled(ConvNet, freeze).cuda()
    assert all(t.is_cuda for t in qmodel.buffers() if t is not None)
    train_and_check_frozen_rows(qmodel, torch.device("cuda"), torch.float32, optimizer_name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_bf16_autocast_training_keeps_frozen_rows_identical():
    qmodel = compiled(ConvNet, {"mode": "cwpn", "ratio": 0.3}).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        train_and_check_frozen_rows(qmodel, torch.device("cuda"), torch.float32, "sgd_momentum_decay")
