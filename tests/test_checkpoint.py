"""QAT checkpoints are self-contained and refuse what they cannot read in one paragraph.

Before: a checkpoint re-read its ``--weights`` file on every load (``FileNotFoundError:
'fp32.pt'`` after ``cd ..`` or after moving the file), a pickle with arbitrary objects gave 20
lines of traceback, and ``qatgraph summary model.onnx`` an ``UnpicklingError``.
"""
from __future__ import annotations

import os

import pytest
import torch

import qatgraph
from qatgraph.checkpoint import FORMAT, ModelSource, load_checkpoint, save_checkpoint
from qatgraph.errors import StateMismatchError, UsageError
from qatgraph.policy import Policy

SHAPE = (1, 3, 8, 8)
POLICY = Policy.from_any({"preset": "tensorrt", "min_channels": 0})


def trained_weights(path) -> dict[str, torch.Tensor]:
    """FP32 weights unlike the factory's own initialization (the factory seeds 0)."""
    from checkpoint_models import small_residual

    torch.manual_seed(7)
    model = small_residual()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    torch.save(model.state_dict(), path)
    return model.state_dict()


def compiled_checkpoint(tmp_path, weights: str | None) -> tuple[str, torch.Tensor]:
    source = ModelSource("checkpoint_models:small_residual", weights, SHAPE)
    qmodel = qatgraph.compile(source.build(), POLICY, example_inputs=(source.example_input(),))
    qatgraph.calibrate(qmodel, [torch.randn(4, *SHAPE[1:]) for _ in range(2)], show_progress=False)
    path = str(tmp_path / "sub" / "qat.pt")
    save_checkpoint(path, qmodel, source, POLICY)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        return path, (x, qmodel.eval()(x))


def test_checkpoint_loads_without_its_weights_file_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    trained = trained_weights("fp32.pt")
    path, (x, expected) = compiled_checkpoint(tmp_path, "fp32.pt")
    os.remove(tmp_path / "sub" / "fp32.pt")
    monkeypatch.chdir(tmp_path)
    qmodel, source, _ = load_checkpoint("sub/qat.pt")
    assert source.weights == "fp32.pt"  # kept as a record only
    with torch.no_grad():
        torch.testing.assert_close(qmodel.eval()(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(qmodel.get_submodule("head").weight, trained["head.weight"])
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT == "qatgraph-checkpoint/2" and payload["weights_source"] == "fp32.pt"
    assert payload["qatgraph_version"] == qatgraph.__version__


class Pickled:
    """Not a tensor: weights_only loading must refuse it."""


def test_weights_with_python_objects_are_refused_in_one_paragraph(tmp_path):
    torch.save({"model": Pickled()}, tmp_path / "whole.pt")
    source = ModelSource("checkpoint_models:small_residual", str(tmp_path / "whole.pt"), SHAPE)
    with pytest.raises(UsageError) as raised:
        source.build()
    message = str(raised.value)
    assert "holds Python objects other than tensors" in message and "torch.save(model.state_dict(), path)" in message
    assert "weights_only=False" not in message and "\n" not in message
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(UsageError, match="holds a list, not a state dict of tensors"):
        ModelSource("checkpoint_models:small_residual", str(tmp_path / "list.pt"), SHAPE).build()


def test_files_that_are_not_checkpoints_get_a_clear_error(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(UsageError, match="looks like an ONNX model: use `qatgraph lint` or `qatgraph parity`"):
        load_checkpoint(tmp_path / "model.onnx")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(UsageError, match="is not a qatgraph checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": "qatgraph-checkpoint/9"}, tmp_path / "future.pt")
    with pytest.raises(UsageError, match="newer qatgraph"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(UsageError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_a_checkpoint_whose_model_changed_is_explained(tmp_path, monkeypatch):
    path, _ = compiled_checkpoint(tmp_path, None)
    payload = torch.load(path, weights_only=True)
    payload["policy"]["overrides"] = [{"name": "head", "skip": True}]  # as if compiled with another skip list
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(StateMismatchError, match=r"checkpoint .*other.pt' does not fit the model "
                                                 r"checkpoint_models:small_residual builds now: .*head.weight_quantizer"):
        load_checkpoint(tmp_path / "other.pt")
