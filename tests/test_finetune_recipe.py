"""finetune's optimizer settings: scale-relative quantizer learning rates (LSQ-style) and weight
decay from the user's base setting."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qatgraph
from qatgraph.train.finetune import FinetuneConfig, quantizer_adam


def learnable_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    policy = {"preset": "tensorrt", "min_channels": 0, "activation": {"learnable_scale": True},
              "weight": {"learnable_scale": True}}
    qmodel = qatgraph.compile(model, policy, example_inputs=(torch.randn(4, 8),))
    qatgraph.calibrate(qmodel, [torch.randn(32, 8) * s for s in (1.0, 3.0)], show_progress=False)
    return qmodel


def test_relative_quantizer_lr_is_proportional_to_each_scale() -> None:
    small, large = nn.Parameter(torch.full((3,), 0.004)), nn.Parameter(torch.tensor([4.0]))
    adam = quantizer_adam([small, large], FinetuneConfig(epochs=1, base_lr=0.1))
    assert [group["lr"] for group in adam.param_groups] == pytest.approx([4e-5, 4e-2])
    absolute = quantizer_adam([small, large], FinetuneConfig(epochs=1, base_lr=0.1, quantizer_lr=1e-3))
    assert [group["lr"] for group in absolute.param_groups] == [1e-3]


def test_relative_quantizer_lr_moves_learnable_scales_by_a_fraction_of_themselves() -> None:
    """Adam's first steps move a parameter by about lr each, so 10 steps at 1e-2 x |scale| move the
    largest scale (the activations') by up to ~10 % of itself, the absolute 1e-5 by a negligible
    fraction (while it moves a tiny weight scale by a large one)."""
    moved = {}
    for name, options in (("relative", {}), ("absolute", {"quantizer_lr": 1e-5})):
        qmodel = learnable_model()
        scales = {n: p.detach().clone() for n, p in qmodel.named_parameters() if n.endswith("scale")}
        largest = max(scales, key=lambda n: float(scales[n].abs().mean()))
        scales = {largest: scales[largest]}
        data = [(torch.randn(16, 8) * 3, torch.randint(0, 4, (16,))) for _ in range(10)]
        qatgraph.finetune(qmodel, data, F.cross_entropy, epochs=1, base_lr=0.1, show_progress=False,
                          freeze_quantizers_fraction=None, **options)
        after = dict(qmodel.named_parameters())
        moved[name] = max(float(((after[n].detach() - s).abs() / s.abs()).max()) for n, s in scales.items())
    assert moved["relative"] > 0.01 > 10 * moved["absolute"]


def test_original_weight_decay_sets_the_finetune_weight_decay(monkeypatch) -> None:
    seen = []
    original = torch.optim.SGD.__init__

    def recording_init(self, params, **kwargs):
        seen.append(kwargs["weight_decay"])
        original(self, params, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "__init__", recording_init)
    data = [(torch.randn(8, 8), torch.randint(0, 4, (8,)))]
    for options in ({}, {"weight_decay": 5e-4}, {"weight_decay": 5e-4, "weight_decay_scale": 1.0}):
        qatgraph.finetune(learnable_model(), data, F.cross_entropy, epochs=1, base_lr=0.1, show_progress=False,
                          **options)
    assert seen == pytest.approx([1e-6, 5e-6, 5e-4])
