"""Demo steps that touch the backends: ONNX export, ONNX Runtime accuracy/parity/latency,
TensorRT (when present), backward timing, and the final table."""
from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .data import DemoData



@dataclass
class DemoResult:
    """What the demo measured: accuracies and other numbers (``metrics``) and seconds (``timings``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def measure_backward(full_qat: nn.Module, efqat: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                     repeats: int = 7) -> dict[str, float]:
    """Median backward time (ms) of one batch, full QAT vs EfQAT, measured interleaved, on copies
    (train-mode forwards would move the models' BN running statistics)."""
    full_qat, efqat = copy.deepcopy(full_qat), copy.deepcopy(efqat)
    inputs, targets = batch
    times: dict[str, list[float]] = {"qat_backward_ms": [], "efqat_backward_ms": []}
    for _ in range(repeats + 1):
        for key, model in (("qat_backward_ms", full_qat), ("efqat_backward_ms", efqat)):
            model.train()
            loss = F.cross_entropy(model(inputs), targets)
            started = time.perf_counter()
            loss.backward()
            times[key].append((time.perf_counter() - started) * 1e3)
            model.zero_grad(set_to_none=True)
    return {key: statistics.median(values[1:]) for key, values in times.items()}  # first round is warm-up


def _ort_accuracy(runner, batches) -> float:
    correct = total = 0
    for inputs, targets in batches:
        logits = runner(inputs.numpy())[0]
        correct += int((np.argmax(logits, 1) == targets.numpy()).sum())
        total += len(targets)
    return correct / max(total, 1)


def _ort_latency_ms(runner, sample: np.ndarray, repeats: int = 50) -> float:
    for _ in range(5):
        runner(sample)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner(sample)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def export_and_evaluate(fp_model: nn.Module, qat_model: nn.Module, data: DemoData, out_dir: str,
                        result: DemoResult) -> None:
    from qatgraph.backends.onnx import export_onnx
    from qatgraph.backends.onnxruntime import OrtRunner
    from qatgraph.backends.parity import check_parity
    from qatgraph.backends.tensorrt import build_engine, tensorrt_available

    example = data.test_x[:1]
    int8_path, fp32_path = os.path.join(out_dir, "model_int8.onnx"), os.path.join(out_dir, "model_fp32.onnx")
    exported = export_onnx(qat_model, int8_path, (example,))
    result.metrics["lint_errors"] = sum(f.severity == "error" for f in exported.findings)
    result.metrics["lint_warnings"] = sum(f.severity != "error" for f in exported.findings)
    _export_fp32(fp_model, fp32_path, example)
    int8_runner, fp32_runner = OrtRunner(int8_path), OrtRunner(fp32_path)
    result.metrics["ort_int8_acc"] = _ort_accuracy(int8_runner, data.test_batches())
    # ORT's default session rounds float biases to int32 (its integer kernels need that); TensorRT
    # and the parity check keep them float, so report that accuracy too.
    float_bias_runner = OrtRunner(int8_path, quantize_bias=False)
    result.metrics["ort_int8_float_bias_acc"] = _ort_accuracy(float_bias_runner, data.test_batches())
    parity = check_parity(qat_model, int8_path, list(data.test_x.split(256)), runner=float_bias_runner)
    result.metrics["ort_parity_top1"] = parity.top1_agreement
    result.metrics["ort_parity_max_abs_diff"] = parity.max_abs_diff
    result.metrics["ort_parity_passed"] = parity.passed
    result.metrics["ort_parity_forced_rel"] = parity.forced_relative_error
    result.metrics["ort_parity_max_rel"] = parity.relative_error
    result.metrics["ort_parity_max_steps"] = float(parity.max_abs_diff) / _last_activation_step(qat_model)
    u8s8_path = os.path.join(out_dir, "model_int8_onnxruntime.onnx")
    export_onnx(_onnxruntime_preset_model(fp_model, data), u8s8_path, (example,))
    sample = data.test_x[:64].numpy()
    runners = {"ort_fp32_ms": fp32_runner, "ort_int8_ms": int8_runner, "ort_u8s8_ms": OrtRunner(u8s8_path)}
    result.timings.update({key: _ort_latency_ms(runner, sample) for key, runner in runners.items()})
    result.metrics["onnx_int8_bytes"] = os.path.getsize(int8_path)
    result.metrics["onnx_fp32_bytes"] = os.path.getsize(fp32_path)
    available, reason = tensorrt_available()
    if available:
        info = build_engine(int8_path, os.path.join(out_dir, "model_int8.engine"))
        result.metrics["tensorrt_engine"] = info.engine_path
    else:
        result.metrics["tensorrt_engine"] = f"skipped: {reason}"


def _last_activation_step(model: nn.Module) -> float:
    """The step (scale) of the last activation quantizer of the model: the input of its head."""
    from qatgraph.quant.quantizer import FakeQuantizer

    steps = [float(q.scale.detach().flatten()[0]) for q in model.modules()
             if isinstance(q, FakeQuantizer) and not q.is_weight and getattr(q, "scale", None) is not None
             and q.scale.numel() == 1]
    return steps[-1] if steps else float("nan")


def _onnxruntime_preset_model(fp_model: nn.Module, data: DemoData) -> nn.Module:
    """The same FP32 model PTQ-quantized with the onnxruntime preset (UINT8 activations): the
    format ONNX Runtime's x86 integer kernels run fastest."""
    import qatgraph

    qmodel = qatgraph.compile(fp_model, "onnxruntime", example_inputs=(data.train_x[:2],))
    qatgraph.calibrate(qmodel, list(data.train_x[:512].split(64)), show_progress=False)
    return qmodel


def _export_fp32(model: nn.Module, path: str, example: torch.Tensor) -> None:
    import warnings

    from qatgraph.atomic_files import atomic_path

    with warnings.catch_warnings(), atomic_path(path, "ONNX model") as temporary:
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), temporary, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def print_table(result: DemoResult, out_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    m, t = result.metrics, result.timings
    table = Table(title=f"qatgraph demo — {m['dataset']}")
    table.add_column("format")
    for column in ("FP32", "PTQ", "QAT", "EfQAT (5%)"):
        table.add_column(column, justify="right")
    pct = lambda v: f"{100 * v:.2f}%"  # noqa: E731
    table.add_row("INT8 (W8A8)", pct(m["fp32_acc"]), pct(m["int8_ptq_acc"]), pct(m["int8_qat_acc"]),
                  pct(m["int8_efqat_acc"]))
    table.add_row("W4A4, all layers (input 8-bit)", pct(m["fp32_acc"]), pct(m["w4a4_ptq_acc"]), pct(m["w4a4_qat_acc"]),
                  pct(m["w4a4_efqat_acc"]))
    table.add_row("W3A8, all layers", pct(m["fp32_acc"]), pct(m["w3a8_ptq_acc"]), pct(m["w3a8_qat_acc"]),
                  pct(m["w3a8_efqat_acc"]))
    console = Console()
    console.print(table)
    n = m["test_samples"]
    print(f"test set: {n} samples, so one sample is {100 / n:.2f} points; INT8 is the tensorrt preset (layers "
          "under 16 channels, such as a 1-channel first conv or a 10-way head, stay float), the low-bit rows "
          "quantize every layer"
          + ("; --quick: under-trained models, the accuracies say nothing" if m.get("quick") else ""))
    print(f"ONNX Runtime INT8 accuracy {pct(m['ort_int8_acc'])} (ORT default, biases rounded to int32; "
          f"{pct(m['ort_int8_float_bias_acc'])} with float biases as in TensorRT); parity with PyTorch on the "
          f"test set: top-1 "
          f"agreement {pct(m['ort_parity_top1'])}, max |diff| {m['ort_parity_max_abs_diff']:.2e} on logits "
          f"(= {100 * m['ort_parity_max_rel']:.2f}% of the largest |logit|, "
          f"{m['ort_parity_max_steps']:.2f} steps of the last activation quantizer) "
          f"({'PASSED' if m.get('ort_parity_passed') else 'FAILED'}); lint: "
          f"{m['lint_errors']} errors, {m['lint_warnings']} warnings")
    print(f"ONNX Runtime CPU latency, batch 64: FP32 {t['ort_fp32_ms']:.2f} ms; INT8 tensorrt preset (S8S8) "
          f"{t['ort_int8_ms']:.2f} ms ({t['ort_fp32_ms'] / t['ort_int8_ms']:.2f}x); INT8 onnxruntime preset (U8S8) "
          f"{t['ort_u8s8_ms']:.2f} ms ({t['ort_fp32_ms'] / t['ort_u8s8_ms']:.2f}x). The tensorrt preset's "
          "signed-activation (S8S8) Q/DQ graph is built for TensorRT's fused INT8 kernels; ONNX Runtime's x86 "
          "CPU integer kernels are fast for U8S8 (UINT8 activations, the onnxruntime preset) and run S8S8 "
          "Q/DQ largely as separate dequantize + float ops, so only the U8S8 number says what INT8 buys on CPU")
    print(f"ONNX size {m['onnx_fp32_bytes'] / 1e3:.0f} kB FP32 -> {m['onnx_int8_bytes'] / 1e3:.0f} kB INT8")
    print(f"QAT backward {t['qat_backward_ms']:.1f} ms vs EfQAT {t['efqat_backward_ms']:.1f} ms "
          f"({t['qat_backward_ms'] / t['efqat_backward_ms']:.2f}x); TensorRT: {m['tensorrt_engine']}")
    print(f"most sensitive layers: {', '.join(m['most_sensitive_layers'])}; total {t['demo_total_s']:.0f} s; "
          f"artifacts in {out_dir}/")
