"""Data-dependent control flow is never baked into an export silently (issue 14 item 3).

Before: a model with ``if y.sum() > 0:`` exported with exit 0 and lint clean, and ONNX Runtime
then differed by 43.8 on inputs taking the other branch; at opset 18 the export failed with a
26-line error full of ANSI colour codes and a graph dump.
"""
from __future__ import annotations

import inspect
import json
import warnings

import onnx
import pytest
import torch
from torch import nn

import qatgraph
from qatgraph.backends.onnx import BAKED_BRANCHES
from qatgraph.errors import ExportError, QatgraphWarning


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if y.sum() > 0:
            return self.b(y)
        return -y


BRANCH_LINE = next(i for i, line in enumerate(inspect.getsource(Branchy).splitlines()) if "if y.sum()" in line) + \
    inspect.getsourcelines(Branchy)[1]


@pytest.fixture(scope="module")
def branchy():
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(2, 16, 8, 8) * 10
    with torch.no_grad():
        x = x if float(model.a(x).sum()) > 0 else -x  # the example takes the `if` branch, -x the other one
        assert float(model.a(-x).sum()) < 0
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x, -x], show_progress=False)  # both branches run, so both layers calibrate
    return qmodel, x


def test_export_refuses_a_data_dependent_branch_naming_line_and_module(branchy, tmp_path):
    qmodel, x = branchy
    with pytest.raises(ExportError) as raised:
        qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", x)
    message = str(raised.value)
    assert f"test_export_branches.py:{BRANCH_LINE} `if y.sum() > 0:` (in <root>, Branchy.forward)" in message
    assert "torch.where" in message and "allow_data_dependent_branches=True" in message
    assert not (tmp_path / "m.onnx").exists()


def test_opset_18_gives_one_clean_paragraph(branchy, tmp_path, capfd):
    qmodel, x = branchy
    with pytest.raises(ExportError) as raised:
        qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", x, opset=18)
    message = str(raised.value)
    assert "\x1b[" not in message and "\n" not in message and len(message) < 600
    assert f":{BRANCH_LINE} `if y.sum() > 0:`" in message and "torch.where" in message
    captured = capfd.readouterr()
    assert "def forward(" not in captured.err + captured.out  # no graph dump on the terminal


def test_allowed_branches_warn_are_recorded_and_parity_names_them(branchy, tmp_path):
    qmodel, x = branchy
    with pytest.warns(QatgraphWarning, match="keeps only the branch the example inputs took"):
        path = qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", x, allow_data_dependent_branches=True).path
    recorded = json.loads(next(p.value for p in onnx.load(path).metadata_props if p.key == BAKED_BRANCHES))
    assert len(recorded) == 1 and "if y.sum() > 0:" in recorded[0]
    assert qatgraph.check_parity(qmodel, path, x).passed  # the branch the export kept
    report = qatgraph.check_parity(qmodel, path, -x)  # the branch the export dropped
    assert not report.passed and report.baked_branches == recorded
    assert "kept only one branch of data-dependent code (" in str(report) and "if y.sum() > 0:" in str(report)


class ShapeCheck(nn.Module):
    """A condition on shapes only: fixed in the export (only the batch is dynamic), so not refused."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        if x.shape[-1] % 4:
            x = nn.functional.pad(x, (0, 4 - x.shape[-1] % 4))
        return self.conv(x)


def test_a_condition_on_shapes_is_not_a_data_dependent_branch(tmp_path):
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(ShapeCheck().eval(), "tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QatgraphWarning)
        result = qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", x)
    assert not any(p.key == BAKED_BRANCHES for p in onnx.load(result.path).metadata_props)
