"""Speed of QAT itself: training-step time of FP32, qatgraph and torch.ao QAT models on CPU.

One training step = forward + cross-entropy + backward + SGD step (momentum 0.9), float32, the
model in train mode (BatchNorm on batch statistics, weight scales re-tracked every step). Variants:

* ``fp32``     the float model (the reference every ratio is taken against);
* ``qatgraph`` ``qatgraph.compile(model, "tensorrt")`` + ``qatgraph.calibrate`` on one batch;
* ``torch.ao`` torch.ao's deprecated FX QAT, ``prepare_qat_fx`` with the default "x86" QAT qconfig
  mapping: the baseline to beat (used here only, never inside the package);

each eager and under ``torch.compile`` (default Inductor; the optimizer step stays eager). Models:
``resnet18`` = ``tests/models.py`` ``resnet18_like(width=64)`` (ResNet-18 widths 64..512; the zoo's
stem has no stride and no max-pool, so 112 px here costs about what torchvision's ResNet-18 costs at
448 px) and ``mobilenetv2`` = ``mobilenetv2_like()``.

Measurement: every (variant, mode) first runs ``--warmup`` untimed steps (compilation happens there;
the first step's time is printed as "first step"), then ``--repeats`` rounds, each round timing one
sample of ``--steps`` steps of every variant, round-robin, starting from a different variant each
round. Interleaving spreads a shared machine's changing load over all variants alike. A row shows
the median, min and max of its samples; "x FP32" is the median over rounds of the ratio to the FP32
row of the same mode in the same round (eager vs eager, compiled vs compiled). A variant that fails
to build, compile or run is reported as "failed: <reason>" and the others go on.

    python benchmarks/qat_step.py [--quick] [--models resnet18,mobilenetv2] [--batch 16] [--size 112]
                                  [--repeats 5] [--warmup 2] [--steps 1] [--threads 2] [--profile 25]

``--profile N`` then profiles three eager steps of FP32 and of qatgraph per model (torch.profiler,
CPU) and prints the N operators with the most self-CPU time per step that qatgraph adds over FP32.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import models  # tests/models.py, importable once tests/ is on the path

import qatgraph

MODEL_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: models.resnet18_like(width=64),
    "mobilenetv2": models.mobilenetv2_like,
}
VARIANTS = ("fp32", "qatgraph", "torch.ao")
MODES = ("eager", "compiled")
QUICK = {"batch": 4, "size": 64, "repeats": 3, "warmup": 2}
FULL = {"batch": 16, "size": 112, "repeats": 5, "warmup": 2}


@dataclass
class Row:
    """One (variant, mode) of one model: its training step and the timings collected for it."""
    variant: str
    mode: str
    step: Callable[[], None] | None = None
    failure: str | None = None
    first_step_s: float = float("nan")
    samples_ms: list[float] = field(default_factory=list)  # per step, one value per round
    ratios: list[float] = field(default_factory=list)  # to FP32 of the same mode, same round


# ----------------------------------------------------------------------------- building the variants
def build_variant(variant: str, float_model: nn.Module, batch: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(float_model).train()
    if variant == "fp32":
        return model
    if variant == "qatgraph":
        qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(batch[:2],))
        qatgraph.calibrate(qmodel, [batch], show_progress=False)
        return qmodel.train()
    # torch.ao is deprecated and warns on import and use; it is the baseline, not the subject.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), example_inputs=(batch[:2],)).train()


def make_training_step(model: nn.Module, compiled: bool, inputs: torch.Tensor,
                       labels: torch.Tensor) -> Callable[[], None]:
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(inputs), labels)
        loss.backward()
        optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} (non-finite inputs make timings meaningless)")

    return step


def describe_failure(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return message if len(message) <= 110 else message[:107] + "..."


def prepare_rows(model_name: str, variants: list[str], modes: list[str], batch: int, size: int,
                 warmup: int) -> list[Row]:
    """Build every variant and run its warm-up (compilation included); failures become rows."""
    models.seed_everything(0)
    float_model = MODEL_FACTORIES[model_name]()
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, models.NUM_CLASSES, (batch,), generator=generator)
    rows = []
    for mode in modes:
        for variant in variants:
            row = Row(variant, mode)
            rows.append(row)
            try:
                row.step = make_training_step(build_variant(variant, float_model, inputs), mode == "compiled",
                                              inputs, labels)
                for index in range(warmup):
                    seconds = time_steps(row.step, 1)
                    if index == 0:
                        row.first_step_s = seconds
            except Exception as error:  # noqa: BLE001 - any failure is a result worth reporting
                row.step, row.failure = None, describe_failure(error)
            print(f"  {model_name:<12} {mode:<9} {variant:<9} ready"
                  + (f" (first step {row.first_step_s:.1f} s)" if row.failure is None else f": {row.failure}"),
                  flush=True)
    return rows


# ----------------------------------------------------------------------------- timing
def time_steps(step: Callable[[], None], steps: int) -> float:
    """Wall seconds for ``steps`` consecutive training steps."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def measure_round_robin(rows: list[Row], repeats: int, steps: int) -> None:
    live = [row for row in rows if row.step is not None]
    for round_index in range(repeats):
        shift = round_index % max(len(live), 1)
        this_round: dict[tuple[str, str], float] = {}
        for row in live[shift:] + live[:shift]:
            if row.step is None:  # failed earlier in this loop
                continue
            gc.collect()  # collect between samples, not inside one
            try:
                milliseconds = 1e3 * time_steps(row.step, steps) / steps
            except Exception as error:  # noqa: BLE001
                row.step, row.failure = None, describe_failure(error)
                continue
            row.samples_ms.append(milliseconds)
            this_round[(row.variant, row.mode)] = milliseconds
        for row in live:
            reference = this_round.get(("fp32", row.mode))
            if reference and (row.variant, row.mode) in this_round:
                row.ratios.append(this_round[(row.variant, row.mode)] / reference)
        print(f"  round {round_index + 1}/{repeats} done", flush=True)


