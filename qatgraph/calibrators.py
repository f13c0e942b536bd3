"""Calibrators: turn statistics of the tensors seen during calibration into a quantization range.

Expects ``collect(x)`` once per batch with a detached, finite tensor (the quantizer rejects NaN/Inf
first), any float dtype, any device; per-channel calibrators get the channel ``axis``. Guarantees:
``compute_range()`` gives float32 CPU tensors ``(lo, hi)``, 0-d per tensor or ``(channels,)`` per
channel, with ``lo <= 0 <= hi`` (zero stays exact), ``(-amax, amax)`` for symmetric specs, never
NaN. All-zero data gives ``lo = hi = 0``; turning that into a usable scale is the caller's job.

* ``max``: running abs-max (symmetric) or running min/max (asymmetric).
* ``percentile``: the ``spec.percentile``-th percentile p of |x| (symmetric), or the ``100 - p``
  and ``p`` percentiles of x (asymmetric).
* ``entropy``: TensorRT's KL-divergence threshold t (pytorch-quantization's
  ``_compute_amax_entropy``), always on the histogram of |x|, per tensor only. Symmetric: ``(-t, t)``
  with ``2**(bits-1)`` quantized bins. Asymmetric: ``(max(min, -t), min(max, t))``, with
  ``2**bits`` quantized bins if no negative value was seen (all codes on one side, like
  pytorch-quantization's unsigned mode), else ``2**(bits-1)``.
* ``mse``: the range minimizing the squared error (clipping + rounding) under the spec's
  qmin/qmax: a coarse-then-fine search over amax, or for asymmetric specs over (lo, hi) pairs
  (shrink both ends together, then refine the low end, then the high end).

Per tensor, percentile/entropy/mse read a 2048-bin histogram of |x| over [0, max|x|] (symmetric,
and entropy) or of x over [min(x, 0), max(x, 0)]. When a batch falls outside the range, the range
grows to fit and the old counts are re-binned by interpolating their cumulative counts, so the
result matches a histogram of all batches to within about a bin. Per channel (weights: small,
usually one collect) percentile and mse keep the raw rows (channel axis first, rest flattened),
so memory grows with each collect: not meant for activations.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor

from .errors import CalibrationError, PolicyError, did_you_mean
from .policy import QuantSpec

logger = logging.getLogger(__name__)

NUM_BINS = 2048
MSE_GRID = 33                 # points per stage of the coarse-then-fine mse search
MSE_LOWEST_FRACTION = 0.01    # mse never clips below 1% of the observed range


class Calibrator:
    """Base class: ``collect`` statistics batch by batch, then ``compute_range``."""

    name: ClassVar[str] = ""

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        self.spec = spec
        self.axis: int | None = None
        if spec.per_channel:
            self.axis = axis if axis is not None else spec.axis
            if self.axis is None:
                raise CalibrationError(f"a per-channel {self.name} calibrator needs the channel axis: pass "
                                       "axis= to make_calibrator (0 for Conv/Linear weights)")
        self.reset()

    @property
    def num_batches(self) -> int:
        return self._num_batches

    def reset(self) -> None:
        self._num_batches = 0
        self._num_channels: int | None = None
        self._reset_state()

    def collect(self, x: Tensor) -> None:
        """Add one batch (detached, finite). Cheap: one device sync, no Python loops over data."""
        if x.numel() == 0:
            raise CalibrationError(f"{self.name} calibrator got an empty tensor of shape {tuple(x.shape)}; "
                                   "calibrate with batches that hold data")
        values = x.detach().float()
        if self.axis is not None:
            values = self._channel_rows(values)
        self._collect(values)
        self._num_batches += 1

    def compute_range(self) -> tuple[Tensor, Tensor]:
        """``(lo, hi)`` as float32 CPU tensors with ``lo <= 0 <= hi``; see the module docstring."""
        if self._num_batches == 0:
            raise CalibrationError(f"the {self.name} calibrator has seen no data: run calibration "
                                   "(collect() at least one batch) before computing the range")
        result = self._compute_range()
        lo, hi = (-result, result) if isinstance(result, Tensor) else result
        lo, hi = lo.detach().to("cpu", torch.float64), hi.detach().to("cpu", torch.float64)
        zero = torch.zeros_like(lo)
        # torch.where rather than clamp so that -0.0 becomes +0.0
        return torch.where(lo < 0, lo, zero).float(), torch.where(hi > 0, hi, zero).float()

    def _channel_rows(self, values: Tensor) -> Tensor:
        assert self.axis is not None
        if values.dim() == 0 or not -values.dim() <= self.axis < values.dim():
            raise CalibrationError(f"channel axis {self.axis} does not exist in a tensor of shape "
                                   f"{tuple(values.shape)}; check the spec's axis")
        rows = values.movedim(self.axis, 0).reshape(values.shape[self.axis], -1)
        if self._num_channels is None:
            self._num_channels = rows.shape[0]
        elif rows.shape[0] != self._num_channels:
            raise CalibrationError(f"{self.name} calibrator saw {self._num_channels} channels on axis "
                                   f"{self.axis} before and now {rows.shape[0]} (shape {tuple(values.shape)}); "
                                   "per-channel calibration needs the same channel count in every batch")
        return rows

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _collect(self, values: Tensor) -> None:
        raise NotImplementedError

    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        """amax (symmetric specs; also all-zero data) or (lo, hi), on any device."""
        raise NotImplementedError


class MaxCalibrator(Calibrator):
    """Running min/max; symmetric specs use ``amax = max(-min, max) = max|x|``."""

    name = "max"

    def _reset_state(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    def _collect(self, values: Tensor) -> None:
        batch_min, batch_max = torch.aminmax(values) if self.axis is None else torch.aminmax(values, dim=1)
        if self._min is None or self._max is None:
            self._min, self._max = batch_min, batch_max
        else:
            self._min = torch.minimum(self._min, batch_min.to(self._min.device))
            self._max = torch.maximum(self._max, batch_max.to(self._max.device))

    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        assert self._min is not None and self._max is not None
        if self.spec.symmetric:
            return torch.maximum(-self._min, self._max)
        return self._min, self._max


class _Histogram:
    """Counts over [lo, hi] (which always contains 0) in equal bins; the range grows on demand."""

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        self.num_bins = num_bins
        self.lo = self.hi = 0.0
        self.counts: Tensor | None = None  # None while every value seen was exactly 0
        self.zero_mass = 0.0               # how many values were seen while the range had zero width

    def add(self, values: Tensor, batch_min: float | None = None, batch_max: float | None = None) -> None:
        if batch_min is None or batch_max is None:
            batch_min, batch_max = (float(v) for v in torch.aminmax(values))
        lo, hi = min(self.lo, batch_min), max(self.hi, batch_max)
        if lo == hi:  # all zeros so far: a zero-width histogram cannot be binned
            self.zero_mass += values.numel()
            return
        if self.counts is None:
            self.lo, self.hi = lo, hi
            self.counts = torch.zeros(self.num_bins, dtype=torch.float64, device=values.device)
            self.counts[self._bin_of_zero()] += self.zero_mass
        elif lo < self.lo or hi > self.hi:
            self._regrow(lo, hi)
        batch = torch.histc(values.to(self.counts.device), bins=self.num_bins, min=self.lo, max=self.hi)
        self.counts += batch.double()

    def edges(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.linspace(self.lo, self.hi, self.num_bins + 1, dtype=torch.float64, device=device)

    def _bin_of_zero(self) -> int:
        return min(self.num_bins - 1, int(-self.lo / (self.hi - self.lo) * self.num_bins))

    def _regrow(self, lo: float, hi: float) -> None:
        """Re-bin the counts onto [lo, hi] (a superset) by interpolating the cumulative counts."""
        assert self.counts is not None
        old_edges = self.edges(self.counts.device)
        self.lo, self.hi = lo, hi
        new_edges = self.edges(self.counts.device)
        cumulative = torch.cat([self.counts.new_zeros(1), self.counts.cumsum(0)])
        left = torch.searchsorted(old_edges, new_edges, right=True).sub_(1).clamp_(0, self.num_bins - 1)
        fraction = ((new_edges - old_edges[left]) / (old_edges[1] - old_edges[0])).clamp_(0.0, 1.0)
        new_cumulative = cumulative[left] + fraction * (cumulative[left + 1] - cumulative[left])
        self.counts = new_cumulative.diff().clamp_(min=0.0)


class _HistogramCalibrator(Calibrator):
    """Per tensor: a histogram of |x| (symmetric) or x; per channel: the raw rows, on the CPU."""

    def _reset_state(self) -> None:
        self._histogram = _Histogram()
        self._rows: list[Tensor] = []

    def _collect(self, values: Tensor) -> None:
        if self.axis is not None:  # a copy: the rows may be a view of a weight that keeps training
            self._rows.append(values.to("cpu", copy=True))
        else:
            self._histogram.add(values.abs() if self.spec.symmetric else values)


class PercentileCalibrator(_HistogramCalibrator):
    name = "percentile"

    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        upper = float(self.spec.percentile) / 100.0
        if self.axis is not None:
            rows = torch.cat(self._rows, dim=1)
            if self.spec.symmetric:
                return _rows_quantile(rows.abs(), upper)
            return _rows_quantile(rows, 1.0 - upper), _rows_quantile(rows, upper)
        histogram = self._histogram
        if histogram.counts is None:
            return torch.zeros(())
        edges, counts = histogram.edges(), histogram.counts.cpu()
        if self.spec.symmetric:
            return _histogram_quantile(edges, counts, upper)
        return _histogram_quantile(edges, counts, 1.0 - upper), _histogram_quantile(edges, counts, upper)


class EntropyCalibrator(_HistogramCalibrator):
    name = "entropy"

    def __init__(self, spec: QuantSpec, axis: int | None = None) -> None:
        if spec.per_channel:
            raise CalibrationError("the entropy (KL) calibrator works on one histogram per tensor and cannot "
                                   "calibrate per channel; use granularity per_tensor or calibrator max/percentile/mse")
        super().__init__(spec, axis)

    def _reset_state(self) -> None:
        super()._reset_state()
        self._min = self._max = 0.0

    def _collect(self, values: Tensor) -> None:
        batch_min, batch_max = (float(v) for v in torch.aminmax(values))
        self._min, self._max = min(self._min, batch_min), max(self._max, batch_max)
        # |x| lies in [0, max(-min, max)]: pass it so the histogram needs no second device sync
        self._histogram.add(values.abs(), 0.0, max(-batch_min, batch_max))

    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        histogram = self._histogram
        if histogram.counts is None:
            return torch.zeros(())
        unsigned = not self.spec.symmetric and self._min >= 0.0
        num_quant_bins = 2 ** (self.spec.bits if unsigned else self.spec.bits - 1)
        threshold_bin = _kl_threshold_bin(histogram.counts.cpu(), num_quant_bins)
        amax = histogram.edges()[threshold_bin]
        logger.debug("entropy threshold bin %d of %d: amax %.6g (max %.6g)", threshold_bin,
                     histogram.num_bins, float(amax), histogram.hi)
        if self.spec.symmetric:
            return amax
        return torch.tensor(max(self._min, -float(amax))), torch.tensor(min(self._max, float(amax)))


class MseCalibrator(_HistogramCalibrator):
    name = "mse"

    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        if self.axis is not None:
            rows = torch.cat(self._rows, dim=1)
            lo, hi = rows.amin(dim=1).double().clamp(max=0.0), rows.amax(dim=1).double().clamp(min=0.0)
            error = _clip_and_noise_error(rows, self.spec)
        else:
            histogram = self._histogram
            if histogram.counts is None:
                return torch.zeros(())
            edges = histogram.edges()
            centers = (edges[1:] + edges[:-1]) / 2
            lo, hi = torch.tensor([histogram.lo, histogram.hi], dtype=torch.float64).split(1)
            error = _fake_quant_error(centers[None], histogram.counts.cpu()[None], self.spec)
        if self.spec.symmetric:
            amax = _mse_symmetric(error, torch.maximum(-lo, hi))
            return amax if self.axis is not None else amax[0]
        lo, hi = _mse_asymmetric(error, lo, hi)
        return (lo, hi) if self.axis is not None else (lo[0], hi[0])


# --------------------------------------------------------------------------- numerics
def _histogram_quantile(edges: Tensor, counts: Tensor, q: float) -> Tensor:
    """The value below which a fraction ``q`` of the histogram's mass lies (linear within a bin)."""
    cumulative = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    cumulative = cumulative / cumulative[-1]
    q = min(max(q, 0.0), 1.0)
    k = int(torch.searchsorted(cumulative, torch.tensor([q], dtype=cumulative.dtype)))  # first cdf >= q
    if k == 0:
        return edges[0]
    fraction = (q - cumulative[k - 1]) / (cumulative[k] - cumulative[k - 1])
    return edges[k - 1] + fraction * (edges[k] - edges[k - 1])


