"""Low-bit recipes on MNIST-1D: before/after tables for each recipe choice, over 3 seeds.

The model and data are the demo's (qatgraph/demo: a 1-D CNN with a residual add, MNIST-1D 4000
train / 1000 test, so one test sample is 0.1 point). Per seed: train FP32 (40 epochs), then per
configuration PTQ-calibrate (8 batches), QAT-finetune (``qatgraph.finetune``, 4 epochs,
base_lr 0.05) and EfQAT-finetune (CWPN 5 %) from the same calibrated model. Seeds 0, 1, 2 fix the
FP32 initialization and every later step.

Rows:
* W8A8, the ``tensorrt`` preset (first conv and head float as tiny) — the INT8 baseline.
* W4A4 on every layer (``min_channels: 0``): network input at 4 bits with the percentile
  calibrator (before), input at 8 bits (an override on the first conv), then also ``mse`` for
  the 4-bit activations (after: the demo's low-bit row).
* W3A8 on every layer.
* EfQAT CWPN 5 % with ``freeze.importance`` ``raw`` (the paper's mean |w|) and ``layer_normalized``.

* ``--bn``: finetune's ``freeze_bn_fraction`` 0.5 / 0.0 / None at W4A4 and W3A8.
* ``--learnable``: W4A4 with learnable scales, finetune's quantizer learning rate 1e-5 (before)
  vs relative to each scale (after).

    python benchmarks/low_bit_recipes.py [--seeds 0 1 2] [--quick] [--learnable | --bn]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import qatgraph
from qatgraph.demo import DemoSettings, accuracy, train_fp32
from qatgraph.demo.data import load_mnist1d_data
from qatgraph.demo.model import demo_model

IN8 = [{"name": "conv1.0", "activation": {"bits": 8, "calibrator": "percentile"}}]
ALL = {"preset": "tensorrt", "min_channels": 0}
CONFIGS: dict[str, dict] = {
    "W8A8 preset": {"preset": "tensorrt"},
    # the "before" rows spell out the old defaults (no 8-bit input, percentile), which the presets no longer give
    "W4A4 all, input 4-bit, percentile": {**ALL, "weight": {"bits": 4},
                                          "activation": {"bits": 4, "calibrator": "percentile", "input_bits": None}},
    "W4A4 all, input 8-bit, percentile": {**ALL, "weight": {"bits": 4},
                                          "activation": {"bits": 4, "calibrator": "percentile"}, "overrides": IN8},
    "W4A4 all, input 8-bit, mse": {**ALL, "weight": {"bits": 4}, "activation": {"bits": 4, "calibrator": "mse"},
                                   "overrides": IN8},
    "W3A8 all": {**ALL, "weight": {"bits": 3}},
}
EFQAT_ON = ("W4A4 all, input 8-bit, mse", "W3A8 all")
_LEARNABLE = {**ALL, "weight": {"bits": 4, "learnable_scale": True},
              "activation": {"bits": 4, "calibrator": "mse", "learnable_scale": True}, "overrides": IN8}
#: --learnable: W4A4 with learnable scales, finetune's quantizer learning rate before/after.
LEARNABLE: dict[str, tuple[dict, dict]] = {
    "W4A4 all, learnable scales, quantizer_lr 1e-5 (before)": (_LEARNABLE, {"quantizer_lr": 1e-5}),
    "W4A4 all, learnable scales, relative 1e-2 x mean abs(scale) (after)": (_LEARNABLE, {}),
}


_W4A4 = {**ALL, "weight": {"bits": 4}, "activation": {"bits": 4, "calibrator": "mse"}, "overrides": IN8}
#: --bn: when finetune stops updating BatchNorm statistics (freeze_bn_fraction).
BN: dict[str, tuple[dict, dict]] = {
    f"{label}, freeze_bn_fraction {fraction}": (policy, {"freeze_bn_fraction": fraction})
    for label, policy in (("W4A4 all", _W4A4), ("W3A8 all", {**ALL, "weight": {"bits": 3}}))
    for fraction in (0.5, 0.0, None)
}


def run_seed(seed: int, settings: DemoSettings, learnable: bool = False, bn: bool = False) -> dict[str, float]:
    torch.manual_seed(seed)
    data = load_mnist1d_data()
    model = demo_model(1, 10, 3)
    train_fp32(model, data, settings)
    results = {"FP32": accuracy(model, data.test_batches())}
    example = data.train_x[:2]
    calibration = [x for x, _ in data.train_batches(settings.batch_size, seed=100)][:settings.calibration_batches]
    configs = LEARNABLE if learnable else BN if bn else {name: (policy, {}) for name, policy in CONFIGS.items()}
    for name, (policy, options) in configs.items():
        torch.manual_seed(seed)
        ptq = qatgraph.compile(model, policy, example_inputs=(example,))
        qatgraph.calibrate(ptq, calibration, show_progress=False)
        results[f"{name} | PTQ"] = accuracy(ptq, data.test_batches())
        variants = {"QAT": {}}
        if name in EFQAT_ON:
            for kind in ("raw", "layer_normalized"):
                variants[f"EfQAT CWPN 5% {kind}"] = {"freeze": {"mode": "cwpn", "ratio": 0.05, "importance": kind}}
        for variant, extra in variants.items():
            torch.manual_seed(seed)
            qmodel = qatgraph.compile(model, {**policy, **extra}, example_inputs=(example,))
            qmodel.load_state_dict(ptq.state_dict())
            if extra:
                qmodel.qatgraph_freeze.refresh()
                results[f"{name} | {variant} rows/layer"] = ", ".join(
                    f"{layer.name}: {layer.describe().split()[0]}" for layer in qmodel.qatgraph_freeze.layers)
            qatgraph.finetune(qmodel, data.train_batches(settings.batch_size, seed=7), F.cross_entropy,
                              epochs=settings.qat_epochs, base_lr=settings.qat_lr, show_progress=False, **options)
            results[f"{name} | {variant}"] = accuracy(qmodel, data.test_batches())
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="3 FP32 epochs, 1 QAT epoch (a smoke run)")
    parser.add_argument("--learnable", action="store_true", help="the learnable-scale rows (quantizer_lr)")
    parser.add_argument("--bn", action="store_true", help="the BatchNorm-freezing rows (freeze_bn_fraction)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = DemoSettings.quick() if args.quick else DemoSettings()
    started = time.perf_counter()
    runs = [run_seed(seed, settings, args.learnable, args.bn) for seed in args.seeds]
    print(f"MNIST-1D, 1000 test samples (1 sample = 0.1 point), seeds {args.seeds}, "
          f"{time.perf_counter() - started:.0f} s, torch threads 1")
    print("| configuration | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for key in runs[0]:
        values = [run[key] for run in runs]
        if isinstance(values[0], str):
            print(f"| {key} | " + " | ".join(values) + " | |")
        else:
            print(f"| {key} | " + " | ".join(f"{100 * v:.1f}" for v in values)
                  + f" | {100 * statistics.mean(values):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
