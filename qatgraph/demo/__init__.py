"""``qatgraph demo``: the whole product on real data, in about a minute on a 2-core CPU.

Train a 1-D CNN with a residual add in FP32 on MNIST-1D (generated locally by the ``mnist1d``
package; ``--data digits`` for scikit-learn's 8x8 digits and a small ResNet, ``--data cifar10``),
then for INT8 (W8A8, the ``tensorrt`` preset) and a low-bit format (W4A4 on every layer, the
network input kept at 8 bits): PTQ-calibrate, QAT-finetune with the recipe, EfQAT-finetune training
5% of the weight rows. MNIST-1D is hard enough that 4-bit PTQ loses accuracy and QAT wins it back.
Then run the sensitivity report; export the INT8 QAT model to ONNX Q/DQ, lint it,
evaluate it in ONNX Runtime with a parity check and time it against the FP32 ONNX; build a
TensorRT engine when TensorRT is present. Prints one table and writes every artifact
(``model_int8.onnx``, ``model_fp32.onnx``, ``sensitivity/``, ``summary.json``) to ``out_dir``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qatgraph.atomic_files import write_text
from qatgraph.progress import progress

from .data import DemoData, load_cifar10_data, load_digits_data, load_mnist1d_data
from .model import demo_model
from .steps import DemoResult, export_and_evaluate, measure_backward, print_table


@dataclass
class DemoSettings:
    fp32_epochs: int = 40
    qat_epochs: int = 4
    batch_size: int = 64
    base_lr: float = 0.1
    qat_lr: float = 0.05
    calibration_batches: int = 8
    sensitivity_samples: int = 256
    efqat_ratio: float = 0.05

    @classmethod
    def quick(cls) -> DemoSettings:
        """A smoke run for CI: its accuracies are those of an under-trained model and say nothing."""
        return cls(fp32_epochs=3, qat_epochs=1, calibration_batches=2, sensitivity_samples=64)


#: The low-bit rows, every layer quantized (``min_channels: 0``: the first conv and the head too):
#: W4A4 and W3A8. The preset's defaults do the rest: the network input stays at 8 bits
#: (``activation.input_bits``) and ``calibrator: auto`` picks MSE for the 4-bit activations
#: (BENCHMARKS.md "Low-bit recipes").
LOW_BIT_ROWS = {"w4a4": {"weight": {"bits": 4}, "activation": {"bits": 4}}, "w3a8": {"weight": {"bits": 3}}}


def low_bit_policy(label: str) -> dict[str, Any]:
    return {"preset": "tensorrt", "min_channels": 0, **LOW_BIT_ROWS[label]}


def accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in batches:
            correct += int((model(inputs).argmax(1) == targets).sum())
            total += len(targets)
    model.train(was_training)
    return correct / max(total, 1)


def train_fp32(model: nn.Module, data: DemoData, settings: DemoSettings) -> None:
    steps = settings.fp32_epochs * len(data.train_batches(settings.batch_size, 0))
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.base_lr, momentum=0.9, weight_decay=1e-4,
                                nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.base_lr, total_steps=steps)
    model.train()
    for epoch in progress(range(settings.fp32_epochs), total=settings.fp32_epochs, desc="FP32 training", unit="epoch"):
        for inputs, targets in data.train_batches(settings.batch_size, seed=epoch):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def quantize_and_finetune(fp_model: nn.Module, data: DemoData, settings: DemoSettings, policy: dict[str, Any],
                          label: str, result: DemoResult) -> dict[str, nn.Module]:
    """PTQ, QAT and EfQAT for one format; records accuracies under ``label``; returns the models."""
    import qatgraph

    example = data.train_x[:2]
    calibration = [x for x, _ in data.train_batches(settings.batch_size, seed=100)][:settings.calibration_batches]
    ptq = qatgraph.compile(fp_model, policy, example_inputs=(example,))
    qatgraph.calibrate(ptq, calibration)
    result.metrics[f"{label}_ptq_acc"] = accuracy(ptq, data.test_batches())

    models: dict[str, nn.Module] = {"ptq": ptq}
    for variant, extra in (("qat", {}), ("efqat", {"freeze": {"mode": "cwpn", "ratio": settings.efqat_ratio,
                                                              "interval": 4096}})):
        qmodel = qatgraph.compile(fp_model, {**policy, **extra}, example_inputs=(example,))
        qmodel.load_state_dict(ptq.state_dict())  # start both from the same calibrated PTQ model
        if "freeze" in extra:
            qmodel.qatgraph_freeze.refresh()
        started = time.perf_counter()
        qatgraph.finetune(qmodel, data.train_batches(settings.batch_size, seed=7), F.cross_entropy,
                          epochs=settings.qat_epochs, base_lr=settings.qat_lr)
        result.timings[f"{label}_{variant}_train_s"] = time.perf_counter() - started
        result.metrics[f"{label}_{variant}_acc"] = accuracy(qmodel, data.test_batches())
        models[variant] = qmodel
    return models


def _load(data: str, data_dir: str | None) -> DemoData:
    if data == "mnist1d":
        return load_mnist1d_data()
    if data == "digits":
        return load_digits_data()
    return load_cifar10_data(data_dir or "")


def run_demo(out_dir: str = "qatgraph-demo", data: str = "mnist1d", data_dir: str | None = None,
             quick: bool = False) -> DemoResult:
    import qatgraph

    torch.manual_seed(0)
    started = time.perf_counter()
    settings = DemoSettings.quick() if quick else DemoSettings()
    os.makedirs(out_dir, exist_ok=True)
    dataset = _load(data, data_dir)
    result = DemoResult()
    result.metrics["dataset"] = f"{dataset.name}: {len(dataset.train_x)} train / {len(dataset.test_x)} test"
    result.metrics["test_samples"] = len(dataset.test_x)
    result.metrics["quick"] = quick

    fp_model = demo_model(in_channels=dataset.input_shape[0], num_classes=dataset.num_classes,
                          input_rank=len(dataset.input_shape) + 1)
    train_fp32(fp_model, dataset, settings)
    result.metrics["fp32_acc"] = accuracy(fp_model, dataset.test_batches())

    int8 = quantize_and_finetune(fp_model, dataset, settings, {"preset": "tensorrt"}, "int8", result)
    for label in LOW_BIT_ROWS:
        quantize_and_finetune(fp_model, dataset, settings, low_bit_policy(label), label, result)
    for key in ("ptq", "qat", "efqat"):  # the headline keys are the INT8 ones
        result.metrics[f"{key}_acc"] = result.metrics[f"int8_{key}_acc"]

    sensitivity_samples = [x for x, _ in dataset.train_batches(settings.batch_size, seed=11)]
    report = qatgraph.sensitivity(int8["ptq"], sensitivity_samples, mode="fast",
                                  num_samples=settings.sensitivity_samples)
    report.save(os.path.join(out_dir, "sensitivity"))
    result.metrics["most_sensitive_layers"] = report.ranking[:3]

    batch = dataset.train_batches(settings.batch_size, seed=3)[0]
    result.timings.update(measure_backward(int8["qat"], int8["efqat"], batch))
    export_and_evaluate(fp_model, int8["qat"], dataset, out_dir, result)
    result.timings["demo_total_s"] = time.perf_counter() - started
    _write_json(os.path.join(out_dir, "summary.json"), {**result.metrics, **result.timings})
    print_table(result, out_dir)
    return result


def _write_json(path: str, payload: dict[str, Any]) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str), "demo summary")


__all__ = ["run_demo", "DemoSettings", "DemoResult", "accuracy", "low_bit_policy"]
