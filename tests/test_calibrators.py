"""Tests for qatgraph/quant/calibrators.py: closed-form ranges, histogram growth, TensorRT's KL method
against a direct port of pytorch-quantization's loop, mse against max calibration's error,
per-channel behaviour, degenerate inputs and errors. CPU, a few seconds; one GPU test."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qatgraph.errors import CalibrationError, PolicyError
from qatgraph.policy import QuantSpec
from qatgraph.quant.calibrators import (
    CALIBRATOR_TYPES,
    NUM_BINS,
    Calibrator,
    MaxCalibrator,
    _Histogram,
    _kl_threshold_bin,
    make_calibrator,
)


def calibrate(x, axis=None, **spec_fields):
    spec = QuantSpec(**spec_fields)
    calibrator = make_calibrator(spec, axis=axis)
    for batch in x if isinstance(x, (list, tuple)) else [x]:
        calibrator.collect(batch)
    return calibrator.compute_range()


def symmetric_error(x, amax, bits=8):
    """Squared error of symmetric fake quantization, scale = amax / qmax, codes [-qmax-1, qmax].
    A 1-d ``amax`` gives one error per candidate."""
    qmax = 2 ** (bits - 1) - 1
    scale = torch.as_tensor(amax, dtype=torch.float64)[..., None] / qmax
    x = x.double()
    errors = ((torch.clamp(torch.round(x / scale), -qmax - 1, qmax) * scale - x) ** 2).sum(dim=-1)
    return errors if errors.dim() else float(errors)


def asymmetric_error(x, lo, hi, bits=8):
    qmax = 2**bits - 1
    scale = (hi - lo) / qmax
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    codes = torch.clamp(torch.round(x / scale) + zero_point, 0, qmax)
    return float((((codes - zero_point) * scale - x) ** 2).sum())


# --------------------------------------------------------------------------- max
def test_max_per_tensor_symmetric_and_asymmetric():
    x = torch.tensor([[-3.0, 1.0], [2.0, 0.5]])
    lo, hi = calibrate(x, calibrator="max")
    assert lo.shape == () and hi.dtype == torch.float32 and lo.device.type == "cpu"
    assert (float(lo), float(hi)) == (-3.0, 3.0)
    lo, hi = calibrate(x, calibrator="max", symmetric=False)
    assert (float(lo), float(hi)) == (-3.0, 2.0)
    # positive-only data: the range is widened to contain 0 so that zero is exact
    lo, hi = calibrate([torch.tensor([1.0, 4.0]), torch.tensor([2.0, 5.0])], calibrator="max", symmetric=False)
    assert (float(lo), float(hi)) == (0.0, 5.0)


def test_max_per_channel_running_over_batches_and_axis():
    weight = torch.tensor([[[1.0, -2.0]], [[0.5, 0.25]], [[-4.0, 3.0]]])  # 3 output channels on axis 0
    lo, hi = calibrate(weight, axis=0, calibrator="max", granularity="per_channel")
    assert hi.tolist() == [2.0, 0.5, 4.0] and lo.tolist() == [-2.0, -0.5, -4.0]
    lo, hi = calibrate(weight, axis=0, calibrator="max", granularity="per_channel", symmetric=False)
    assert lo.tolist() == [-2.0, 0.0, -4.0] and hi.tolist() == [1.0, 0.5, 3.0]
    # axis 2 (2 channels), running over two batches
    second = torch.full((3, 1, 2), 0.0)
    second[0, 0, 1] = -7.0
    lo, hi = calibrate([weight, second], axis=2, calibrator="max", granularity="per_channel")
    assert hi.tolist() == [4.0, 7.0]


def test_num_batches_and_reset():
    calibrator = make_calibrator(QuantSpec(calibrator="percentile"))
    assert calibrator.num_batches == 0
    calibrator.collect(torch.ones(4))
    calibrator.collect(torch.ones(4) * 2)
    assert calibrator.num_batches == 2
    calibrator.reset()
    assert calibrator.num_batches == 0
    with pytest.raises(CalibrationError, match="seen no data"):
        calibrator.compute_range()
    calibrator.collect(torch.full((10,), 0.5))
    assert float(calibrator.compute_range()[1]) == pytest.approx(0.5, abs=1e-3)


# --------------------------------------------------------------------------- percentile
def test_percentile_of_uniform():
    x = torch.rand(200_000) * 2 - 1
    lo, hi = calibrate(x, calibrator="percentile", percentile=99.0)
    assert float(hi) == pytest.approx(0.99, abs=2 * 1.0 / NUM_BINS + 2e-3)
    assert float(lo) == -float(hi)
    lo, hi = calibrate(x, calibrator="percentile", percentile=99.0, symmetric=False)
    assert float(lo) == pytest.approx(-0.98, abs=5e-3) and float(hi) == pytest.approx(0.98, abs=5e-3)


def test_percentile_with_growing_range_matches_concatenation():
    batches = [torch.randn(50_000) * 0.3, torch.rand(50_000) * 2 - 1, torch.randn(50_000) * 2.0,
               torch.randn(50_000) * 0.1]
    everything = torch.cat(batches)
    bin_width = float(everything.abs().max()) / NUM_BINS
    for percentile in (50.0, 90.0, 99.0, 99.9):
        _, hi = calibrate(batches, calibrator="percentile", percentile=percentile)
        expected = float(torch.quantile(everything.abs(), percentile / 100))
        assert float(hi) == pytest.approx(expected, abs=3 * bin_width), percentile
    lo, hi = calibrate(batches, calibrator="percentile", percentile=99.0, symmetric=False)
    assert float(lo) == pytest.approx(float(torch.quantile(everything, 0.01)), abs=3 * 2 * bin_width)
    assert float(hi) == pytest.approx(float(torch.quantile(everything, 0.99)), abs=3 * 2 * bin_width)


def test_histogram_regrow_keeps_mass_and_shape():
    histogram = _Histogram()
    batches = [torch.rand(10_000), torch.rand(10_000) * 4, -torch.rand(10_000) * 2]
    for batch in batches:
        histogram.add(batch)
    everything = torch.cat(batches)
    assert float(histogram.counts.sum()) == pytest.approx(everything.numel())
    assert (histogram.lo, histogram.hi) == (float(everything.min()), float(everything.max()))
    direct = torch.histc(everything, NUM_BINS, histogram.lo, histogram.hi).double()
    cdf_grown = histogram.counts.cumsum(0) / everything.numel()
    cdf_direct = direct.cumsum(0) / everything.numel()
    assert float((cdf_grown - cdf_direct).abs().max()) < 2e-3  # a couple of bins' mass


# --------------------------------------------------------------------------- entropy
def kl_reference(hist: np.ndarray, num_quant_bins: int) -> int:
    """Direct port of pytorch-quantization's _compute_amax_entropy (stride 1): the threshold bin."""
    bins = hist.astype(np.float64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(num_quant_bins, len(bins) + 1):
        digitized = np.digitize(np.arange(i), np.linspace(0, i, num=num_quant_bins + 1)) - 1
        digitized[bins[:i] == 0] = -1
        density = np.zeros(num_quant_bins)
        for b in range(num_quant_bins):
            members = digitized == b
            if members.any():
                density[b] = bins[:i][members].sum() / members.sum()
        q = np.where(digitized != -1, density[np.clip(digitized, 0, None)], 0.0)
        p = bins[:i].copy()
        p[-1] += bins[i:].sum()
        p, q = p / p.sum(), q / max(q.sum(), 1e-300)
        if np.any((p > 0) & (q == 0)):
            divergences.append(np.inf)
        else:
            divergences.append(float(np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0]))))
    divergences = np.array(divergences)
    return num_quant_bins + len(divergences) - 1 - int(np.argmin(divergences[::-1]))


