r"""Built-in policy presets, as plain dicts (the same form a YAML policy takes).

- ``tensorrt``: INT8 symmetric, zero-point 0; weights per output channel in [-127, 127];
  activations per tensor in [-128, 127]; tiny layers (< 16 channels, GEMM N/K < 16) stay in
  floating point because TensorRT runs them faster in FP16 than with unfusable Q/DQ.
- activations use ``calibrator: auto`` (percentile 99.99 at 8 bits, MSE at <= 4 bits) and keep
  the network input at 8 bits when they are <= 4 bits (``input_bits: 8``); see BENCHMARKS.md
  "Low-bit recipes".
- ``onnxruntime`` (x86 CPU): activations UINT8 asymmetric per tensor, weights INT8 symmetric
  per channel (the U8S8 kernels ONNX Runtime runs fastest on x86).

Transformer encoders (BERT family) under W8A8 PTQ: measured on a pretrained 6-layer encoder
(BENCHMARKS.md, "Transformer PTQ"), the ``tensorrt`` preset keeps a min sentence-embedding cosine
of 0.971; ``residual: false`` plus skipping the FFN output GEMMs (input: the GELU output) reaches
0.991: ``{"preset": "tensorrt", "residual": False, "overrides": [{"regex": r".*layer\.\d+\.output\.dense", "skip": True}]}``
(module names as in Hugging Face's ``BertModel``).
"""
from __future__ import annotations

from typing import Any

_WEIGHT_INT8_PER_CHANNEL: dict[str, Any] = {
    "bits": 8, "symmetric": True, "granularity": "per_channel", "calibrator": "max", "narrow_range": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tensorrt": {
        "name": "tensorrt",
        "target": "tensorrt",
        "activation": {"bits": 8, "symmetric": True, "granularity": "per_tensor",
                       "calibrator": "auto", "percentile": 99.99},
        "weight": dict(_WEIGHT_INT8_PER_CHANNEL),
        "bn": "train",
        "min_channels": 16,
        "residual": True,
    },
    "onnxruntime": {
        "name": "onnxruntime",
        "target": "onnxruntime",
        "activation": {"bits": 8, "symmetric": False, "granularity": "per_tensor",
                       "calibrator": "auto", "percentile": 99.99},
        "weight": dict(_WEIGHT_INT8_PER_CHANNEL),
        "bn": "train",
        "min_channels": 0,
        "residual": True,
    },
}
