"""Cost of qatgraph's sensitivity analysis, in forward passes over the analysed samples.

For each zoo network (tests/models.py ``ZOO``): compile with the tensorrt preset, calibrate, then
time (1) one forward pass of the quantized model over the samples, (2) ``sensitivity(mode="fast")``
and (3) ``sensitivity(mode="full")`` with the metric "top-1 agreement with the floating-point
model over the samples". Analysis times are printed in seconds and as multiples of (1), next to
the passes the algorithm needs: fast = 1 FP reference + 1 all-quantized + 2 per layer; full =
2 baselines + 1 per layer, + 1 FP pass inside the agreement metric for its reference predictions.

    python benchmarks/sensitivity_cost.py [--samples 256] [--batch-size 64] [--device cpu|cuda]

Inputs are random (standard normal) and BN statistics randomized, so the numbers measure cost,
not accuracy. Progress bars are off. Everything runs in one process, one model after another, on
one CPU thread by default (--threads) because multi-threaded timings on a shared machine swing
by several times; CPU-time ratios are printed next to the wall-time ones for the same reason.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import models  # tests/models.py, importable once tests/ is on the path

import qatgraph
from qatgraph.sensitivity_analysis import scores as sens


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, samples: int, batch_size: int, device: torch.device, repeats: int) -> dict[str, float | int | str]:
    factory, shape = models.ZOO[name]
    models.seed_everything(0)
    model = models.randomize_batchnorm(factory()).eval().to(device)
    inputs = torch.randn((samples, *shape[1:]), device=device)
    batches = list(inputs.split(batch_size))
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(batches[0][:2],))
    qatgraph.calibrate(qmodel, batches, show_progress=False)
    layers = len(qmodel.qatgraph_info.quantized_layers)

    def forward_pass() -> None:
        with torch.no_grad():
            for batch in batches:
                qmodel(batch)

    forward_pass()  # warm-up (allocator, kernels)
    # Passes timed before and after the analyses; their median is the reference, so slow drifts of
    # the machine's load affect the reference and the analyses alike.
    forward_times = [_timed(forward_pass, device) for _ in range(repeats)]
    fast = _timed(lambda: sens.sensitivity(qmodel, batches, num_samples=samples, show_progress=False), device)
    metric = sens.agreement_metric(batches, num_samples=samples)
    full = _timed(lambda: sens.sensitivity(qmodel, batches, metric, mode="full", num_samples=samples,
                                           show_progress=False), device)
    forward_times += [_timed(forward_pass, device) for _ in range(repeats)]
    forward_wall = statistics.median(t[0] for t in forward_times)
    forward_cpu = statistics.median(t[1] for t in forward_times)
    return {"model": name, "layers": layers, "forward_ms": 1000 * forward_wall, "fast_s": fast[0], "full_s": full[0],
            "fast_x": fast[0] / forward_wall, "full_x": full[0] / forward_wall,
            "fast_x_cpu": fast[1] / forward_cpu, "full_x_cpu": full[1] / forward_cpu,
            "fast_passes": 2 * layers + 2, "full_passes": layers + 3}


def _load() -> str:
    return "/".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes before and after (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: stable timings on a shared machine; 0: torch's default)")
    parser.add_argument("--models", nargs="*", default=list(models.ZOO), choices=list(models.ZOO))
    args = parser.parse_args()
    os.environ["QATGRAPH_NO_PROGRESS"] = "1"
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"sensitivity cost: {args.samples} samples in batches of {args.batch_size}, {device.type} ({where}), "
          f"torch {torch.__version__}, load average {_load()}")
    columns = [("model", "<12", "{}"), ("layers", ">6", "{}"), ("1 fwd ms", ">9", "{:.1f}"), ("fast s", ">8", "{:.2f}"),
               ("fast x", ">7", "{:.1f}"), ("fast xcpu", ">9", "{:.1f}"), ("needs", ">5", "{}"),
               ("full s", ">8", "{:.2f}"), ("full x", ">7", "{:.1f}"), ("full xcpu", ">9", "{:.1f}"), ("needs", ">5", "{}")]
    keys = ["model", "layers", "forward_ms", "fast_s", "fast_x", "fast_x_cpu", "fast_passes", "full_s", "full_x",
            "full_x_cpu", "full_passes"]
    header = " ".join(f"{title:{align}}" for title, align, _ in columns)
    print(header)
    print("-" * len(header))
    for name in args.models:
        row = measure(name, args.samples, args.batch_size, device, args.repeats)
        print(" ".join(f"{fmt.format(row[key]):{align}}" for key, (_, align, fmt) in zip(keys, columns)), flush=True)
    print(f"x = wall time / one forward pass over the samples (median of {2 * args.repeats}); xcpu = the same in CPU "
          "time of this process (less sensitive to other load on the machine); needs = forward passes the algorithm "
          f"performs. Load average at the end: {_load()}.")


if __name__ == "__main__":
    main()