# ----------------------------------------------------------------------------- reporting
def machine_description(threads: int) -> str:
    cpu_model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"machine: {cpu_model}, {os.cpu_count()} logical cores ({usable} usable), torch {torch.__version__}, "
            f"{threads} thread(s), Python {platform.python_version()}")


def load_average() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def print_table(model_name: str, rows: list[Row]) -> None:
    header = f"{'model':<12} {'mode':<9} {'variant':<9} {'ms/step':>9} {'min':>9} {'max':>9} {'x FP32':>7} " \
             f"{'first step':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if row.failure is not None and not row.samples_ms:
            print(f"{model_name:<12} {row.mode:<9} {row.variant:<9} failed: {row.failure}")
            continue
        median = statistics.median(row.samples_ms)
        ratio = f"{statistics.median(row.ratios):.2f}x" if row.ratios else "-"
        line = (f"{model_name:<12} {row.mode:<9} {row.variant:<9} {median:>9.1f} {min(row.samples_ms):>9.1f} "
                f"{max(row.samples_ms):>9.1f} {ratio:>7} {row.first_step_s:>9.1f}s")
        if row.failure is not None:
            line += f"  (then failed: {row.failure})"
        print(line)


# ----------------------------------------------------------------------------- profile
def profile_overhead(model_name: str, batch: int, size: int, top: int, steps: int = 3) -> None:
    """Self-CPU time per operator of eager qatgraph steps minus eager FP32 steps (``steps`` each,
    alternating, summed: a single step on a shared machine is too noisy to attribute)."""
    from torch.profiler import ProfilerActivity, profile

    rows = prepare_rows(model_name, ["fp32", "qatgraph"], ["eager"], batch, size, warmup=1)
    totals: dict[str, dict[str, list[float]]] = {row.variant: {} for row in rows}
    for row in rows:
        if row.step is None:
            print(f"profile of {model_name}: {row.variant} failed: {row.failure}")
            return
    for _ in range(steps):
        for row in rows:
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                row.step()
            for event in profiler.key_averages():
                total = totals[row.variant].setdefault(event.key, [0.0, 0])
                total[0] += event.self_cpu_time_total / 1e3 / steps
                total[1] += event.count // steps
    fp32, quantized = totals["fp32"], totals["qatgraph"]
    step_ms = {name: sum(ms for ms, _ in ops.values()) for name, ops in totals.items()}
    print(f"\nprofile, {model_name} eager, mean of {steps} steps: self-CPU per step FP32 {step_ms['fp32']:.0f} ms, "
          f"qatgraph {step_ms['qatgraph']:.0f} ms (profiler overhead included)")
    print(f"{'operator':<52} {'qatgraph ms':>11} {'calls':>6} {'FP32 ms':>9} {'extra ms':>9}")
    extra = {key: quantized[key][0] - fp32.get(key, [0.0, 0])[0] for key in quantized}
    for key in sorted(extra, key=extra.get, reverse=True)[:top]:
        print(f"{key[:52]:<52} {quantized[key][0]:>11.1f} {quantized[key][1]:>6} "
              f"{fp32.get(key, [0.0, 0])[0]:>9.1f} {extra[key]:>9.1f}")


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"short run: defaults become {QUICK}")
    parser.add_argument("--models", default="resnet18,mobilenetv2", help=f"comma list of {sorted(MODEL_FACTORIES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--batch", type=int, help=f"batch size (default {FULL['batch']})")
    parser.add_argument("--size", type=int, help=f"input height and width in pixels (default {FULL['size']})")
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL['repeats']})")
    parser.add_argument("--warmup", type=int, help=f"untimed steps per variant, >= 1 (default {FULL['warmup']})")
    parser.add_argument("--steps", type=int, default=1, help="training steps per timed sample (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile eager qatgraph vs FP32 and print the top N extra operators")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, allowed in (("models", MODEL_FACTORIES), ("variants", VARIANTS), ("modes", MODES)):
        chosen = [item.strip() for item in getattr(args, key).split(",") if item.strip()]
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            parser.error(f"--{key}: unknown {unknown or 'empty list'}; choose from {', '.join(allowed)}")
        setattr(args, key, chosen)
    if args.warmup < 1 or args.repeats < 1 or args.steps < 1:
        parser.error("--warmup, --repeats and --steps must be >= 1 (the first step compiles)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now().astimezone()
    load_before = load_average()
    tables = []
    for model_name in args.models:
        print(f"{model_name}: building and warming up {len(args.variants) * len(args.modes)} variants", flush=True)
        rows = prepare_rows(model_name, args.variants, args.modes, args.batch, args.size, args.warmup)
        measure_round_robin(rows, args.repeats, args.steps)
        tables.append((model_name, rows))
    print(f"\nQAT training-step time (forward + backward + SGD step), batch {args.batch}, 3x{args.size}x{args.size}, "
          f"float32, CPU; {args.repeats} interleaved rounds of {args.steps} step(s), {args.warmup} warm-up step(s)")
    print(machine_description(args.threads))
    print(f"date: {started.isoformat(timespec='seconds')}; load average (1/5/15 min) at start {load_before}, "
          f"at end {load_average()}")
    for model_name, rows in tables:
        print()
        print_table(model_name, rows)
    if args.profile:
        for model_name in args.models:
            profile_overhead(model_name, args.batch, args.size, args.profile)


if __name__ == "__main__":
    main()