@pytest.mark.parametrize("case", ["gaussian", "laplace_outliers", "uniform", "sparse"])
def test_entropy_matches_reference_implementation(case):
    generator = torch.Generator().manual_seed(1)
    if case == "gaussian":
        data, num_bins, num_quant_bins = torch.randn(20_000, generator=generator).abs(), 256, 16
    elif case == "laplace_outliers":
        data = torch.distributions.Laplace(0.0, 1.0).sample((50_000,)).abs()
        data, num_bins, num_quant_bins = torch.cat([data, torch.tensor([40.0, 60.0])]), 300, 32
    elif case == "uniform":
        data, num_bins, num_quant_bins = torch.rand(5_000, generator=generator), 128, 8
    else:  # few values: many empty bins, so many thresholds have infinite divergence
        data, num_bins, num_quant_bins = torch.rand(300, generator=generator) ** 3, 200, 16
    counts = torch.histc(data, num_bins, 0, float(data.max())).double()
    assert _kl_threshold_bin(counts, num_quant_bins) == kl_reference(counts.numpy(), num_quant_bins)


def test_entropy_keeps_uniform_range_and_clips_heavy_tails():
    uniform = torch.rand(500_000) * 2 - 1
    _, hi = calibrate(uniform, calibrator="entropy")
    assert float(hi) >= 0.9 * float(uniform.abs().max())
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    heavy = torch.cat([laplace, torch.tensor([50.0, -45.0, 40.0])])
    _, hi = calibrate(heavy, calibrator="entropy")
    assert 2.0 < float(hi) < 0.5 * 50.0


