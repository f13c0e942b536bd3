"""Shared timing helpers for qatgraph's benchmarks: interleaved repeated timing, medians, tables.

Why interleaved: on a shared machine the speed drifts over seconds to minutes (other jobs, turbo,
thermal state). Timing variant A for a minute and then variant B folds that drift into the A/B
ratio. :func:`time_interleaved` runs every variant once per round, in a fresh random order each
round, so drift hits all variants alike, and reports per-variant samples whose medians are
robust to the occasional stalled iteration.

Each variant is a *preparer*: a callable that does the untimed setup of one iteration (e.g. a
fresh forward pass) and returns the zero-argument callable to time (e.g. ``loss.backward``). Only
that callable is inside the timer.

Clocks: ``time.perf_counter`` (wall time, the default) or ``time.process_time`` (CPU time of
this process, all threads). On a machine shared with other jobs, wall time also counts the time
the OS gave the cores to someone else; single-threaded CPU time does not, so ``--threads 1`` with
the CPU clock is the contention-robust measurement (multi-threaded CPU time counts OpenMP
spin-waiting, so it is no better than wall time there).

Guarantees: CUDA work is synchronized before and after each timed call when a device is given;
garbage collection is paused inside the timed region (a collection there would be charged to
whichever variant happened to trigger it).
"""
from __future__ import annotations

import datetime
import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import torch

Preparer = Callable[[], Callable[[], object]]
Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def _synchronize(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(prepare: Preparer, device: torch.device | None = None, clock: Clock = time.perf_counter) -> float:
    """Seconds (of ``clock``) taken by the callable ``prepare()`` returns; the preparation is not timed."""
    timed = prepare()
    _synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = clock()
        timed()
        _synchronize(device)
        return clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()


def time_interleaved(variants: Mapping[str, Preparer], *, repeats: int, warmup: int = 1, seed: int = 0,
                     device: torch.device | None = None, clock: Clock = time.perf_counter,
                     on_round: Callable[[int, int], None] | None = None) -> dict[str, list[float]]:
    """Per-variant timings in seconds: ``warmup`` untimed rounds, then ``repeats`` timed rounds,
    each running every variant once in a freshly shuffled order. ``on_round(done, total)`` is
    called after each timed round (progress reporting)."""
    if repeats <= 0:
        raise ValueError(f"repeats={repeats}: need at least one timed round")
    names = list(variants)
    order_rng = random.Random(seed)
    for _ in range(warmup):
        for name in names:
            time_once(variants[name], device, clock)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order_rng.shuffle(names)
        gc.collect()
        for name in names:
            samples[name].append(time_once(variants[name], device, clock))
        if on_round is not None:
            on_round(round_index + 1, repeats)
    return samples


def median_ms(samples: Sequence[float]) -> float:
    return 1000.0 * statistics.median(samples)


def spread_percent(samples: Sequence[float]) -> float:
    """Interquartile range as a percentage of the median: how noisy a variant's timings were."""
    if len(samples) < 4:
        return float("nan")
    quartiles = statistics.quantiles(samples, n=4)
    return 100.0 * (quartiles[2] - quartiles[0]) / statistics.median(samples)


def environment(device: torch.device, precision: str) -> str:
    """One line naming where and how the numbers were taken."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    load = ""
    if hasattr(os, "getloadavg"):
        one, five, fifteen = os.getloadavg()
        load = f", load average {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"{stamp}; {where}{load}; {precision}; torch {torch.__version__}, Python {platform.python_version()}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain Markdown table (pastes into BENCHMARKS.md as is)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
