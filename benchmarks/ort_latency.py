"""ONNX Runtime CPU latency: FP32 ONNX vs qatgraph INT8 ONNX (both presets), measured side by side.

    python benchmarks/ort_latency.py                 # ResNet-18-like (widths 64..512), batch 8, 224 px
    python benchmarks/ort_latency.py --quick         # fewer rounds, 112 px

The INT8 models are PTQ-calibrated qatgraph exports of the same FP32 network: ``tensorrt`` (S8S8,
symmetric INT8 activations) and ``onnxruntime`` (U8S8, UINT8 asymmetric activations, the format
ONNX Runtime's x86 integer kernels are fastest with). Sessions use ORT's default (full) graph
optimizations and ``--threads`` intra-op threads; variants run interleaved, medians reported.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402  (tests/models.py: the test zoo)
from common import (  # noqa: E402
    environment,
    format_table,
    median_ms,
    spread_percent,
    time_interleaved,
)

import qatgraph  # noqa: E402
from qatgraph.backends.onnxruntime import OrtRunner  # noqa: E402


def export_fp32(model: torch.nn.Module, path: str, example: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def export_int8(model: torch.nn.Module, preset: str, path: str, example: torch.Tensor) -> None:
    qmodel = qatgraph.compile(model, preset, example_inputs=(example,))
    generator = torch.Generator().manual_seed(1)
    qatgraph.calibrate(qmodel, [torch.randn(*example.shape, generator=generator) for _ in range(4)],
                       show_progress=False)
    qatgraph.export_onnx(qmodel, path, (example,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.size, args.repeats = 112, 8
    torch.manual_seed(0)
    model = models.resnet18_like(width=64).eval()
    example = torch.randn(args.batch, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: os.path.join(folder, f"{name}.onnx") for name in ("fp32", "int8_tensorrt", "int8_onnxruntime")}
        export_fp32(model, paths["fp32"], example)
        export_int8(model, "tensorrt", paths["int8_tensorrt"], example)
        export_int8(model, "onnxruntime", paths["int8_onnxruntime"], example)
        runners = {name: OrtRunner(path, threads=args.threads) for name, path in paths.items()}
        feed = example.numpy()
        reference = runners["fp32"](feed)[0]
        variants = {name: (lambda runner=runner: lambda: runner(feed)) for name, runner in runners.items()}
        samples = time_interleaved(variants, repeats=args.repeats, warmup=2)
        sizes = {name: os.path.getsize(path) for name, path in paths.items()}
        rows = []
        for name in paths:
            agreement = float(np.mean(runners[name](feed)[0].argmax(1) == reference.argmax(1)))
            rows.append([name, f"{median_ms(samples[name]):.1f}", f"{spread_percent(samples[name]):.0f}%",
                         f"{median_ms(samples['fp32']) / median_ms(samples[name]):.2f}x",
                         f"{sizes[name] / 1e6:.1f}", f"{agreement:.0%}"])
    print(f"ONNX Runtime latency, ResNet-18-like (widths 64..512), batch {args.batch}, {args.size} px, "
          f"{args.threads} ORT threads, {args.repeats} interleaved rounds")
    print(environment(torch.device("cpu"), "FP32 vs INT8 Q/DQ ONNX"))
    print(format_table(["model", "median ms", "IQR", "speed-up vs FP32", "ONNX MB", "top-1 = FP32"], rows))


if __name__ == "__main__":
    main()
