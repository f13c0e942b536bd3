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

The histogram and KL numerics are in qatgraph/quant/histograms.py, the mse error models and search in
qatgraph/quant/mse_search.py; their constants (NUM_BINS, MSE_GRID, ...) are importable from here too.
"""
from __future__ import annotations

import abc
import logging
import math
from typing import ClassVar

import torch
from torch import Tensor

from qatgraph.errors import CalibrationError, PolicyError, did_you_mean
from qatgraph.policy import QuantSpec

from .histograms import NUM_BINS as NUM_BINS
from .histograms import (
    _Histogram,
    _histogram_quantile,
    _kl_threshold_bin,
    _rows_quantile,
)
from .mse_search import MSE_GRID as MSE_GRID
from .mse_search import MSE_LOWEST_FRACTION as MSE_LOWEST_FRACTION
from .mse_search import ErrorOfRange as ErrorOfRange
from .mse_search import (
    _clip_and_noise_error,
    _fake_quant_error,
    _mse_asymmetric,
    _mse_symmetric,
)

logger = logging.getLogger(__name__)


class Calibrator(abc.ABC):
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

    # ---------------------------------------------------- merging other processes' statistics
    # Two rounds, each one elementwise reduction across processes of float64 CPU vectors whose
    # length depends only on the spec and the channel count, so every process's vectors line up
    # (qatgraph/quant/calibration_merge.py concatenates them over all quantizers):
    # 1. extremes(): (minima, maxima), reduced by MIN and MAX, handed to agree_extremes(); a
    #    histogram re-bins itself onto the agreed range there;
    # 2. sums(): reduced by SUM, handed to take_sums() (batch counts, histogram counts).
    # Subclasses append their own entries after their base class's.
    def extremes(self, channels: int) -> tuple[Tensor, Tensor]:
        """(values merged by minimum, values merged by maximum); ``channels`` is 1 per tensor."""
        return _float64([]), _float64([])

    def agree_extremes(self, minima: Tensor, maxima: Tensor) -> None:
        """Take the minima and maxima over all processes (the layout of :meth:`extremes`)."""

    def sums(self) -> Tensor:
        """Values merged by summation, after :meth:`agree_extremes`."""
        return _float64([self._num_batches])

    def take_sums(self, sums: Tensor) -> None:
        """Take the sums over all processes (the layout of :meth:`sums`)."""
        self._num_batches = int(sums[0])

    @abc.abstractmethod
    def _reset_state(self) -> None:
        """Forget everything collected."""

    @abc.abstractmethod
    def _collect(self, values: Tensor) -> None:
        """Add one batch of finite values to the statistics."""

    @abc.abstractmethod
    def _compute_range(self) -> Tensor | tuple[Tensor, Tensor]:
        """amax (symmetric specs; also all-zero data) or (lo, hi), on any device."""


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

    def extremes(self, channels: int) -> tuple[Tensor, Tensor]:
        minima, maxima = super().extremes(channels)
        if self._min is None or self._max is None:  # no data here: the identities of min and max
            own_min, own_max = _float64([math.inf] * channels), _float64([-math.inf] * channels)
        else:  # float32 -> float64 is exact, so merging is exact
            own_min = self._min.reshape(-1).to("cpu", torch.float64)
            own_max = self._max.reshape(-1).to("cpu", torch.float64)
        return torch.cat([minima, own_min]), torch.cat([maxima, own_max])

    def agree_extremes(self, minima: Tensor, maxima: Tensor) -> None:
        # the base class contributes no extremes: all of them are this calibrator's
        if torch.isinf(minima).all():  # no process saw data
            return
        shape = () if self.axis is None else (minima.numel(),)
        self._min, self._max = minima.float().reshape(shape), maxima.float().reshape(shape)


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

    def extremes(self, channels: int) -> tuple[Tensor, Tensor]:
        if self.axis is not None:
            raise CalibrationError(f"per-channel {self.name} calibration keeps the raw rows and is not merged across "
                                   "processes; calibrate per tensor, or per channel with the max calibrator")
        minima, maxima = super().extremes(channels)
        return torch.cat([minima, _float64([self._histogram.lo])]), torch.cat([maxima, _float64([self._histogram.hi])])

    def agree_extremes(self, minima: Tensor, maxima: Tensor) -> None:
        super().agree_extremes(minima[:-1], maxima[:-1])
        self._histogram.agree_range(float(minima[-1]), float(maxima[-1]))

    def sums(self) -> Tensor:
        return torch.cat([super().sums(), self._histogram.sums()])

    def take_sums(self, sums: Tensor) -> None:
        own = self._histogram.num_bins + 1
        super().take_sums(sums[:-own])
        self._histogram.take_sums(sums[-own:])


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

    def extremes(self, channels: int) -> tuple[Tensor, Tensor]:
        minima, maxima = super().extremes(channels)
        return torch.cat([minima, _float64([self._min])]), torch.cat([maxima, _float64([self._max])])

    def agree_extremes(self, minima: Tensor, maxima: Tensor) -> None:
        super().agree_extremes(minima[:-1], maxima[:-1])
        self._min, self._max = float(minima[-1]), float(maxima[-1])

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


CALIBRATOR_TYPES: dict[str, type[Calibrator]] = {
    klass.name: klass for klass in (MaxCalibrator, PercentileCalibrator, EntropyCalibrator, MseCalibrator)}


def _float64(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64)


def make_calibrator(spec: QuantSpec, axis: int | None = None) -> Calibrator:
    """The calibrator named by ``spec.calibrator``; ``axis`` is the channel axis for per-channel specs."""
    klass = CALIBRATOR_TYPES.get(spec.calibrator)
    if klass is None:
        raise PolicyError(f"unknown calibrator {spec.calibrator!r}: valid calibrators are "
                          f"{', '.join(CALIBRATOR_TYPES)}{did_you_mean(str(spec.calibrator), CALIBRATOR_TYPES)}")
    return klass(spec, axis)