def test_entropy_asymmetric():
    relu_like = torch.randn(200_000).clamp(min=0.0)
    lo, hi = calibrate(relu_like, calibrator="entropy", symmetric=False)
    assert float(lo) == 0.0 and 0.5 * float(relu_like.max()) <= float(hi) <= float(relu_like.max())
    skewed = torch.cat([torch.randn(200_000) - 0.5, torch.tensor([-60.0, 40.0])])
    lo, hi = calibrate(skewed, calibrator="entropy", symmetric=False)
    assert -60.0 < float(lo) < 0.0 < float(hi) < 40.0


# --------------------------------------------------------------------------- mse
def test_mse_uniform_stays_near_max():
    uniform = torch.rand(200_000) * 2 - 1
    _, hi = calibrate(uniform, calibrator="mse")
    assert float(hi) >= 0.97 * float(uniform.abs().max())


def test_mse_clips_gaussian_outliers_with_lower_error_than_max():
    x = torch.cat([torch.randn(1_000_000), torch.tensor([40.0, -38.0, 39.0, 40.0, -40.0] * 2)])
    _, mse_amax = calibrate(x, calibrator="mse")
    _, max_amax = calibrate(x, calibrator="max")
    assert float(mse_amax) < 0.8 * float(max_amax)
    assert symmetric_error(x, mse_amax) < 0.8 * symmetric_error(x, max_amax)


def test_mse_asymmetric_beats_min_max():
    x = torch.cat([torch.distributions.Exponential(1.0).sample((500_000,)) - 0.3, torch.tensor([-5.0, 60.0])])
    lo, hi = calibrate(x, calibrator="mse", symmetric=False)
    assert float(x.min()) <= float(lo) < 0.0 < float(hi) < 0.8 * float(x.max())
    assert asymmetric_error(x, lo, hi) < 0.8 * asymmetric_error(x, x.min(), x.max())


def test_mse_low_bits_uses_the_spec_qmax():
    x = torch.randn(300_000)
    _, amax8 = calibrate(x, calibrator="mse", bits=8)
    _, amax4 = calibrate(x, calibrator="mse", bits=4)
    assert float(amax4) < 0.75 * float(amax8)  # coarser codes: clipping pays off earlier
    assert symmetric_error(x, amax4, bits=4) < symmetric_error(x, amax8, bits=4)


# --------------------------------------------------------------------------- per channel
def outlier_weight(rows=6, row_length=4096):
    """Gaussian rows; row 3 is an outlier channel (50x larger), row 1 holds one outlier value."""
    weight = torch.randn(rows, row_length)
    weight[3] *= 50.0
    weight[1, 17] = 100.0
    return weight


