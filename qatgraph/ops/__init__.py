"""Room ``ops``: the tensor-level operators qatgraph adds to PyTorch, each with its autograd.

* :mod:`.fake_quant_cpu` — eager per-tensor/per-channel fake-quant on CPU tensors (C++ kernel or
  vectorized torch ops, ATen's bits), also the "mask" form traced by ``torch.compile``;
* :mod:`.partial_grad` — EfQAT's ``qatgraph::masked_linear`` / ``masked_conv`` custom ops, whose
  backward computes the weight gradient of the trainable output rows only.

Functions of tensors: no modules, no policies, no graphs. May import :mod:`qatgraph.errors` and
:mod:`qatgraph.kernels` (the hand-written kernels these operators launch).
"""
