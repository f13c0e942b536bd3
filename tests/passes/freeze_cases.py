"""Models and helpers of the EfQAT freeze-pass tests (test_freeze_selection.py, test_freeze_training.py).

Models (``ConvNet``, ``TokenNet``, ``LinearStack`` and their ``INPUTS``), compiling with a freeze
policy, re-freezing with another mode/ratio, the exact ``ceil(ratio * count)``, row importances,
gradients of a frozen model and of the same model unfrozen, and the optimizers the bit-identity
tests train with.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

import qatgraph
from qatgraph.passes import freeze as freeze_pass

NEVER = 10**9  # refresh interval that never triggers within a test


# ------------------------------------------------------------------------------------------ models
class ConvNet(nn.Module):
    """Every conv flavour the masked conv path handles: grouped+strided+dilated+padded, depthwise,
    reflect padding (F.pad before the op), then Linear layers on 2-D inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(16, 32, 3, stride=2, padding=3, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(32)
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.relu2 = nn.ReLU()
        self.reflect = nn.Conv2d(32, 16, 3, padding=1, padding_mode="reflect")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 24)
        self.relu3 = nn.ReLU()
        self.head = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.depthwise(self.relu(self.bn(self.grouped(x)))))
        x = torch.flatten(self.pool(self.reflect(x)), 1)
        return self.head(self.relu3(self.fc(x)))


class TokenNet(nn.Module):
    """Linear on 3-D (batch, tokens, features) inputs, a grouped Conv1d over tokens, Linear on 2-D."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.mix = nn.Conv1d(32, 32, 3, padding=1, groups=4)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.mix(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.fc2(x).mean(1))


class LinearStack(nn.Module):
    """Linear layers with 48, 16, 32 and 16 rows, for selections built from known importances."""

    def __init__(self) -> None:
        super().__init__()
        self.l0, self.l1, self.l2, self.l3 = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(self.l2(self.l1(self.l0(x))))


INPUTS = {ConvNet: (2, 16, 12, 12), TokenNet: (2, 6, 16), LinearStack: (2, 16)}


# ----------------------------------------------------------------------------------------- helpers
def compile_model(model: nn.Module, freeze: dict | None = None, *, input_shape: tuple[int, ...] | None = None,
                  preset: str = "tensorrt", **policy) -> nn.Module:
    """Compile (every layer quantized: min_channels 0), calibrate, return in train mode."""
    x = torch.randn(*(input_shape or INPUTS.get(type(model), (2, 3, 32, 32))))
    # max calibration: the percentile histograms cost seconds and are not what is tested here
    activation = {"calibrator": "max", **policy.pop("activation", {})}
    policy = {"preset": preset, "min_channels": 0, "activation": activation, **policy}
    if freeze is not None:
        policy["freeze"] = {"interval": NEVER, **freeze}
    qmodel = qatgraph.compile(model, policy, example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x, 0.5 * x], show_progress=False)
    return qmodel.train()


def refreeze(qmodel: nn.Module, mode: str, ratio: float, interval: int = NEVER, importance: str = "layer_normalized"):
    """Re-run the freeze pass on a compiled model with another freeze config; returns the controller."""
    freeze_pass.apply(qmodel, qatgraph.Policy.from_any({"preset": "tensorrt", "freeze": {
        "mode": mode, "ratio": ratio, "interval": interval, "importance": importance}}))
    return qmodel.qatgraph_freeze


def exact_ceil(ratio: float, count: int) -> int:
    """ceil(ratio * count) for the decimal the user wrote (0.55 * 100 is 55, not 56)."""
    return math.ceil(Fraction(str(ratio)) * count)


def importance(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).mean(1)


def trainable_mask(layer) -> torch.Tensor:
    mask = torch.zeros(layer.num_rows, dtype=torch.bool)
    mask[slice(None) if layer.rows is None else layer.rows] = True
    return mask


def set_row_importances(linear: nn.Linear, values: torch.Tensor, generator: torch.Generator) -> None:
    """Rows with mean |w| = values but random signs (mean w near 0: a signed mean would rank wrongly)."""
    signs = torch.where(torch.rand(linear.weight.shape, generator=generator) < 0.5, -1.0, 1.0)
    with torch.no_grad():
        linear.weight.copy_(signs * values[:, None])


# --------------------------------------------------------------------------------------- gradients
LEARNABLE_SCALES = {"weight": {"learnable_scale": True}, "activation": {"learnable_scale": True}}


def frozen_and_reference(model: nn.Module, freeze: dict, **policy) -> tuple[nn.Module, nn.Module]:
    """The same FP model compiled with and without freezing, with identical weights and scales."""
    reference = compile_model(model, **policy)
    frozen = compile_model(model, freeze, **policy)
    frozen.load_state_dict(reference.state_dict())  # same keys (tested below): same calibration
    return frozen, reference


def gradients(qmodel: nn.Module, x: torch.Tensor, upstream: torch.Tensor, run=None) -> tuple[dict, torch.Tensor]:
    """Parameter and input gradients of ``(run(x) * upstream).sum()``; ``run`` defaults to the model
    (pass its torch.compile wrapper to differentiate through the compiled graph)."""
    x = x.clone().requires_grad_()
    qmodel.zero_grad(set_to_none=True)
    ((qmodel if run is None else run)(x) * upstream).sum().backward()
    return {name: p.grad for name, p in qmodel.named_parameters()}, x.grad


def row_mask_of(controller, parameter_name: str) -> torch.Tensor | None:
    """Trainable-row mask when the parameter is a frozen layer's weight or learnable weight scale."""
    for layer in controller.layers:
        if parameter_name in (f"{layer.name}.weight", f"{layer.name}.weight_quantizer.scale"):
            return trainable_mask(layer)
    return None


def assert_frozen_rows_zeroed(controller, actual: dict, expected: dict) -> None:
    """Every gradient equals the unfrozen one, except frozen weight rows / weight-scale entries: zero
    (or no gradient at all for a layer with no trainable row: LWPN, or CWPL/CWPN giving it none)."""
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        mask = row_mask_of(controller, name)
        want = expected[name]
        if mask is not None:
            if grad is None:
                assert not mask.any(), f"{name}: a layer with trainable rows got no gradient"
                continue
            assert not grad[~mask].any(), f"{name}: frozen rows got a gradient"
            want = want.clone()
            want[~mask] = 0
        torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"{name}: {m}")


# -------------------------------------------------------------------------------------- optimizers
OPTIMIZERS = {
    "sgd_momentum_nesterov_decay": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=0.05),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}


def train_steps(qmodel: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, steps: int,
                set_to_none: bool = True) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=set_to_none)
        qmodel(x).square().mean().backward()
        optimizer.step()


def frozen_state(controller) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    return {layer.name: (trainable_mask(layer), layer.module.weight.detach().clone(),
                         layer.module.weight_quantizer.scale.detach().clone()) for layer in controller.layers}
