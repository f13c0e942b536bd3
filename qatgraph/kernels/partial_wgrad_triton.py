"""Triton kernel: weight gradient of a linear layer for a subset of output rows (EfQAT).

Computes ``dW_rows[r, :] = sum_m dY[m, rows[r]] * X[m, :]`` for ``dY`` of shape ``(M, N)``,
``X`` of shape ``(M, K)`` and ``rows`` an int64 index of length ``R``; the result is ``(R, K)``.

Why a kernel: the torch path (``dY.index_select(1, rows).t() @ X``) writes and re-reads a gathered
``(M, R)`` copy of ``dY``. Here the gather happens in the load: each program loads a
``(BLOCK_R, BLOCK_M)`` tile of ``dY^T`` straight from the selected columns through the index, so
no gathered copy is ever materialized.

Shape of the problem: ``R`` and ``K`` are small (hundreds to a few thousand) while ``M`` (tokens x
batch) is large, so a plain ``(R/BLOCK_R) x (K/BLOCK_K)`` grid has too few programs to fill a GPU
at low ratios. The reduction over ``M`` is therefore split ("split-K" on the M axis) into
``split`` chunks; each chunk writes an fp32 partial sum and the partials are summed by torch
afterwards (deterministic, unlike atomics). With one chunk the kernel stores the output directly.

Numerics: fp16/bf16/fp32 inputs, fp32 accumulation, output in ``out_dtype`` (the weight dtype).
fp32 inputs use TF32 tensor cores only when ``torch.backends.cuda.matmul.allow_tf32`` is set, so
the result matches what ``torch.mm`` would do under the same settings.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before this module
was imported (the tests do that on a private copy of this module).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

__all__ = ["PartialWgradConfig", "default_config", "partial_wgrad_triton"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class PartialWgradConfig:
    """Tile sizes and launch parameters. Block sizes must be powers of two >= 16 (tl.dot)."""

    block_r: int = 64
    block_k: int = 128
    block_m: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # Programs wanted on the GPU; the M reduction is split until the grid reaches this size.
    target_programs: int = 264
    # A split chunk gets at least this many BLOCK_M steps so its pipeline has work to overlap.
    min_blocks_per_split: int = 8


def default_config(num_rows: int, in_features: int, dtype: torch.dtype, device: torch.device) -> PartialWgradConfig:
    """Heuristic tiles: fewer bytes per element -> longer K tiles; small R -> short R tiles."""
    block_r = 64 if num_rows > 32 else max(16, triton.next_power_of_2(num_rows))
    sms = 132
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    if dtype == torch.float32:
        return PartialWgradConfig(block_r=block_r, block_k=64, block_m=32, num_warps=4,
                                  num_stages=3, target_programs=2 * sms)
    block_k = 128 if in_features >= 128 else 64
    return PartialWgradConfig(block_r=block_r, block_k=block_k, block_m=64, num_warps=8 if block_r == 64 else 4,
                              num_stages=3, target_programs=2 * sms)


@triton.jit
def _partial_wgrad_kernel(
    grad_out_ptr, x_ptr, rows_ptr, out_ptr,
    M, K, R, m_per_split,
    stride_gm, stride_gn, stride_xm, stride_xk,
    stride_os, stride_or, stride_ok,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_mask = offs_k < K
    # Selected output rows = columns of dY; int64 so column * stride cannot overflow.
    rows = tl.load(rows_ptr + offs_r, mask=r_mask, other=0).to(tl.int64)
    m_start = pid_split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        offs_m64 = offs_m.to(tl.int64)
        # (BLOCK_R, BLOCK_M) tile of dY^T gathered through the row index: no gathered copy.
        grad_tile = tl.load(
            grad_out_ptr + rows[:, None] * stride_gn + offs_m64[None, :] * stride_gm,
            mask=r_mask[:, None] & m_mask[None, :], other=0.0,
        )
        x_tile = tl.load(
            x_ptr + offs_m64[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if UPCAST_OPERANDS:  # interpreter only, see _INTERPRETED
            grad_tile = grad_tile.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        acc = tl.dot(grad_tile, x_tile, acc, input_precision=INPUT_PRECISION)
    out_ptrs = out_ptr + pid_split * stride_os + offs_r[:, None] * stride_or + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & k_mask[None, :])


# Under TRITON_INTERPRET=1 a bfloat16 tl.dot multiplies raw bit patterns (the interpreter stores
# bf16 as uint16; triton-lang/triton#11584, unsupported upstream), so interpreted runs upcast
# bf16 tiles to fp32 before the dot. Products of bf16 values are exact in fp32, so this matches
# the GPU's bf16 x bf16 -> fp32 tensor-core dot up to summation order. Compiled runs never upcast.
_INTERPRETED = type(_partial_wgrad_kernel).__name__ == "InterpretedFunction"


def _split_count(m: int, tiles: int, config: PartialWgradConfig) -> tuple[int, int]:
    """(number of M chunks, rows of M per chunk); chunk length is a multiple of BLOCK_M."""
    max_split = max(1, triton.cdiv(m, config.block_m * config.min_blocks_per_split))
    split = min(max(1, triton.cdiv(config.target_programs, tiles)), max_split)
    m_per_split = triton.cdiv(triton.cdiv(m, split), config.block_m) * config.block_m
    return triton.cdiv(m, m_per_split), m_per_split


def _check_inputs(grad_out: torch.Tensor, x: torch.Tensor, row_index: torch.Tensor) -> None:
    if grad_out.dim() != 2 or x.dim() != 2 or grad_out.shape[0] != x.shape[0]:
        raise ValueError(
            f"partial_wgrad_triton: expected grad_out (M, N) and x (M, K) with the same M, got "
            f"{tuple(grad_out.shape)} and {tuple(x.shape)}; flatten leading dimensions first"
        )
    if row_index.dim() != 1 or row_index.dtype != torch.int64:
        raise ValueError(
            f"partial_wgrad_triton: row_index must be a 1-D int64 tensor, got {row_index.dim()}-D "
            f"{row_index.dtype}; build it with torch.tensor(rows, dtype=torch.int64)"
        )
    for name, tensor in (("grad_out", grad_out), ("x", x)):
        if tensor.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(
                f"partial_wgrad_triton: {name} has dtype {tensor.dtype}; supported are float16, "
                "bfloat16 and float32 (use the torch path for other dtypes)"
            )


def partial_wgrad_triton(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    row_index: torch.Tensor,
    out_dtype: torch.dtype | None = None,
    config: PartialWgradConfig | None = None,
) -> torch.Tensor:
    """``(grad_out[:, row_index].T @ x)`` as an ``(R, K)`` tensor of ``out_dtype`` (default x's).

    ``grad_out`` is ``(M, N)``, ``x`` is ``(M, K)``, ``row_index`` int64 on the same device.
    Rows may repeat or come in any order (each output row is computed independently).
    """
    _check_inputs(grad_out, x, row_index)
    out_dtype = out_dtype or x.dtype
    compute_dtype = torch.promote_types(grad_out.dtype, x.dtype)
    grad_out, x = grad_out.to(compute_dtype), x.to(compute_dtype)
    m, k = x.shape
    r = row_index.numel()
    if r == 0 or k == 0 or m == 0:
        return torch.zeros((r, k), dtype=out_dtype, device=x.device)
    config = config or default_config(r, k, compute_dtype, x.device)
    tiles = triton.cdiv(r, config.block_r) * triton.cdiv(k, config.block_k)
    split, m_per_split = _split_count(m, tiles, config)
    if split == 1:
        out = torch.empty((1, r, k), dtype=out_dtype, device=x.device)
    else:
        out = torch.empty((split, r, k), dtype=torch.float32, device=x.device)
    use_tf32 = compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (compute_dtype != torch.float32 or use_tf32) else "ieee"
    grid = (triton.cdiv(r, config.block_r), triton.cdiv(k, config.block_k), split)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _partial_wgrad_kernel[grid](
            grad_out, x, row_index.contiguous(), out,
            m, k, r, m_per_split,
            grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_R=config.block_r, BLOCK_K=config.block_k, BLOCK_M=config.block_m,
            INPUT_PRECISION=precision, UPCAST_OPERANDS=_INTERPRETED and compute_dtype == torch.bfloat16,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    if split == 1:
        return out[0]
    return out.sum(dim=0).to(out_dtype)

