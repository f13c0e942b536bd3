"""Room ``ops``: the tensor-level operators qatgraph adds to PyTorch, each with its autograd.

* :mod:`.fake_quant_cpu` — eager per-tensor/per-channel fake-quant on CPU tensors (C++ kernel or
  vectorized torch ops, ATen's bits), also the "mask" form traced by ``torch.compile``;
* :mod:`.fake_quant_cuda` — eager fake-quant of CUDA tensors in fp32/bf16/fp16, one fused kernel
  per direction (Triton, or ATen's cachemask kernels), learnable scales included;
* :mod:`.partial_grad` — EfQAT's masked linear/conv (autograd functions in eager mode,
  ``qatgraph::masked_*`` custom ops under ``torch.compile``), whose backward computes the weight
  gradient of the trainable output rows only;
* :mod:`.partial_wgrad` — how that partial weight gradient is computed (gather + GEMM, Triton, or
  full then masked), chosen per layer shape by measurement on CUDA.

Functions of tensors: no modules, no policies, no graphs. May import :mod:`qatgraph.errors` and
:mod:`qatgraph.kernels` (the hand-written kernels these operators launch).
"""
