"""Bad input to the Python API gets one paragraph naming the fix, and warnings point at the
caller's line (issue 14 items 5, 8 and 9).

Before: ``calibrate(q, [(x, y)])`` failed inside forward ("takes 2 positional arguments"), a
wrong input shape gave a raw conv RuntimeError, compiling a compiled model a ``KeyError:
QuantConv2d``, ``export_onnx``/``calibrate`` of a plain module wrote an FP32 ONNX / only
warned, fewer batches or samples than asked passed silently, and warnings pointed into qatgraph.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qatgraph
from qatgraph.errors import CalibrationError, QatgraphWarning, UsageError

POLICY = {"preset": "tensorrt", "min_channels": 0}


def plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(64, 4)).eval()


X = torch.randn(2, 3, 6, 6)


@pytest.fixture(scope="module")
def qmodel():
    return qatgraph.compile(plain(), POLICY, example_inputs=(X,))


def test_input_label_pairs_without_input_fn(qmodel):
    with pytest.raises(CalibrationError, match=r"calibration batch 1 is a tuple of 2 items \(shape \(2, 3, 6, 6\), "
                                               r"shape \(2,\)\), but forward\(input\) does not take it .*"
                                               r"pass input_fn=lambda batch: batch\[0\]"):
        qatgraph.calibrate(qmodel, [(X, torch.zeros(2))], show_progress=False)
    qatgraph.calibrate(qmodel, [(X, torch.zeros(2))], input_fn=lambda batch: batch[0], show_progress=False)


def test_a_batch_of_the_wrong_shape_names_the_batch(qmodel):
    with pytest.raises(CalibrationError, match=r"running the model on calibration batch 2 \(a tensor of shape "
                                               r"\(2, 4, 6, 6\)\) failed: RuntimeError: .*the shape and dtype"):
        qatgraph.calibrate(qmodel, [X, torch.randn(2, 4, 6, 6)], show_progress=False)


def test_plain_modules_are_refused(tmp_path):
    with pytest.raises(UsageError, match="Sequential has no qatgraph quantizer, it was not compiled"):
        qatgraph.calibrate(plain(), [X], show_progress=False)
    with pytest.raises(UsageError, match="export_onnx: Sequential has no qatgraph quantizer"):
        qatgraph.export_onnx(plain(), tmp_path / "m.onnx", X)
    assert not (tmp_path / "m.onnx").exists()


def test_compiling_a_compiled_model_is_refused(qmodel):
    with pytest.raises(UsageError, match="already compiled .*Compile the original float model instead"):
        qatgraph.compile(qmodel, POLICY, example_inputs=(X,))


def test_fewer_batches_than_asked_warns_at_the_callers_line(qmodel):
    with pytest.warns(QatgraphWarning, match=r"asked for 16 batches, the data held only 2") as record:
        qatgraph.calibrate(qmodel, [X, X], num_batches=16, show_progress=False)
    assert record[0].filename == __file__


def test_compile_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qatgraph.compile(nn.Sequential(nn.ReLU()), POLICY, example_inputs=(X,))
    [warning] = [w for w in caught if issubclass(w.category, QatgraphWarning)]
    assert "quantized no layer" in str(warning.message) and warning.filename == __file__


def test_sensitivity_on_fewer_samples_than_asked_warns(qmodel):
    qatgraph.calibrate(qmodel, [X], show_progress=False)
    with pytest.warns(QatgraphWarning, match=r"num_samples=8, but the data held only 1 sample; .*at least 8 samples"):
        qatgraph.sensitivity(qmodel, [X[:1]], num_samples=8, show_progress=False)


def test_triton_backend_on_cpu_tensors_is_a_clear_error(monkeypatch):
    """Before: ``RuntimeError: 0 active drivers`` from inside Triton."""
    from qatgraph.errors import BackendUnavailableError
    from qatgraph.ops.partial_wgrad import partial_weight_grad_linear

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"backend='triton'.*(Triton runs on CUDA GPUs|not importable)"):
        partial_weight_grad_linear(torch.randn(4, 8), torch.randn(4, 6), torch.tensor([0, 2]), backend="triton")


def test_export_with_wrong_example_inputs_and_parity_grammar(qmodel, tmp_path):
    from qatgraph.errors import ExportError

    qatgraph.calibrate(qmodel, [X], show_progress=False)
    with pytest.raises(ExportError, match=r"running the model on example_inputs of shape \(2, 4, 6, 6\) failed "
                                          r"before export: RuntimeError: .*Pass example inputs of the shape"):
        qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(2, 4, 6, 6))
    path = qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", X).path
    report = qatgraph.check_parity(qmodel, path, X[:1])
    assert "on 1 sample:" in str(report) and "1 samples" not in str(report)
