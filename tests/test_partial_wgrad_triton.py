"""Tests for the Triton partial weight-gradient kernel (qatgraph/kernels/partial_wgrad_triton.py).

On CPU the kernel runs under the Triton interpreter: the ``check_*`` functions below run in a child
pytest with ``TRITON_INTERPRET=1`` (tests/interpreted.py says why). Run them by hand with

    TRITON_INTERPRET=1 python -m pytest tests/test_partial_wgrad_triton.py -o python_functions=check_

The ``test_*`` CUDA tests exercise the compiled kernel on a GPU.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from interpreted import require_interpreter, run_checks_in_child  # noqa: E402

from qatgraph.ops.partial_grad import partial_weight_grad_linear

# Small tiles keep the interpreter fast; min_blocks_per_split=1 lets small M still split.
SMALL_TILES = {"block_r": 16, "block_k": 16, "block_m": 16, "num_warps": 1, "num_stages": 1, "min_blocks_per_split": 1}


def test_kernel_checks_pass_under_interpreter():
    run_checks_in_child(__file__, minimum=10)


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module, decorated for the interpreter (only inside the child process)."""
    require_interpreter()
    from qatgraph.kernels import partial_wgrad_triton

    assert partial_wgrad_triton._INTERPRETED, "triton was imported before TRITON_INTERPRET=1 was set"
    return partial_wgrad_triton


def _reference(grad_out, x, rows):
    return grad_out.double()[:, rows].t() @ x.double()


def _config(module, target_programs):
    return module.PartialWgradConfig(target_programs=target_programs, **SMALL_TILES)


@pytest.mark.parametrize("target_programs", [1, 64])  # one M chunk (direct store) / split-M + sum
@pytest.mark.parametrize("num_rows", [1, 5, 23])
def check_fp32_matches_reference(interpreted, target_programs, num_rows):
    torch.manual_seed(num_rows)
    m, n, k = 83, 40, 37  # none a multiple of the tiles: every mask is exercised
    grad_out, x = torch.randn(m, n), torch.randn(m, k)
    rows = torch.randperm(n)[:num_rows].sort().values
    config = _config(interpreted, target_programs)
    split, _ = interpreted._split_count(m, -(-num_rows // 16) * -(-k // 16), config)
    assert (split > 1) == (target_programs > 1)
    result = interpreted.partial_wgrad_triton(grad_out, x, rows, config=config)
    assert result.shape == (num_rows, k) and result.dtype == torch.float32
    torch.testing.assert_close(result.double(), _reference(grad_out, x, rows), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def check_half_precision_inputs_accumulate_in_fp32(interpreted, dtype):
    torch.manual_seed(7)
    grad_out, x = torch.randn(130, 48).to(dtype), torch.randn(130, 20).to(dtype)
    rows = torch.tensor([0, 3, 17, 18, 47])
    result = interpreted.partial_wgrad_triton(grad_out, x, rows, config=_config(interpreted, 8))
    assert result.dtype == dtype
    expected = _reference(grad_out, x, rows)  # exact products of the rounded inputs
    # Only the final rounding to the 16-bit output dtype separates the two.
    resolution = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    torch.testing.assert_close(result.double(), expected, atol=0.05, rtol=2 * resolution)
    fp32_out = interpreted.partial_wgrad_triton(grad_out, x, rows, out_dtype=torch.float32,
                                                config=_config(interpreted, 8))
    assert fp32_out.dtype == torch.float32
    torch.testing.assert_close(fp32_out.double(), expected, atol=1e-3, rtol=1e-4)


def check_strided_inputs_and_unsorted_rows(interpreted):
    torch.manual_seed(3)
    grad_out = torch.randn(40, 70).t()  # (70, 40), column-major
    x = torch.randn(70, 60)[:, ::2]  # (70, 30), stride 2 along K
    rows = torch.tensor([31, 2, 2, 9])
    result = interpreted.partial_wgrad_triton(grad_out, x, rows, config=_config(interpreted, 4))
    torch.testing.assert_close(result.double(), _reference(grad_out, x, rows), atol=1e-4, rtol=1e-4)


def check_default_config(interpreted):
    grad_out, x = torch.randn(50, 33), torch.randn(50, 20)
    rows = torch.tensor([4, 30])
    config = interpreted.default_config(2, 20, torch.float32, torch.device("cpu"))
    assert config.block_r == 16
    result = interpreted.partial_wgrad_triton(grad_out, x, rows)
    torch.testing.assert_close(result.double(), _reference(grad_out, x, rows), atol=1e-4, rtol=1e-4)


def check_empty_rows_and_bad_arguments(interpreted):
    grad_out, x = torch.randn(10, 8), torch.randn(10, 6)
    assert interpreted.partial_wgrad_triton(grad_out, x, torch.zeros(0, dtype=torch.int64)).shape == (0, 6)
    with pytest.raises(ValueError, match="int64"):
        interpreted.partial_wgrad_triton(grad_out, x, torch.tensor([1], dtype=torch.int32))
    with pytest.raises(ValueError, match="same M"):
        interpreted.partial_wgrad_triton(grad_out, x[:5], torch.tensor([1]))
    with pytest.raises(ValueError, match="float64"):
        interpreted.partial_wgrad_triton(grad_out.double(), x.double(), torch.tensor([1]))


def check_public_helper_routes_to_the_kernel(interpreted, monkeypatch):
    """partial_weight_grad_linear(backend='triton') on CPU tensors runs the interpreted kernel."""
    calls = []
    original = interpreted.partial_wgrad_triton
    monkeypatch.setattr(interpreted, "partial_wgrad_triton", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    grad_out, x = torch.randn(3, 11, 24), torch.randn(3, 11, 16)  # 3-D: leading dims flattened
    rows = torch.tensor([1, 5, 23])
    result = partial_weight_grad_linear(grad_out, x, rows, backend="triton")
    assert calls == [1]
    expected = partial_weight_grad_linear(grad_out, x, rows, backend="torch")
    torch.testing.assert_close(result, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ratio", [0.05, 0.5, 1.0])
def test_compiled_kernel_on_cuda(dtype, ratio):
    from qatgraph.kernels.partial_wgrad_triton import partial_wgrad_triton

    torch.manual_seed(0)
    m, k, n = 4099, 200, 384
    grad_out = torch.randn(m, n, device="cuda").to(dtype)
    x = torch.randn(m, k, device="cuda").to(dtype)
    rows = torch.randperm(n, device="cuda")[: max(1, int(ratio * n))].sort().values
    result = partial_wgrad_triton(grad_out, x, rows)
    assert result.dtype == dtype
    expected = _reference(grad_out, x, rows).to(dtype)
    tolerance = 2e-2 if dtype != torch.float32 else 1e-2  # fp32 may run as TF32 if torch allows it
    torch.testing.assert_close(result.double(), expected.double(), atol=tolerance * 10, rtol=tolerance)
    # The autograd op picks the kernel automatically on CUDA.
    via_op = partial_weight_grad_linear(grad_out, x, rows)
    torch.testing.assert_close(via_op, result, atol=0, rtol=0)
