"""Tests for qatgraph.backends.tensorrt.

Without TensorRT (the default here): availability reasons, the BackendUnavailableError message,
exact trtexec command lines, the trtexec fallback end to end with a fake `trtexec` script on PATH
(argument passing, atomic writes, failure reporting), input-shape validation, and the output
comparison. Tests marked ``tensorrt`` build and run real engines; they skip with the precise
reason from ``tensorrt_available()``.
"""
from __future__ import annotations

import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qatgraph.backends import tensorrt as trt_backend
from qatgraph.backends import tensorrt_runner
from qatgraph.backends.tensorrt import (
    EngineBuildConfig,
    EngineInfo,
    build_engine,
    compare_with_onnxruntime,
    tensorrt_available,
    trtexec_command,
)
from qatgraph.errors import BackendUnavailableError, ExportError

TRT_OK, TRT_REASON = tensorrt_available()  # tests marked `tensorrt` skip with this reason


def qdq_model(path: Path, dims=("batch", 3, 8, 8), input_name="input", extra_node=None) -> Path:
    """Q/DQ conv -> relu -> global pool -> flatten -> gemm, TensorRT-style INT8 (opset 13)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    weight_scale = (np.abs(weight).reshape(4, -1).max(1) / 127).astype(np.float32)
    weight_q = np.clip(np.round(weight / weight_scale[:, None, None, None]), -127, 127)
    inits = [numpy_helper.from_array(weight_q.astype(np.int8), "w_q"),
             numpy_helper.from_array(weight_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
             numpy_helper.from_array(np.array(0.03, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
             numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "bias"),
             numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(np.zeros(10, np.float32), "fc_b")]
    nodes = [helper.make_node("QuantizeLinear", [input_name, "x_scale", "x_zp"], ["x_q"], name="q_in"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_in"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="dq_w",
                              axis=0),
             helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["conv"], name="conv", pads=[1] * 4),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
    nodes += [extra_node] if extra_node is not None else []
    graph = helper.make_graph(
        nodes, "qdq_block",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0], 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


@pytest.fixture
def no_tensorrt_anywhere(monkeypatch, tmp_path):
    """Neither the Python package nor a trtexec binary can be found."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now fails
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.delenv("TRTEXEC", raising=False)