def test_per_channel_percentile_is_exact_per_row():
    weight = outlier_weight()
    lo, hi = calibrate(weight, axis=0, calibrator="percentile", granularity="per_channel", percentile=99.0)
    expected = torch.quantile(weight.abs(), 0.99, dim=1)
    torch.testing.assert_close(hi, expected, rtol=1e-5, atol=1e-6)
    assert float(hi[1]) < 5.0 and 100.0 < float(hi[3]) < 200.0 and torch.equal(lo, -hi)
    lo, hi = calibrate(weight, axis=0, calibrator="percentile", granularity="per_channel", percentile=99.0,
                       symmetric=False)
    torch.testing.assert_close(lo, torch.quantile(weight, 0.01, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hi, torch.quantile(weight, 0.99, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_mse_is_near_the_exact_optimum_of_each_row(bits):
    weight = outlier_weight()
    _, amax = calibrate(weight, axis=0, calibrator="mse", granularity="per_channel", bits=bits, narrow_range=True)
    row_max = weight.abs().amax(dim=1)
    normal_rows = [0, 2, 4, 5]
    ratio = float(amax[3]) / float(amax[normal_rows].median())
    assert 30.0 < ratio < 70.0  # the outlier channel gets its own range; the others are untouched
    for row in range(weight.shape[0]):
        chosen = symmetric_error(weight[row], amax[row], bits=bits)
        # close to a fine brute-force search over exact errors; not worse than max calibration
        # (beyond the 1% the rounding-noise model of the search may cost)
        grid = torch.linspace(0.01, 1.0, 400) * row_max[row]
        best = float(symmetric_error(weight[row], grid, bits=bits).min())
        assert chosen <= 1.05 * best, row
        assert chosen <= symmetric_error(weight[row], row_max[row], bits=bits) * 1.01, row
    if bits == 4:  # 16 codes: clipping the Gaussian tails pays off
        assert torch.all(amax[normal_rows] < 0.8 * row_max[normal_rows])


def test_per_channel_rows_are_copied_at_collect():
    weight = torch.randn(4, 64)
    calibrator = make_calibrator(QuantSpec(calibrator="percentile", granularity="per_channel", percentile=100.0),
                                 axis=0)
    calibrator.collect(weight)
    expected = weight.abs().amax(dim=1)
    weight.mul_(10.0)  # a training step after calibration must not change what was collected
    torch.testing.assert_close(calibrator.compute_range()[1], expected)


def test_per_channel_mse_asymmetric_contains_zero():
    weight = torch.rand(4, 512) + 0.5  # all positive rows
    weight[1] -= 2.0  # all negative row
    lo, hi = calibrate(weight, axis=0, calibrator="mse", granularity="per_channel", symmetric=False)
    assert torch.all(lo <= 0) and torch.all(hi >= 0)
    assert float(lo[0]) == 0.0 and float(hi[1]) == 0.0
    assert torch.all(hi[[0, 2, 3]] > 1.0) and float(lo[1]) < -1.0


def test_per_channel_channel_count_and_axis_errors():
    calibrator = make_calibrator(QuantSpec(calibrator="max", granularity="per_channel"), axis=0)
    calibrator.collect(torch.randn(4, 3))
    with pytest.raises(CalibrationError, match="4 channels"):
        calibrator.collect(torch.randn(5, 3))
    with pytest.raises(CalibrationError, match="axis 3"):
        make_calibrator(QuantSpec(calibrator="max", granularity="per_channel"), axis=3).collect(torch.randn(2, 2))
    with pytest.raises(CalibrationError, match="channel axis"):
        make_calibrator(QuantSpec(calibrator="max", granularity="per_channel"))


# --------------------------------------------------------------------------- degenerate inputs and errors
@pytest.mark.parametrize("name", sorted(CALIBRATOR_TYPES))
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_input_gives_zero_range(name, symmetric):
    lo, hi = calibrate([torch.zeros(64), torch.zeros(3, 5)], calibrator=name, symmetric=symmetric)
    assert float(lo) == 0.0 and float(hi) == 0.0 and not math.copysign(1.0, float(lo)) < 0
    if name != "entropy":
        lo, hi = calibrate(torch.zeros(3, 8), axis=0, calibrator=name, symmetric=symmetric,
                           granularity="per_channel")
        assert lo.tolist() == [0.0] * 3 and hi.tolist() == [0.0] * 3


@pytest.mark.parametrize("name", sorted(CALIBRATOR_TYPES))
def test_all_equal_input_and_zeros_before_data(name):
    _, hi = calibrate(torch.full((1000,), -3.0), calibrator=name)
    assert float(hi) == pytest.approx(3.0, rel=0.03)
    lo, hi = calibrate(torch.full((1000,), 2.0), calibrator=name, symmetric=False)
    assert float(lo) == 0.0 and float(hi) == pytest.approx(2.0, rel=0.03)


def test_zeros_seen_before_the_range_opened_still_count():
    # 90% exact zeros first, then data: the median of |x| is 0
    _, hi = calibrate([torch.zeros(9000), torch.rand(1000)], calibrator="percentile", percentile=50.0)
    assert 0.0 <= float(hi) <= 1.0 / NUM_BINS


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype):
    x = (torch.rand(10_000) * 2 - 1).to(dtype)
    for name in CALIBRATOR_TYPES:
        lo, hi = calibrate(x, calibrator=name, percentile=99.0)
        assert lo.dtype == torch.float32 and 0.9 <= float(hi) <= float(x.abs().max())


@pytest.mark.parametrize("name", sorted(CALIBRATOR_TYPES))
def test_compute_before_collect_raises(name):
    calibrator = make_calibrator(QuantSpec(calibrator=name))
    assert isinstance(calibrator, Calibrator)
    with pytest.raises(CalibrationError, match="no data"):
        calibrator.compute_range()


def test_make_calibrator_rejects_unknown_names_and_per_channel_entropy():
    with pytest.raises(PolicyError, match="did you mean 'entropy'"):
        make_calibrator(QuantSpec(calibrator="entropi"))  # type: ignore[arg-type]
    with pytest.raises(CalibrationError, match="per channel"):
        make_calibrator(QuantSpec(calibrator="entropy", granularity="per_channel"), axis=0)
    with pytest.raises(CalibrationError, match="empty"):
        make_calibrator(QuantSpec()).collect(torch.zeros(0))
    assert isinstance(make_calibrator(QuantSpec(calibrator="max")), MaxCalibrator)


# --------------------------------------------------------------------------- properties
finite_data = arrays(np.float32, st.integers(1, 300),
                     elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32))


@settings(max_examples=40, deadline=None)
@given(data=finite_data, percentile=st.floats(50.0, 100.0))
def test_property_ranges_are_ordered_and_bounded(data, percentile):
    x = torch.from_numpy(data)
    abs_max = float(x.abs().max())
    _, max_amax = calibrate(x, calibrator="max")
    assert float(max_amax) == abs_max
    for name in ("percentile", "entropy", "mse"):
        lo, hi = calibrate(x, calibrator=name, percentile=percentile)
        assert float(lo) == -float(hi) and 0.0 <= float(hi) <= float(max_amax) * (1 + 1e-6) + 1e-30, name
        lo, hi = calibrate(x, calibrator=name, percentile=percentile, symmetric=False)
        assert min(float(x.min()), 0.0) * (1 + 1e-6) <= float(lo) <= 0.0 <= float(hi), name
        assert float(hi) <= max(float(x.max()), 0.0) * (1 + 1e-6) + 1e-30, name


@settings(max_examples=30, deadline=None)
@given(data=arrays(np.float32, st.tuples(st.integers(1, 8), st.integers(1, 40)),
                   elements=st.floats(-100, 100, allow_nan=False, width=32)))
def test_property_per_channel_ranges(data):
    w = torch.from_numpy(data)
    _, max_amax = calibrate(w, axis=0, calibrator="max", granularity="per_channel")
    assert torch.equal(max_amax, w.abs().amax(dim=1))
    for name in ("percentile", "mse"):
        lo, hi = calibrate(w, axis=0, calibrator=name, granularity="per_channel", percentile=99.0)
        assert torch.all(hi <= max_amax * (1 + 1e-6)) and torch.equal(lo, -hi)
        lo, hi = calibrate(w, axis=0, calibrator=name, granularity="per_channel", symmetric=False)
        assert torch.all(lo <= 0) and torch.all(hi >= 0)
        assert torch.all(lo >= w.amin(dim=1).clamp(max=0) * (1 + 1e-6)), name
        assert torch.all(hi <= w.amax(dim=1).clamp(min=0) * (1 + 1e-6)), name


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_batches_match_cpu():
    batches = [torch.randn(100_000) * scale for scale in (0.5, 2.0, 1.0)]
    bin_width = float(torch.cat(batches).abs().max()) / NUM_BINS
    for name in CALIBRATOR_TYPES:
        for symmetric in (True, False):
            on_cpu = calibrate(batches, calibrator=name, symmetric=symmetric)
            on_gpu = calibrate([b.cuda() for b in batches], calibrator=name, symmetric=symmetric)
            assert on_gpu[0].device.type == "cpu" and on_gpu[1].device.type == "cpu"
            torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-3, atol=4 * bin_width)
    weight = torch.randn(16, 8, 3, 3)
    for name in ("max", "percentile", "mse"):
        on_cpu = calibrate(weight, axis=0, calibrator=name, granularity="per_channel")
        on_gpu = calibrate(weight.cuda(), axis=0, calibrator=name, granularity="per_channel")
        torch.testing.assert_close(on_gpu, on_cpu)
