"""qatgraph.atomic_files: every file qatgraph writes is atomic and gets ordinary permissions.

Before: checkpoints, ONNX exports and engines came out mode 600 (``tempfile.mkstemp``'s), and
overwriting a 644 file turned it 600. Now a new file gets ``0o666 & ~umask`` and an existing one
keeps its mode; a directory as the destination is a clear :class:`UsageError`.
"""
from __future__ import annotations

import os
import stat

import pytest
import torch
from torch import nn

import qatgraph
from qatgraph.atomic_files import atomic_path, current_umask, write_bytes, write_text
from qatgraph.errors import UsageError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda value: os.umask(value)
    os.umask(previous)


def test_umask_is_read_without_changing_it(umask):
    umask(0o027)
    assert current_umask() == 0o027 and current_umask() == 0o027


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_text(tmp_path / "report.md", "hello")
    assert mode(tmp_path / "report.md") == expected
    assert (tmp_path / "report.md").read_text() == "hello"


def test_overwriting_keeps_the_files_mode(tmp_path, umask):
    umask(0o022)
    target = tmp_path / "model.engine"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "qat.pt"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"good" and os.listdir(tmp_path) == ["qat.pt"]


def test_a_directory_as_destination_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is an existing directory; give a file inside it"):
        write_text(tmp_path, "x", "checkpoint")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="a parent of it is a file"):
        write_text(tmp_path / "file" / "out.json", "x")


def test_checkpoint_onnx_and_reports_are_written_with_ordinary_modes(tmp_path, umask):
    from qatgraph.checkpoint import ModelSource, save_checkpoint

    umask(0o022)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "min_channels": 0}, example_inputs=(x,))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    checkpoint = tmp_path / "qat.pt"
    save_checkpoint(checkpoint, qmodel, ModelSource("m:f", None, (2, 3, 8, 8)), qmodel.qatgraph_info.policy)
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"")
    os.chmod(onnx_path, 0o644)
    qatgraph.export_onnx(qmodel, onnx_path, x)
    assert mode(checkpoint) == 0o644 and mode(onnx_path) == 0o644
    with pytest.raises(UsageError, match="existing directory"):
        qatgraph.export_onnx(qmodel, tmp_path, x)