def install_fake_trtexec(monkeypatch, tmp_path, body: str) -> Path:
    """Put a `trtexec` shell script (logging its arguments to args.log) first on PATH."""
    bin_dir = tmp_path / "fake_bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "trtexec"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/args.log"\n{body}')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # force the trtexec fallback
    monkeypatch.delenv("TRTEXEC", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return script


FAKE_TRTEXEC_OK = """
for arg in "$@"; do
  case "$arg" in
    --onnx=*) onnx="${arg#--onnx=}";;
    --saveEngine=*) engine="${arg#--saveEngine=}";;
    --timingCacheFile=*) cache="${arg#--timingCacheFile=}";;
  esac
done
[ -f "$onnx" ] || { echo "onnx file '$onnx' missing" >&2; exit 4; }
case " $* " in *" --stronglyTyped "*) ;; *) echo "not strongly typed" >&2; exit 5;; esac
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100800] # trtexec $*"
printf 'FAKE-ENGINE' > "$engine"
if [ -n "$cache" ]; then printf '+CACHE' >> "$cache"; fi
echo "&&&& PASSED TensorRT.trtexec"
"""

FAKE_TRTEXEC_FAIL = """
for arg in "$@"; do case "$arg" in --saveEngine=*) engine="${arg#--saveEngine=}";; esac; done
printf 'HALF-WRITTEN' > "$engine"
echo "[I] parsing"
echo "[E] [TRT] ModelImporter.cpp:949: While parsing node number 3 [Conv -> conv]: bad weights" >&2
exit 1
"""


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


# ----------------------------------------------------------------------------- availability
def test_tensorrt_available_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert tensorrt_available() == (
        False, "python package 'tensorrt' is not installed (pip install 'qatgraph[tensorrt]')")


def test_tensorrt_available_names_the_missing_gpu(monkeypatch):
    import torch
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ok, reason = tensorrt_available()
    assert not ok and reason.startswith("no CUDA GPU visible (")


def test_build_engine_without_any_backend_says_how_to_install(no_tensorrt_anywhere, tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx")
    with pytest.raises(BackendUnavailableError) as info:
        build_engine(onnx_path, tmp_path / "m.engine")
    message = str(info.value)
    assert "pip install 'qatgraph[tensorrt]'" in message
    assert "trtexec" in message and "TRTEXEC" in message and "m.onnx" in message
    assert not (tmp_path / "m.engine").exists()


def test_trtexec_env_pointing_nowhere_is_reported(no_tensorrt_anywhere, monkeypatch, tmp_path):
    monkeypatch.setenv("TRTEXEC", str(tmp_path / "missing" / "trtexec"))
    with pytest.raises(BackendUnavailableError, match=r"\$TRTEXEC=.*not an executable"):
        build_engine(qdq_model(tmp_path / "m.onnx"), tmp_path / "m.engine")


# ----------------------------------------------------------------------------- trtexec command
def test_trtexec_command_for_dynamic_batch(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx")
    config = EngineBuildConfig(workspace_gib=2.0, min_batch=1, opt_batch=8, max_batch=32,
                               timing_cache=str(tmp_path / "t.cache"), builder_optimization_level=4)
    assert trtexec_command(onnx_path, tmp_path / "m.engine", config) == [
        "trtexec", f"--onnx={onnx_path}", f"--saveEngine={tmp_path / 'm.engine'}",
        "--stronglyTyped", "--memPoolSize=workspace:2048M",
        "--minShapes=input:1x3x8x8", "--optShapes=input:8x3x8x8", "--maxShapes=input:32x3x8x8",
        f"--timingCacheFile={tmp_path / 't.cache'}", "--builderOptimizationLevel=4",
        "--skipInference"]


def test_trtexec_command_static_model_weak_typing(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx", dims=(4, 3, 8, 8), input_name="images:0")
    config = EngineBuildConfig(strongly_typed=False, fp16_fallback=True, workspace_gib=0.5,
                               verbose=True)
    command = trtexec_command(onnx_path, "out.engine", config, trtexec="/opt/trt/bin/trtexec")
    assert command == ["/opt/trt/bin/trtexec", f"--onnx={onnx_path}", "--saveEngine=out.engine",
                       "--int8", "--fp16", "--memPoolSize=workspace:512M", "--skipInference",
                       "--verbose"]  # static shapes: no shape flags; Q/DQ present: --int8


def test_trtexec_command_quotes_names_trtexec_would_split(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx", input_name="images:0")
    command = trtexec_command(onnx_path, "e.engine", EngineBuildConfig(min_batch=2, opt_batch=2,
                                                                        max_batch=4))
    assert "--minShapes='images:0':2x3x8x8" in command
    assert "--maxShapes='images:0':4x3x8x8" in command


def test_dynamic_non_batch_dim_is_rejected_with_the_fix(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx", dims=("batch", 3, "height", 8))
    for call in (lambda: trtexec_command(onnx_path, "e.engine"),
                 lambda: build_engine(onnx_path, tmp_path / "e.engine")):
        with pytest.raises(ExportError) as info:
            call()
        message = str(info.value)
        assert "input 'input'" in message and "dim 2 ('height')" in message
        assert "only dim 0 (batch) may be dynamic" in message and "Re-export" in message


@pytest.mark.parametrize("overrides, pattern", [
    ({"min_batch": 8, "opt_batch": 4}, r"min_batch <= opt_batch <= max_batch, got 8, 4, 32"),
    ({"max_bach": 64}, r"unknown engine build option 'max_bach' \(did you mean 'max_batch'"),
    ({"fp16_fallback": True}, r"fp16_fallback=True needs strongly_typed=False"),
    ({"workspace_gib": 0.0}, r"workspace_gib=0.0 is below 1 MiB"),
])
def test_bad_build_options_are_reported(tmp_path, overrides, pattern):
    with pytest.raises(ExportError, match=pattern):
        build_engine(qdq_model(tmp_path / "m.onnx"), tmp_path / "e.engine", **overrides)


def test_missing_onnx_file_is_reported(tmp_path):
    with pytest.raises(ExportError, match=r"does not exist; export the model first"):
        trtexec_command(tmp_path / "nope.onnx", "e.engine")


# ----------------------------------------------------------------------------- trtexec fallback
def test_trtexec_fallback_builds_atomically(monkeypatch, tmp_path):
    install_fake_trtexec(monkeypatch, tmp_path, FAKE_TRTEXEC_OK)
    onnx_path = qdq_model(tmp_path / "m.onnx")
    out_dir = tmp_path / "engines"
    out_dir.mkdir()
    engine_path, cache_path = out_dir / "m.engine", out_dir / "timing.cache"
    engine_path.write_bytes(b"OLD-ENGINE")
    cache_path.write_bytes(b"OLD")
    info = build_engine(onnx_path, engine_path, timing_cache=str(cache_path), max_batch=16)

    assert isinstance(info, EngineInfo) and info.builder == "trtexec"
    assert info.engine_path == str(engine_path) and info.trt_version == "10.8.0"
    assert info.inputs == [("input", "float32", (-1, 3, 8, 8))]
    assert info.outputs == [("logits", "float32", (-1, 10))]
    assert engine_path.read_bytes() == b"FAKE-ENGINE"
    assert cache_path.read_bytes() == b"OLD+CACHE"  # loaded, extended, renamed back
    assert leftovers(out_dir) == []
    args = (tmp_path / "args.log").read_text().splitlines()
    temp_engine = Path(args[1].removeprefix("--saveEngine="))
    assert temp_engine.parent == out_dir and temp_engine.name != "m.engine"  # never in place
    expected = trtexec_command(onnx_path, temp_engine,
                               EngineBuildConfig(timing_cache="CACHE", max_batch=16))
    assert [a for a in args if not a.startswith("--timingCacheFile=")] == \
        [a for a in expected[1:] if not a.startswith("--timingCacheFile=")]


def test_trtexec_failure_keeps_the_old_engine(monkeypatch, tmp_path):
    install_fake_trtexec(monkeypatch, tmp_path, FAKE_TRTEXEC_FAIL)
    onnx_path = qdq_model(tmp_path / "m.onnx")
    engine_path, cache_path = tmp_path / "m.engine", tmp_path / "timing.cache"
    engine_path.write_bytes(b"GOOD-ENGINE")
    cache_path.write_bytes(b"GOOD-CACHE")
    with pytest.raises(ExportError) as info:
        build_engine(onnx_path, engine_path, timing_cache=str(cache_path))
    message = str(info.value)
    assert "exit code 1" in message and "was left as it was" in message
    assert "While parsing node number 3 [Conv -> conv]: bad weights" in message
    assert engine_path.read_bytes() == b"GOOD-ENGINE"
    assert cache_path.read_bytes() == b"GOOD-CACHE"
    assert leftovers(tmp_path) == []


def test_trtexec_success_without_engine_is_an_error(monkeypatch, tmp_path):
    install_fake_trtexec(monkeypatch, tmp_path, 'echo "&&&& PASSED"\nexit 0\n')
    with pytest.raises(ExportError, match="trtexec exited 0 but wrote no engine"):
        build_engine(qdq_model(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- comparison
def test_compare_outputs_reports_diff_and_top1():
    reference = {"logits": np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.1]], np.float32),
                 "score": np.array([0.5, 0.25], np.float32)}
    candidate = {"logits": np.array([[0.0, 1.0, 0.5], [0.0, 2.5, 0.1]], np.float32),
                 "score": np.array([0.5, 0.75], np.float32)}
    report = tensorrt_runner._compare_outputs(reference, candidate)
    assert report["logits"] == {"max_abs_diff": 2.5, "mean_abs_diff": 4.5 / 6,
                                "top1_agreement": 0.5}
    assert report["score"] == {"max_abs_diff": 0.5, "mean_abs_diff": 0.25, "top1_agreement": None}
    with pytest.raises(ExportError, match="shapes differ"):
        tensorrt_runner._compare_outputs(reference, {**candidate, "score": np.zeros(3)})


def test_onnxruntime_reference_runs_the_qdq_model(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx")
    batch = np.random.default_rng(1).normal(size=(5, 3, 8, 8))  # float64: cast to the ONNX type
    outputs = tensorrt_runner._run_onnxruntime(str(onnx_path), {"input": batch})
    assert list(outputs) == ["logits"] and outputs["logits"].shape == (5, 10)
    report = tensorrt_runner._compare_outputs(outputs, outputs)
    assert report["logits"]["max_abs_diff"] == 0.0 and report["logits"]["top1_agreement"] == 1.0


def test_compare_without_tensorrt_is_unavailable(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine_path = tmp_path / "m.engine"
    engine_path.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailableError, match="python package 'tensorrt' is not installed"):
        compare_with_onnxruntime(engine_path, qdq_model(tmp_path / "m.onnx"),
                                 [np.zeros((1, 3, 8, 8), np.float32)])


# ----------------------------------------------------------------------------- real TensorRT
@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON)
@pytest.mark.parametrize("batch", [1, 5, 32])
def test_engine_matches_onnxruntime(tmp_path, batch):
    onnx_path = qdq_model(tmp_path / "m.onnx")
    info = build_engine(onnx_path, tmp_path / "m.engine", max_batch=32,
                        timing_cache=str(tmp_path / "timing.cache"))
    assert info.builder == "python" and info.inputs[0][0] == "input"
    assert (tmp_path / "timing.cache").stat().st_size > 0
    inputs = [np.random.default_rng(batch).normal(size=(batch, 3, 8, 8)).astype(np.float32)]
    report = compare_with_onnxruntime(info.engine_path, onnx_path, inputs)
    # INT8 conv with identical scales: TensorRT and ORT may round a few values one step apart
    assert report["logits"]["max_abs_diff"] < 0.05
    assert report["logits"]["top1_agreement"] >= 0.8


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON)
def test_engine_rejects_batch_outside_profile(tmp_path):
    onnx_path = qdq_model(tmp_path / "m.onnx")
    info = build_engine(onnx_path, tmp_path / "m.engine", min_batch=1, opt_batch=2, max_batch=4)
    runner = trt_backend.EngineRunner(info.engine_path)
    assert runner(np.zeros((4, 3, 8, 8), np.float32))[0].shape == (4, 10)
    with pytest.raises(ExportError, match="outside the engine's profile"):
        runner(np.zeros((5, 3, 8, 8), np.float32))


@pytest.mark.tensorrt
@pytest.mark.skipif(not TRT_OK, reason=TRT_REASON)
def test_parser_error_names_the_node_and_keeps_old_engine(tmp_path):
    bad = helper.make_node("NoSuchOp", ["logits"], ["extra"], name="mystery_node", domain="acme")
    onnx_path = qdq_model(tmp_path / "m.onnx", extra_node=bad)
    model = onnx.load(str(onnx_path))
    model.opset_import.append(helper.make_opsetid("acme", 1))
    onnx.save(model, str(onnx_path))
    (tmp_path / "m.engine").write_bytes(b"GOOD")
    with pytest.raises(ExportError, match="mystery_node"):
        build_engine(onnx_path, tmp_path / "m.engine")
    assert (tmp_path / "m.engine").read_bytes() == b"GOOD"
