"""The mse calibrator's search (see qatgraph/quant/calibrators.py): error models and the range search.

An error model (:data:`ErrorOfRange`) maps candidate ranges ``(low, high)`` of shape (C, K) to the
squared error of quantizing with each, under the spec's qmin/qmax:

* :func:`_fake_quant_error`: exact, for weighted histogram bin centers (per tensor);
* :func:`_clip_and_noise_error`: for raw per-channel rows, exact for clipped values and values
  that round to 0, uniform rounding noise for the rest (a sort plus prefix sums).

:func:`_mse_symmetric` and :func:`_mse_asymmetric` minimize an error model with a coarse-then-fine
search over the fraction of the observed range kept (``MSE_GRID`` points per stage, never below
``MSE_LOWEST_FRACTION``). Internal to the calibrators (hence the leading underscores);
``qatgraph.quant.calibrators`` imports them and re-exports the constants and ``ErrorOfRange``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qatgraph.policy import QuantSpec

MSE_GRID = 33                 # points per stage of the coarse-then-fine mse search
MSE_LOWEST_FRACTION = 0.01    # mse never clips below 1% of the observed range


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
