"""Histogram numerics of the percentile, entropy and mse calibrators (qatgraph/quant/calibrators.py).

* :class:`_Histogram`: counts over a range [lo, hi] that always contains 0, ``NUM_BINS`` equal
  bins. When a batch falls outside the range, the range grows to fit and the old counts are
  re-binned by interpolating their cumulative counts, so the counts match a histogram of all
  batches to within about a bin. Counts are float64 on the device of the first non-zero batch.
  Histograms of several processes merge in two steps: :meth:`_Histogram.agree_range` (each
  re-bins onto the union of the ranges, as a later batch beyond the range would make it do),
  then a bin-by-bin sum of :meth:`_Histogram.sums`.
* :func:`_histogram_quantile` / :func:`_rows_quantile`: quantiles of a histogram (linear within
  a bin) and of raw per-channel rows (linear between order statistics, torch.quantile's default).
* :func:`_kl_threshold_bin`: TensorRT's entropy (KL-divergence) threshold on a histogram of |x|,
  vectorized over all candidate thresholds.

Internal to the calibrators (hence the leading underscores); ``qatgraph.quant.calibrators`` imports
them and re-exports ``NUM_BINS``.
"""
from __future__ import annotations

import torch
from torch import Tensor

NUM_BINS = 2048


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

    def agree_range(self, lo: float, hi: float) -> None:
        """Re-bin onto ``[lo, hi]``, a superset of this range that every process agreed on (the
        minimum of the processes' ``lo`` and the maximum of their ``hi``), so that the counts of
        all processes can be summed bin by bin."""
        if lo == hi:  # every process saw only zeros: nothing to bin
            return
        if self.counts is None:  # only zeros here: they go to the bin of zero, as in add()
            self.lo, self.hi = lo, hi
            self.counts = torch.zeros(self.num_bins, dtype=torch.float64)
            self.counts[self._bin_of_zero()] += self.zero_mass
        elif lo < self.lo or hi > self.hi:
            self._regrow(lo, hi)

    def sums(self) -> Tensor:
        """``[zero_mass, *counts]`` (zeros for counts while there are none), float64 on the CPU."""
        counts = self.counts.cpu() if self.counts is not None else torch.zeros(self.num_bins, dtype=torch.float64)
        return torch.cat([torch.tensor([self.zero_mass], dtype=torch.float64), counts])

    def take_sums(self, sums: Tensor) -> None:
        """Take the bin-by-bin sums over all processes (after :meth:`agree_range`)."""
        self.zero_mass = float(sums[0])
        if self.counts is not None:
            self.counts = sums[1:].to(self.counts.device, torch.float64)

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
