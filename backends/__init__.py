"""Deployment targets: ONNX export and lint, ONNX Runtime, TensorRT (installed as ``qatgraph.backends``).

* ``onnx`` (export; Q/DQ from the fake-quantizers in ``onnx_qdq``, the graph index in
  ``onnx_graph``) and ``onnx_lint`` (TensorRT's rules, in ``onnx_lint_rules`` and
  ``onnx_lint_qparams``);
* ``onnxruntime`` (runner) and ``parity`` (the trained model vs ONNX Runtime);
* ``tensorrt`` (engine builder; shared inputs in ``tensorrt_config``, the trtexec fallback in
  ``tensorrt_trtexec``, the runner in ``tensorrt_runner``).

Backends read a compiled QAT model; they never reach back into the passes. May import:
:mod:`qatgraph.quant`, :mod:`qatgraph.graph`, :mod:`qatgraph.errors`, :mod:`qatgraph.distributed`,
:mod:`qatgraph.atomic_files`.
"""
