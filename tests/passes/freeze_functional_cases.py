"""Models, cases and helpers of the EfQAT functional-weight tests (test_freeze_functional*.py)."""
from __future__ import annotations

import copy

import models_arch
import torch
import torch.nn.functional as F
from torch import nn

import qatgraph

NEVER = 10**9


# ------------------------------------------------------------------------------------------ models
class CrossAttention(nn.Module):
    """nn.MultiheadAttention on a query and a memory: with ``kdim`` None the packed in-projection is
    read in three row slices (q on x, k and v on memory); with ``kdim`` the q/k/v weights are separate."""

    def __init__(self, kdim: int | None = None) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True, kdim=kdim, vdim=kdim)
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(x, memory, memory, need_weights=False)[0]).mean(1)


class FunctionalOps(nn.Module):
    """A parameter read by each functional op kind: F.conv2d (rows on axis 0), F.conv_transpose2d
    (axis 1; no masked op: frozen whole or not at all), F.linear (axis 0) and x @ w (axis 1 of [K, N])."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_w = nn.Parameter(torch.randn(24, 8, 3, 3) * 0.2)
        self.conv_b = nn.Parameter(torch.zeros(24))
        self.up_w = nn.Parameter(torch.randn(24, 16, 2, 2) * 0.2)
        self.fc_w = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.mm_w = nn.Parameter(torch.randn(32, 40) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=1))
        x = F.conv_transpose2d(x, self.up_w, stride=2).flatten(2).transpose(1, 2)
        x = F.gelu(F.linear(x, self.fc_w))
        return (x @ self.mm_w).mean(1)


def _images(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 32, 32),)


CASES = {
    "vit_mha_packed": (models_arch.VitMha, _images),
    "mha_packed_slices": (CrossAttention, lambda batch=2: (torch.randn(batch, 5, 32), torch.randn(batch, 7, 32))),
    "mha_separate": (lambda: CrossAttention(kdim=24), lambda batch=2: (torch.randn(batch, 5, 32),
                                                                        torch.randn(batch, 7, 24))),
    "swin_f_linear": (models_arch.SwinLike, _images),
    "functional_ops": (FunctionalOps, lambda batch=2: (torch.randn(batch, 8, 6, 6),)),
}
#: the functional weights each case holds: name -> (rows, axis)
FUNCTIONAL = {
    "vit_mha_packed": {f"layers.{i}.self_attention.in_proj": (192, 0) for i in range(2)},
    "mha_packed_slices": {"attn.in_proj": (96, 0)},
    "mha_separate": {f"attn.{role}_proj": (32, 0) for role in "qkv"},
    "swin_f_linear": {**{f"stage1.{i}.attn.{op}": (rows, 0) for i in range(2)
                         for op, rows in (("qkv", 96), ("proj", 32))},
                      "stage2.0.attn.qkv": (192, 0), "stage2.0.attn.proj": (64, 0)},
    "functional_ops": {"conv_w": (24, 0), "up_w": (16, 1), "fc_w": (32, 0), "mm_w": (40, 1)},
}


# ----------------------------------------------------------------------------------------- helpers
def compile_case(case: str, freeze: dict | None = None, seed: int = 0, **policy) -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    build, inputs = CASES[case]
    model, example = build(), inputs()
    activation = {"calibrator": "max", **policy.pop("activation", {})}
    policy = {"preset": "tensorrt", "min_channels": 0, "activation": activation, **policy}
    if freeze is not None:
        policy["freeze"] = {"interval": NEVER, **freeze}
    qmodel = qatgraph.compile(model, policy, example_inputs=example)
    qatgraph.calibrate(qmodel, [example, inputs()], show_progress=False)
    return qmodel.train(), example


def frozen_and_reference(case: str, freeze: dict, **policy) -> tuple[nn.Module, nn.Module, tuple]:
    reference, example = compile_case(case, **copy.deepcopy(policy))
    frozen, _ = compile_case(case, freeze, **policy)
    frozen.load_state_dict(reference.state_dict())
    frozen.qatgraph_freeze.refresh()  # rank the loaded weights
    return frozen, reference, example


def trainable_mask(layer) -> torch.Tensor:
    mask = torch.zeros(layer.num_rows, dtype=torch.bool)
    mask[slice(None) if layer.rows is None else layer.rows.cpu()] = True
    return mask


def row_masks(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Parameter name -> (trainable-row mask, row axis) of every weight and learnable weight scale
    the controller manages."""
    names = {id(p): name for name, p in qmodel.named_parameters()}
    masks = {}
    for layer in qmodel.qatgraph_freeze.layers:
        masks[names[id(layer.weight)]] = (trainable_mask(layer), layer.axis)
        scale = layer.quantizer.scale
        if isinstance(scale, nn.Parameter) and scale.numel() == layer.num_rows:
            masks[names[id(scale)]] = (trainable_mask(layer), 0)
    return masks


