"""CUDA timing for the GPU benchmarks: interleaved rounds timed with CUDA events, medians, ratios.

Each *variant* is a callable that prepares one sample (untimed work, e.g. a fresh forward pass)
and returns the callable to time (e.g. ``loss.backward``), like ``benchmarks/common.py``'s
preparers. A round runs every variant once, in an order rotated each round so drift on the
device hits all variants alike; each sample is bracketed by CUDA events on the current stream
(launch overhead included: a variant that starves the GPU shows it), and synchronized before the
next. Results are milliseconds per call; ratios are taken per round against a reference variant
and reported as the median of those ratios.
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Preparer = Callable[[], Callable[[], object]]


@dataclass
class Series:
    """Samples of one variant: milliseconds per call, and per-round ratios to the reference."""

    samples_ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    failure: str | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms) if self.samples_ms else float("nan")

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")

    @property
    def spread_percent(self) -> float:
        if len(self.samples_ms) < 4:
            return float("nan")
        low, _, high = statistics.quantiles(self.samples_ms, n=4)
        return 100.0 * (high - low) / self.median_ms


def describe_failure(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return message if len(message) <= 140 else message[:137] + "..."


def time_call(prepare: Preparer, calls: int = 1) -> float:
    """Milliseconds per call of ``calls`` consecutive prepared calls, CUDA events, after a sync."""
    timed = [prepare() for _ in range(calls)] if calls > 1 else [prepare()]
    if not torch.cuda.is_available():  # --smoke runs on the CPU: wall clock
        start_s = time.perf_counter()
        for function in timed:
            function()
        return 1e3 * (time.perf_counter() - start_s) / len(timed)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for function in timed:
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / len(timed)


def interleave(variants: Mapping[str, Preparer], *, rounds: int, warmup: int, reference: str | None,
               deadline: float | None = None, calls: int = 1) -> dict[str, Series]:
    """Time every variant ``rounds`` times, interleaved; a variant that raises is marked failed."""
    series = {name: Series() for name in variants}
    names = list(variants)
    for name in names:
        try:
            for _ in range(warmup):
                time_call(variants[name], calls)
        except Exception as error:  # noqa: BLE001 - a failing variant is a result to report
            series[name].failure = describe_failure(error)
            torch.cuda.empty_cache()
    live = [name for name in names if series[name].failure is None]
    for round_index in range(rounds):
        if deadline is not None and time.monotonic() > deadline and round_index >= 3:
            break
        order = live[round_index % len(live):] + live[:round_index % len(live)] if live else []
        this_round: dict[str, float] = {}
        for name in order:
            gc.collect()
            try:
                this_round[name] = time_call(variants[name], calls)
            except Exception as error:  # noqa: BLE001
                series[name].failure = describe_failure(error)
                live.remove(name)
                continue
            series[name].samples_ms.append(this_round[name])
        if reference is not None and reference in this_round:
            for name, milliseconds in this_round.items():
                series[name].ratios.append(milliseconds / this_round[reference])
    return series


def profile_top_kernels(prepare: Preparer, steps: int = 3, top: int = 12) -> tuple[str, float, float]:
    """(table of the ``top`` CUDA kernels by self device time per step, device ms per step, host
    ms per step) of ``steps`` prepared calls after one warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    prepare()()
    torch.cuda.synchronize()
    timed = [prepare() for _ in range(steps)]
    host_start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for function in timed:
            function()
        torch.cuda.synchronize()
    host_ms = 1e3 * (time.perf_counter() - host_start) / steps
    events = [e for e in profiler.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    device_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    lines = [f"{'kernel/op':<72} {'calls/step':>10} {'ms/step':>9}"]
    for event in events[:top]:
        lines.append(f"{event.key[:72]:<72} {event.count / steps:>10.1f} {event.self_device_time_total / 1e3 / steps:>9.2f}")
    return "\n".join(lines), device_ms, host_ms
