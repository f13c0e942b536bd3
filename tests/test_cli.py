"""The command line: one-paragraph errors with distinct exit codes, self-contained checkpoints,
factories from the current directory, --version, --help with descriptions and defaults, and
warnings without qatgraph's source locations (issue 14 items 4, 5 and 9)."""
from __future__ import annotations

import os

import pytest
import torch

import qatgraph
from qatgraph import cli
from qatgraph.cli import EXIT_CHECK_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, main

FACTORY = '''
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 16))

def nothing():
    return nn.Sequential(nn.ReLU())
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project directory: a factory module in it, inputs, FP32 weights in sub/."""
    name = f"userfactory_{os.getpid()}_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(FACTORY)
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    torch.save(torch.randn(20, 3, 8, 8), tmp_path / "inputs.pt")
    return tmp_path, name


def compile_checkpoint(name: str, *extra: str) -> int:
    return main(["compile", f"{name}:net", "--input-shape", "1,3,8,8", "-o", "sub/qat.pt", *extra])


def test_a_factory_in_the_current_directory_is_found(project):
    """Like ``python -m``: before, the CLI could not import ``mymodels:factory`` from the current directory."""
    import importlib

    _, name = project
    with pytest.raises(ImportError):
        importlib.import_module(name)  # not on sys.path for Python code ...
    assert compile_checkpoint(name) == EXIT_OK  # ... but the command searches the current directory
    assert os.getcwd() not in __import__("sys").path  # and leaves sys.path as it was


def test_checkpoints_do_not_need_the_weights_file_any_more(project, capsys, monkeypatch):
    """Before: ``compile --weights fp32.pt -o qat.pt; cd ..; summary sub/qat.pt`` -> FileNotFoundError."""
    tmp_path, name = project
    namespace: dict = {}
    exec(FACTORY, namespace)  # noqa: S102 - the test's own factory source
    torch.save(namespace["net"]().state_dict(), tmp_path / "sub" / "fp32.pt")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path / "sub")
    assert main(["compile", f"{name}:net", "--input-shape", "1,3,8,8", "--weights", "fp32.pt", "-o", "qat.pt"]) == 0
    os.remove("fp32.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "sub/qat.pt", "--data", "inputs.pt", "--num-batches", "1", "--batch-size", "1"]) == 0
    assert main(["summary", "sub/qat.pt"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "calibrated on 1 sample in 1 batch; wrote sub/qat.pt" in out and "weighted layers quantized" in out


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and f"qatgraph {qatgraph.__version__}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["calibrate", "--help"])
    text = capsys.readouterr().out
    assert "Calibrate the activation scales of a QAT checkpoint. Runs the data" in text
    assert "(default: 16)" in text and "(default: None)" not in text
    assert "2  usage error" in text and "3  a backend is not available" in text


def test_usage_errors_exit_2_with_one_paragraph(project, capsys):
    tmp_path, name = project
    assert compile_checkpoint(name) == EXIT_OK
    assert main(["export", "sub/qat.pt", "-o", "sub"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "qatgraph export: error: the ONNX model path 'sub' is an existing directory" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert main(["calibrate", "sub/qat.pt", "--data", "inputs.pt", "--num-batches", "1"]) == EXIT_OK
    assert main(["export", "sub/qat.pt", "-o", "sub/m.onnx"]) == EXIT_OK
    torch.save(torch.randn(4, 3, 9, 9), tmp_path / "wrong.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    (tmp_path / "corrupt.onnx").write_bytes(b"not an onnx file")
    capsys.readouterr()
    cases = {
        ("summary", "sub/m.onnx"): "looks like an ONNX model",
        ("lint", "corrupt.onnx"): "is not a readable ONNX model",
        ("parity", "sub/qat.pt", "sub/m.onnx", "--data", "wrong.pt"): "holds samples of shape (3, 9, 9), but the model",
        ("compile", f"{name}:net", "--input-shape", "1,3,8,8", "--weights", "pickled.pt"): "holds Python objects",
        ("compile", f"{name}:net", "--input-shape", "1,3,8,8", "-o", "sub"): "is an existing directory",
        ("compile", "sub/qat.pt", "--input-shape", "1,3,8,8"): "must look like 'package.module:factory'",
    }
    for argv, expected in cases.items():
        assert main(list(argv)) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as exited:  # argparse's own usage errors: the same code
        main(["compile", "x:y", "--input-shape", "1,a"])
    assert exited.value.code == EXIT_USAGE


def test_nothing_to_calibrate_is_an_error_not_a_success(project, capsys):
    _, name = project
    assert main(["compile", f"{name}:nothing", "--input-shape", "1,3,8,8", "-o", "sub/n.pt"]) == EXIT_OK
    assert main(["calibrate", "sub/n.pt", "--data", "inputs.pt"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "has no enabled quantizer, so there is nothing to calibrate" in err and "calibrated" not in err
    assert "qatgraph compile: warning: qatgraph.compile quantized no layer" in err
    assert ".py:" not in err  # warnings carry no qatgraph source location


def test_fewer_batches_than_asked_warns(project, capsys):
    _, name = project
    assert compile_checkpoint(name) == EXIT_OK
    assert main(["calibrate", "sub/qat.pt", "--data", "inputs.pt", "--num-batches", "16", "--batch-size", "8"]) == 0
    err = capsys.readouterr().err
    assert "qatgraph calibrate: warning: qatgraph.calibrate: asked for 16 batches, the data held only 3" in err
    assert main(["sensitivity", "sub/qat.pt", "--data", "inputs.pt", "--num-samples", "64", "--out", "sens"]) == 0
    assert "qatgraph sensitivity: warning: --num-samples 64, but 'inputs.pt' holds only 20 samples" in \
        capsys.readouterr().err


def test_unavailable_backends_exit_3_and_internal_errors_exit_4(project, capsys, monkeypatch):
    tmp_path, _ = project
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    (tmp_path / "m.onnx").write_bytes(b"")
    assert main(["build-engine", "m.onnx", "-o", "m.engine"]) == EXIT_UNAVAILABLE
    assert "qatgraph[tensorrt]" in capsys.readouterr().err

    def broken(args):
        raise ValueError("something nobody foresaw")

    monkeypatch.setattr(cli.commands, "cmd_summary", broken)
    monkeypatch.setattr(cli, "build_parser", _parser_with(broken))
    assert main(["summary", "x.pt"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "qatgraph summary: internal error: ValueError: something nobody foresaw. This is a bug" in err
    assert "Traceback" not in err
    assert main(["-v", "summary", "x.pt"]) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def _parser_with(func):
    build = cli.build_parser

    def parser():
        built = build()
        for action in built._subparsers._group_actions:
            action.choices["summary"].set_defaults(func=func)
        return built
    return parser


def test_exit_code_1_stays_for_failed_checks():
    assert EXIT_CHECK_FAILED == 1 and len({EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE,
                                          EXIT_INTERNAL}) == 5
