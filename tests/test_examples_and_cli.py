"""The examples, the CLI and the demo run end to end (small sizes), so they cannot rot."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import qatgraph
from qatgraph.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QATGRAPH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                          text=True, env=env, timeout=600)


@pytest.mark.slow
def test_resnet_example_runs(tmp_path):
    process = run_example("resnet_qat.py", "--small", "--out", str(tmp_path))
    assert process.returncode == 0, process.stderr[-3000:]
    assert "0 lint errors" in process.stdout and "ORT parity" in process.stdout
    assert (tmp_path / "sensitivity" / "sensitivity.html").exists()


@pytest.mark.slow
def test_ddp_example_runs_on_two_cpu_processes(tmp_path):
    """torchrun --standalone (a free port of its own) starts 2 gloo processes; the whole process group
    is killed if it outlives the time limit."""
    env = {**os.environ, "QATGRAPH_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               os.path.join(ROOT, "examples", "ddp_qat.py"), "--small", "--efqat", "--out", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in 300 s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    assert process.returncode == 0, stderr[-4000:]
    assert "2 rank(s) on cpu" in stdout and "0 lint errors" in stdout and "EfQAT: 56 of 224 rows train" in stdout
    assert stdout.count("exported") == 1, "only rank 0 prints"
    for name in ("model_int8.onnx", "finetune.pt", "sensitivity/sensitivity.html"):
        assert (tmp_path / name).exists(), name


def _tiny_model_module(tmp_path) -> str:
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(
        "from qatgraph.demo.model import SmallResNet\n"
        "def tiny():\n    return SmallResNet(in_channels=3, num_classes=10, widths=(16, 32), blocks_per_stage=1)\n")
    return str(tmp_path)


def test_cli_compile_calibrate_export_lint_parity(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(_tiny_model_module(tmp_path))
    checkpoint, onnx_path = str(tmp_path / "qat.pt"), str(tmp_path / "model.onnx")
    torch.save(torch.randn(32, 3, 16, 16), tmp_path / "inputs.pt")
    assert main(["compile", "userpkg.nets:tiny", "--input-shape", "1,3,16,16", "-o", checkpoint]) == 0
    assert main(["calibrate", checkpoint, "--data", str(tmp_path / "inputs.pt"), "--num-batches", "2",
                 "--batch-size", "8"]) == 0
    assert main(["export", checkpoint, "-o", onnx_path]) == 0
    assert main(["lint", onnx_path]) == 0
    assert main(["parity", checkpoint, onnx_path, "--data", str(tmp_path / "inputs.pt"), "--num-samples", "16"]) == 0
    assert main(["summary", checkpoint]) == 0
    out = capsys.readouterr().out
    assert "clean for tensorrt" in out and "ORT parity" in out and "layers.0.0.conv1" in out


def test_cli_errors_are_clear_and_exit_2(tmp_path, capsys):
    assert main(["compile", "no_such_module:factory", "--input-shape", "1,3,8,8"]) == 2
    assert "cannot import 'no_such_module'" in capsys.readouterr().err
    assert main(["calibrate", str(tmp_path / "missing.pt"), "--data", "random"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compile", "x:y", "--input-shape", "1,a"])


def test_cli_lint_lists_rules(capsys):
    assert main(["lint", "--rules"]) == 0
    assert "qdq-before-residual-add" in capsys.readouterr().out


def test_cli_build_engine_without_tensorrt_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    assert main(["build-engine", str(onnx_file), "-o", str(tmp_path / "m.engine")]) == 3  # backend unavailable
    assert "qatgraph[tensorrt]" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_quick_writes_every_artifact(tmp_path):
    from qatgraph.demo import run_demo

    result = run_demo(out_dir=str(tmp_path), quick=True)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("fp32_acc", "ptq_acc", "qat_acc", "efqat_acc", "ort_int8_acc", "qat_backward_ms", "ort_int8_ms",
                "w4a4_ptq_acc", "w4a4_qat_acc", "w4a4_efqat_acc", "w3a8_ptq_acc", "w3a8_qat_acc", "w3a8_efqat_acc",
                "ort_parity_max_rel", "ort_parity_max_steps"):
        assert key in summary, key
    assert summary["dataset"].startswith("mnist1d") and summary["test_samples"] == 1000
    assert summary["fp32_acc"] > 0.5 and summary["ort_parity_top1"] > 0.95  # 3 epochs: well above 10 % chance
    assert 0.0 <= summary["ort_parity_max_rel"] < 1.0 and summary["ort_parity_max_steps"] >= 0.0
    assert summary["lint_errors"] == 0
    for name in ("model_int8.onnx", "model_fp32.onnx", "sensitivity/sensitivity.html"):
        assert (tmp_path / name).exists(), name
    assert result.metrics["qat_acc"] == summary["qat_acc"]
    # The exported model is the QAT model whose accuracy the table shows: with float biases (as
    # in the parity check), ORT's accuracy differs at most by the fraction of disagreeing samples.
    disagreement = 1.0 - summary["ort_parity_top1"]
    assert abs(summary["ort_int8_float_bias_acc"] - summary["qat_acc"]) <= disagreement + 1e-9


def test_mnist1d_is_generated_once_and_cached(tmp_path, monkeypatch):
    from qatgraph.demo import data as demo_data

    first = demo_data.load_mnist1d_data(cache_dir=str(tmp_path))
    cached = list(tmp_path.iterdir())
    assert [p.name for p in cached] == ["mnist1d_seed42.pkl"]
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # a second load must not need the generator
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    second = demo_data.load_mnist1d_data(cache_dir=str(tmp_path))
    assert first.input_shape == second.input_shape == (1, 40)
    assert (len(first.train_x), len(first.test_x)) == (4000, 1000)
    assert torch.equal(first.test_x, second.test_x) and torch.equal(first.train_y, second.train_y)
    cached[0].write_bytes(b"damaged")  # a damaged cache is regenerated, or named if it cannot be
    with pytest.raises(qatgraph.QatgraphError, match="mnist1d"):
        demo_data.load_mnist1d_data(cache_dir=str(tmp_path))
    monkeypatch.undo()
    assert torch.equal(demo_data.load_mnist1d_data(cache_dir=str(tmp_path)).test_x, first.test_x)


@pytest.mark.slow
def test_bert_example_runs(tmp_path):
    pytest.importorskip("transformers", reason="the BERT example builds its model with transformers")
    process = run_example("bert_qat.py", "--small", "--out", str(tmp_path))
    assert process.returncode == 0, process.stderr[-3000:]
    assert "0 lint errors" in process.stdout and "top-1 agreement 100.00%" in process.stdout
