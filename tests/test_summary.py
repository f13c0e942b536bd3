"""qatgraph.summary tells each layer's real precision and reads well when nothing traced
(issue 14 item 9: summary said INT8 for INT4 layers, and "partially traced: nothing")."""
from __future__ import annotations

import torch
from torch import nn

import qatgraph

X = torch.randn(2, 16, 8, 8)


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3)).eval()


def test_each_quantized_layer_shows_its_bits():
    policy = {"preset": "tensorrt", "overrides": [{"name": "2", "weight": {"bits": 4}, "activation": {"bits": 4}}]}
    qmodel = qatgraph.compile(conv_net(), policy, example_inputs=(X,))
    table = qatgraph.summary(qmodel, print_table=False)
    assert [row.precision for row in table.rows] == ["INT8", "INT4"]
    assert "INT4" in table.render()
    w4a8 = qatgraph.summary(qatgraph.compile(conv_net(), {"preset": "tensorrt", "weight": {"bits": 4}},
                                             example_inputs=(X,)), print_table=False)
    assert {row.precision for row in w4a8.rows} == {"W4A8"}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this module, nor any part of it
            return self.conv(x)
        return self.conv(-x)


def test_a_model_traced_nowhere_is_described_in_words():
    qmodel = qatgraph.compile(Untraceable().eval(), "tensorrt", example_inputs=(X,))
    text = qatgraph.summary(qmodel, print_table=False).render()
    assert "partially traced: nothing" not in text
    assert "torch.fx traced no part of the model; its layers are quantized module-wise (eager)" in text
