"""The fused fake-quant's Triton kernels (qatgraph/kernels/fake_quant_triton.py) compiled for Hopper, without a GPU.

Ahead-of-time compilation for sm_90 (Triton ships ptxas) shows what the interpreted checks of
tests/test_fake_quant_triton.py cannot: each value is divided by the scale with an IEEE division
(``div.rn``, as ONNX QuantizeLinear), rounding is round-half-even (``cvt.rni``), bf16 output rounds to
nearest even, and loads/stores are 16-byte vectors.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def _compile_for_hopper(kernel, signature: dict, constexprs: dict, divisible: tuple[int, ...]):
    """Compile a @triton.jit kernel ahead of time for sm_90 (no GPU needed: Triton ships ptxas)."""
    compiler = pytest.importorskip("triton.compiler")
    backends = pytest.importorskip("triton.backends.compiler")
    import triton

    attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}  # as the launcher specializes
    source = compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        return triton.compile(source, target=backends.GPUTarget("cuda", 90, 32)).asm["ptx"]
    except (FileNotFoundError, RuntimeError) as error:
        if "ptxas" in str(error):
            pytest.skip(f"Triton's ptxas is not usable here: {error}")
        raise


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_hopper_with_ieee_division_and_round_half_even(dtype):
    """The compiled (not interpreted) kernels: what the interpreter checks cannot show. Each value
    is divided by the scale with an IEEE division (div.rn, as ONNX QuantizeLinear), rounding is round-half-even (cvt.rni), bf16
    output rounds to nearest even (cvt.rn.bf16), and loads/stores are 16-byte vectors."""
    from qatgraph.kernels import fake_quant_triton as kernels

    assert not kernels.INTERPRETED
    pointers = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "mask_ptr": "*i1", "scale_ptr": "*fp32",
                "zero_point_ptr": "*i32"}
    scalars = {"inner": "i32", "channels": "i32", "blocks_per_row": "i32", "quant_min": "i32", "quant_max": "i32"}
    flags = {"BLOCK": "constexpr", "WRITE_MASK": "constexpr", "DOWNCAST": "constexpr", "INTERPRETED": "constexpr"}
    ptx = _compile_for_hopper(kernels._forward_kernel, {**pointers, **scalars, **flags},
                              {"BLOCK": 2048, "WRITE_MASK": True, "DOWNCAST": dtype != "fp32", "INTERPRETED": False},
                              divisible=(0, 1, 2, 3, 4, 5))
    assert "div.rn.f32" in ptx and "cvt.rni.f32.f32" in ptx
    assert "div.full" not in ptx and "div.approx" not in ptx
    assert re.search(r"ld\.global(\.[a-z]+)*\.v4", ptx), "activation loads are not 16-byte vectors"
    assert re.search(r"st\.global(\.[a-z]+)*\.v4", ptx), "output stores are not 16-byte vectors"
    if dtype == "bf16":
        assert re.search(r"cvt\.rn\.bf16(x2)?\.f32", ptx), "bf16 output is not rounded to nearest even"
    lsq = {"x_ptr": f"*{dtype}", "grad_ptr": f"*{dtype}", "scale_ptr": "*fp32", "zero_point_ptr": "*i32",
           "grad_x_ptr": f"*{dtype}", "partial_ptr": "*fp32", **scalars, "BLOCK": "constexpr", "INTERPRETED": "constexpr"}
    ptx = _compile_for_hopper(kernels._lsq_backward_kernel, lsq, {"BLOCK": 2048, "INTERPRETED": False},
                              divisible=(0, 1, 2, 3, 4, 5, 6))
    assert "div.rn.f32" in ptx and "cvt.rni.f32.f32" in ptx
    grad = {"grad_ptr": f"*{dtype}", "mask_ptr": "*i1", "out_ptr": f"*{dtype}", "numel": "i64", "BLOCK": "constexpr"}
    ptx = _compile_for_hopper(kernels._masked_grad_kernel, grad, {"BLOCK": 2048}, divisible=(0, 1, 2, 3))
    assert re.search(r"ld\.global(\.[a-z]+)*\.v4", ptx)