def _rows_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation (torch.quantile's default), any row length."""
    ordered = rows.sort(dim=1).values
    position = min(max(q, 0.0), 1.0) * (rows.shape[1] - 1)
    below = int(position)
    above = min(below + 1, rows.shape[1] - 1)
    return torch.lerp(ordered[:, below], ordered[:, above], position - below)


def _kl_threshold_bin(counts: Tensor, num_quant_bins: int) -> int:
    """TensorRT's entropy calibration: the bin count i minimizing KL(P_i || Q_i); amax = edges[i].

    P_i is counts[:i] with the clipped mass (counts[i:]) added to its last bin; Q_i merges
    counts[:i] into ``num_quant_bins`` bins (bin b holds j with j * num_quant_bins // i == b) and
    spreads each merged count evenly over its non-empty bins (empty bins stay empty). Rather than
    building P and Q for each i, KL is expanded into per-merged-bin sums read off prefix sums,
    so all candidates cost O(candidates x num_quant_bins), vectorized."""
    counts = counts.clone()
    # As pytorch-quantization: a spike of exact zeros (ReLU outputs) would dominate every candidate.
    counts[0] = counts[1]
    # Re-binning leaves rounding dust in empty bins; it must not count as data (non-empty bins).
    counts = torch.where(counts > counts.sum() * 1e-12, counts, 0.0)
    total = counts.sum()
    zero = counts.new_zeros(1)
    cumulative = torch.cat([zero, counts.cumsum(0)])                      # cumulative[i] = counts[:i].sum()
    occupied = torch.cat([zero, (counts > 0).to(counts.dtype).cumsum(0)])
    count_log_count = torch.cat([zero, torch.xlogy(counts, counts).cumsum(0)])
    thresholds = torch.arange(min(num_quant_bins, counts.numel()), counts.numel() + 1)
    beyond = total - cumulative[thresholds]
    last = counts[thresholds - 1] + beyond
    # T * sum_j P_j log P_j, with P_j = c_j / T
    p_log_p = count_log_count[thresholds - 1] + torch.xlogy(last, last) - total * total.log()
    merged_bin = torch.arange(num_quant_bins + 1)
    bounds = (merged_bin[None, :] * thresholds[:, None] + num_quant_bins - 1) // num_quant_bins  # ceil
    mass = cumulative[bounds[:, 1:]] - cumulative[bounds[:, :-1]]
    used = occupied[bounds[:, 1:]] - occupied[bounds[:, :-1]]
    density = mass / used.clamp(min=1.0)
    p_mass = mass.clone()
    p_mass[:, -1] += beyond
    # T * sum_j P_j log Q_j, with Q_j = density_b(j) / counts[:i].sum() on non-empty bins
    p_log_q = torch.xlogy(p_mass, density).sum(dim=1) - total * cumulative[thresholds].log()
    divergences = (p_log_p - p_log_q) / total
    # the clipped mass lands on an empty bin, where Q is 0: KL is infinite
    impossible = ((counts[thresholds - 1] == 0) & (beyond > 0)) | (cumulative[thresholds] <= 0)
    divergences = torch.where(impossible, float("inf"), divergences)
    divergences = torch.nan_to_num(divergences, nan=float("inf"), posinf=float("inf"))
    last_minimum = divergences.numel() - 1 - int(divergences.flip(0).argmin())  # ties: least clipping
    return int(thresholds[last_minimum])


ErrorOfRange = Callable[[Tensor, Tensor], Tensor]  # (low, high) of shape (C, K) -> error (C, K)


def _scale_zero_point(low: Tensor, high: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """How a range becomes scale and zero-point: amax / qmax for symmetric specs (zero-point 0),
    (high - low) / (qmax - qmin) with a rounded, clamped zero-point otherwise."""
    if spec.symmetric:
        scale = high / spec.qmax
        return scale, torch.zeros_like(scale)
    scale = (high - low) / (spec.qmax - spec.qmin)
    zero_point = torch.round(spec.qmin - low / torch.where(scale > 0, scale, 1.0)).clamp(spec.qmin, spec.qmax)
    return scale, zero_point


def _fake_quant_error(values: Tensor, weights: Tensor, spec: QuantSpec) -> ErrorOfRange:
    """Weighted squared error of fake-quantizing ``values`` (C, m) (histogram bin centers, weighted
    by their counts) exactly, with the spec's qmin/qmax. A zero scale quantizes everything to 0."""
    def error(low: Tensor, high: Tensor) -> Tensor:
        scale, zero_point = (t[:, :, None] for t in _scale_zero_point(low, high, spec))
        codes = torch.round(values[:, None, :] / torch.where(scale > 0, scale, 1.0)) + zero_point
        dequantized = (codes.clamp(spec.qmin, spec.qmax) - zero_point) * scale
        return ((dequantized - values[:, None, :]) ** 2 * weights[:, None, :]).sum(dim=2)

    return error


def _clip_and_noise_error(rows: Tensor, spec: QuantSpec) -> ErrorOfRange:
    """Squared error for raw rows (C, n), from the sorted values and prefix sums: exact for
    clipped values and for values that round to 0 (|v| <= scale / 2, error v**2); the others
    are modeled as uniform rounding noise, scale**2 / 12 each. Evaluating every value at every
    candidate costs (C x n x K), minutes on big weights; this costs a sort plus (C x K x log n)."""
    ordered = rows.sort(dim=1).values.double()  # sorting float32 is twice as fast
    zero_column = ordered.new_zeros(ordered.shape[0], 1)
    sums = torch.cat([zero_column, ordered.cumsum(dim=1)], dim=1)          # sums[:, k] = sum of the k smallest
    squares = torch.cat([zero_column, (ordered ** 2).cumsum(dim=1)], dim=1)
    count = ordered.shape[1]

    def error(low: Tensor, high: Tensor) -> Tensor:
        scale, zero_point = _scale_zero_point(low, high, spec)
        # clip at what the codes represent, e.g. [-128, 127] * scale for signed INT8
        low, high = (spec.qmin - zero_point) * scale, (spec.qmax - zero_point) * scale
        below = torch.searchsorted(ordered, low.contiguous())               # values < low
        kept = torch.searchsorted(ordered, high.contiguous(), right=True)   # values <= high
        low_error = below * low ** 2 - 2 * low * sums.gather(1, below) + squares.gather(1, below)
        high_error = ((squares[:, -1:] - squares.gather(1, kept)) - 2 * high * (sums[:, -1:] - sums.gather(1, kept))
                      + (count - kept) * high ** 2)
        dead_start = torch.maximum(torch.searchsorted(ordered, (-scale / 2).contiguous()), below)
        dead_end = torch.minimum(torch.searchsorted(ordered, (scale / 2).contiguous(), right=True), kept)
        dead_error = squares.gather(1, dead_end) - squares.gather(1, dead_start)
        noise = (kept - below - (dead_end - dead_start)) * scale ** 2 / 12
        return low_error.clamp(min=0.0) + high_error.clamp(min=0.0) + dead_error + noise

    return error


def _search_fraction(error_of: Callable[[Tensor], Tensor], channels: int) -> Tensor:
    """Per channel, the fraction f in [MSE_LOWEST_FRACTION, 1] minimizing ``error_of(f)`` ((C, K) ->
    (C, K)): a coarse grid, then a fine grid spanning one coarse step either side of its best."""
    coarse = torch.linspace(MSE_LOWEST_FRACTION, 1.0, MSE_GRID, dtype=torch.float64).expand(channels, MSE_GRID)
    best = coarse.gather(1, error_of(coarse).argmin(dim=1, keepdim=True))
    spacing = (1.0 - MSE_LOWEST_FRACTION) / (MSE_GRID - 1)
    offsets = torch.linspace(-spacing, spacing, MSE_GRID, dtype=torch.float64)
    fine = (best + offsets).clamp(MSE_LOWEST_FRACTION, 1.0)
    return fine.gather(1, error_of(fine).argmin(dim=1, keepdim=True))[:, 0]


def _mse_symmetric(error: ErrorOfRange, amax: Tensor) -> Tensor:
    """amax (C,) minimizing ``error(-amax, amax)``."""
    return amax * _search_fraction(lambda f: error(-amax[:, None] * f, amax[:, None] * f), amax.numel())


def _mse_asymmetric(error: ErrorOfRange, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """(lo, hi) (C,) minimizing ``error``: shrink both ends by one factor, then refine the low end
    with the high end fixed, then the high end with the low end fixed."""
    channels = lo.numel()
    both = _search_fraction(lambda f: error(lo[:, None] * f, hi[:, None] * f), channels)
    best_hi = hi * both
    best_lo = lo * _search_fraction(lambda f: error(lo[:, None] * f, best_hi[:, None].expand_as(f)), channels)
    best_hi = hi * _search_fraction(lambda f: error(best_lo[:, None].expand_as(f), hi[:, None] * f), channels)
    return best_lo, best_hi


CALIBRATOR_TYPES: dict[str, type[Calibrator]] = {
    klass.name: klass for klass in (MaxCalibrator, PercentileCalibrator, EntropyCalibrator, MseCalibrator)}


def make_calibrator(spec: QuantSpec, axis: int | None = None) -> Calibrator:
    """The calibrator named by ``spec.calibrator``; ``axis`` is the channel axis for per-channel specs."""
    klass = CALIBRATOR_TYPES.get(spec.calibrator)
    if klass is None:
        raise PolicyError(f"unknown calibrator {spec.calibrator!r}: valid calibrators are "
                          f"{', '.join(CALIBRATOR_TYPES)}{did_you_mean(str(spec.calibrator), CALIBRATOR_TYPES)}")
    return klass(spec, axis)
