"""Benchmark the EfQAT partial weight gradient of a linear layer on a CUDA GPU.

For each dtype, shape ``(M tokens, K in_features, N out_features)`` and ratio ``r`` of trainable
rows (``R = r * N``, random sorted rows) it times, with ``triton.testing.do_bench`` (median ms):

* ``full``     the full weight-gradient GEMM ``dY.T @ X`` (what training without EfQAT pays),
* ``gather``   the torch path ``dY.index_select(1, rows).T @ X`` (gathered copy + cuBLAS),
* ``triton``   ``qatgraph.kernels.partial_wgrad_triton`` (gather inside the kernel, split-M),
* ``bwd full`` / ``bwd masked``  the whole backward of ``F.linear`` vs ``qatgraph::masked_linear``
  (input gradient + weight gradient + bias gradient); EfQAT's theoretical speedup is 2/(1+r).

Each configuration is first checked: the Triton result must match the torch path.

Usage (on a machine with a CUDA GPU and Triton)::

    python benchmarks/partial_wgrad_gpu.py
    python benchmarks/partial_wgrad_gpu.py --dtypes bf16 --ratios 0.05 0.25 --shapes 16384x768x3072

Exits with status 2 and a message when no CUDA GPU (or no Triton) is available.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_SHAPES = ["16384x768x3072", "16384x3072x768", "8192x4096x4096"]


@dataclasses.dataclass
class Row:
    dtype: str
    shape: str
    ratio: float
    rows: int
    full_ms: float
    gather_ms: float
    triton_ms: float
    bwd_full_ms: float
    bwd_masked_ms: float
    max_rel_error: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxKxN (tokens x in x out)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.05, 0.1, 0.25, 1.0])
    parser.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 GEMMs (torch and Triton)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def require_cuda_and_triton() -> None:
    if not torch.cuda.is_available():
        sys.stderr.write("partial_wgrad_gpu.py: no CUDA GPU is visible to torch "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); run it on a GPU machine.\n")
        raise SystemExit(2)
    from qatgraph.kernels import triton_available

    if not triton_available():
        sys.stderr.write("partial_wgrad_gpu.py: triton is not importable; install triton (pip install triton).\n")
        raise SystemExit(2)


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        tokens, in_features, out_features = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {text!r} is not MxKxN, e.g. 16384x768x3072") from None
    return tokens, in_features, out_features


def time_backward(function, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> float:
    """Median ms of one backward; the forward graph is rebuilt outside the timed region."""
    import triton.testing

    output = function(*inputs)

    def backward() -> None:
        torch.autograd.grad(output, inputs, grad_out, retain_graph=True)

    return triton.testing.do_bench(backward, return_mode="median")


def bench_one(dtype_name: str, shape: str, ratio: float, generator: torch.Generator) -> Row:
    import triton.testing

    from qatgraph.kernels.partial_wgrad_triton import partial_wgrad_triton
    from qatgraph.ops.partial_grad import masked_linear

    dtype = DTYPES[dtype_name]
    tokens, in_features, out_features = parse_shape(shape)
    device = torch.device("cuda")
    grad_out = torch.randn(tokens, out_features, generator=generator).to(device, dtype)
    x = torch.randn(tokens, in_features, generator=generator).to(device, dtype)
    num_rows = max(1, round(ratio * out_features))
    rows = torch.randperm(out_features, generator=generator)[:num_rows].sort().values.to(device)

    expected = grad_out.index_select(1, rows).t().float() @ x.float()
    got = partial_wgrad_triton(grad_out, x, rows).float()
    max_rel_error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()

    full_ms = triton.testing.do_bench(lambda: grad_out.t() @ x, return_mode="median")
    gather_ms = triton.testing.do_bench(lambda: grad_out.index_select(1, rows).t() @ x, return_mode="median")
    triton_ms = triton.testing.do_bench(lambda: partial_wgrad_triton(grad_out, x, rows), return_mode="median")

    weight = torch.randn(out_features, in_features, generator=generator).to(device, dtype) / in_features ** 0.5
    bias = torch.zeros(out_features, device=device, dtype=dtype)
    inputs = [x.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    bwd_full_ms = time_backward(F.linear, inputs, grad_out)
    bwd_masked_ms = time_backward(lambda a, w, b: masked_linear(a, w, b, rows), inputs, grad_out)
    return Row(dtype_name, shape, ratio, num_rows, full_ms, gather_ms, triton_ms, bwd_full_ms, bwd_masked_ms,
               max_rel_error)


def print_table(rows: list[Row]) -> None:
    header = (f"{'dtype':<5} {'MxKxN':<16} {'ratio':>5} {'R':>5} | {'full':>7} {'gather':>7} {'triton':>7} "
              f"| {'xfull':>6} {'xgath':>6} | {'bwd full':>8} {'bwd mask':>8} {'speedup':>7} {'2/(1+r)':>7} "
              f"| {'relerr':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row.dtype:<5} {row.shape:<16} {row.ratio:>5.2f} {row.rows:>5} | {row.full_ms:>7.3f} "
              f"{row.gather_ms:>7.3f} {row.triton_ms:>7.3f} | {row.full_ms / row.triton_ms:>6.2f} "
              f"{row.gather_ms / row.triton_ms:>6.2f} | {row.bwd_full_ms:>8.3f} {row.bwd_masked_ms:>8.3f} "
              f"{row.bwd_full_ms / row.bwd_masked_ms:>7.2f} {2 / (1 + row.ratio):>7.2f} | {row.max_rel_error:>7.1e}")
    print("times: median ms (triton.testing.do_bench); xfull/xgath: triton speedup over full GEMM / "
          "gather+GEMM; speedup: bwd full / bwd masked")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_cuda_and_triton()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    generator = torch.Generator().manual_seed(args.seed)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  tf32={args.tf32}")
    results = []
    for dtype_name in args.dtypes:
        for shape in args.shapes:
            for ratio in args.ratios:
                results.append(bench_one(dtype_name, shape, ratio, generator))
    print_table(results)


if __name__ == "__main__":
    main()