def functional_layers(qmodel: nn.Module) -> dict:
    return {layer.name: layer for layer in qmodel.qatgraph_freeze.layers if layer.functional_quantizer is not None}


def gradients(qmodel: nn.Module, inputs: tuple, upstream: torch.Tensor, run=None) -> tuple[dict, list]:
    inputs = [x.clone().requires_grad_() for x in inputs]
    qmodel.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both models
    ((qmodel if run is None else run)(*inputs) * upstream).sum().backward()
    return {name: p.grad for name, p in qmodel.named_parameters()}, [x.grad for x in inputs]


def assert_frozen_rows_zeroed(masks: dict, actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in actual.items():
        want = expected[name]
        if name in masks:
            mask, axis = masks[name]
            if grad is None:
                assert not mask.any(), f"{name}: a weight with trainable rows got no gradient"
                continue
            assert not grad.movedim(axis, 0)[~mask].any(), f"{name}: frozen rows got a gradient"
            want = want.clone()
            want.movedim(axis, 0)[~mask] = 0
        torch.testing.assert_close(grad, want, msg=lambda m, name=name: f"{name}: {m}")


# --------------------------------------------------------------------------------------- discovery
OPTIMIZERS = {
    "sgd_momentum_nesterov_decay": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05),
}


def frozen_state(qmodel: nn.Module) -> dict:
    return {layer.name: (layer, trainable_mask(layer), layer.weight.detach().clone(),
                         layer.quantizer.scale.detach().clone()) for layer in qmodel.qatgraph_freeze.layers}


def train_steps(qmodel: nn.Module, optimizer, example: tuple, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        qmodel(*example).square().mean().backward()
        optimizer.step()


def assert_frozen_rows_identical(before: dict, require_moves: bool = True) -> None:
    for name, (layer, mask, weight, scale) in before.items():
        now = layer.weight.detach().movedim(layer.axis, 0)
        assert torch.equal(now[~mask], weight.movedim(layer.axis, 0)[~mask]), f"{name}: frozen rows moved"
        if scale.numel() == layer.num_rows:
            assert torch.equal(layer.quantizer.scale[~mask], scale[~mask]), f"{name}: frozen scales moved"
        if require_moves and mask.any():
            moved = (now[mask] != weight.movedim(layer.axis, 0)[mask]).flatten(1).any(1)
            assert moved.all(), f"{name}: trainable rows did not move"


def calibrated_pair(case: str) -> tuple[nn.Module, nn.Module, tuple, object]:
    """(calibrated model, the same under CWPN 30 % with its state, example, input factory); tensorrt
    policy with the max calibrator (tiny layers float: no lint warning)."""
    torch.manual_seed(0)
    build, inputs = CASES[case]
    example = inputs()
    policy = {"preset": "tensorrt", "activation": {"calibrator": "max"}}
    reference = qatgraph.compile(build(), policy, example_inputs=example)
    qatgraph.calibrate(reference, [example], show_progress=False)
    frozen = qatgraph.compile(build(), {**policy, "freeze": {"mode": "cwpn", "ratio": 0.3, "interval": NEVER}},
                              example_inputs=example)
    frozen.load_state_dict(reference.state_dict())
    return reference, frozen, example, inputs
