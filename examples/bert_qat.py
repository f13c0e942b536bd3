"""QAT of a BERT-style encoder built from a transformers config (no download): Hugging Face
models have no torch.fx tracer in transformers 5, so ``qatgraph.compile`` (``tracing.frontend:
auto``) builds the graph with torch.export from the example inputs; then calibrates on
``{"input_ids", "attention_mask"}`` batches, fine-tunes a few steps, exports ONNX Q/DQ (linted)
and checks ONNX Runtime parity. The compiled model returns what the model returns (here a
``SequenceClassifierOutput``: ``.logits``).

    python examples/bert_qat.py --out /tmp/bert-qat            # hidden 256, 4 layers
    python examples/bert_qat.py --out /tmp/bert-qat --small    # hidden 64, 2 layers (what CI runs)
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import qatgraph


def build_bert(hidden: int, layers: int, vocab: int, num_labels: int) -> torch.nn.Module:
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        raise SystemExit("this example needs transformers: pip install transformers") from None
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 32,
                        intermediate_size=4 * hidden, max_position_embeddings=128, num_labels=num_labels,
                        attn_implementation="sdpa")
    return BertForSequenceClassification(config).eval()


def token_batches(count: int, batch: int, seq: int, vocab: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, vocab, (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1:, seq - 4:] = 0  # some padding, so the attention mask matters
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bert-qat")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    hidden, layers, seq = (64, 2, 16) if args.small else (256, 4, 64)
    vocab, num_labels = 1000, 4
    torch.manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    model = build_bert(hidden, layers, vocab, num_labels)
    batches = token_batches(4 if args.small else 16, 4, seq, vocab)
    example = batches[0]

    # 1. torch.fx cannot trace it, so compile exports it (the attention pass then turns SDPA into
    #    matmul-softmax-matmul); the trace report says so.
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=example)
    print(qmodel.trace_report.describe().splitlines()[0])
    qatgraph.calibrate(qmodel, batches)
    summary = qatgraph.summary(qmodel, print_table=not args.small)
    print(f"{len(summary.quantized)} of {len(summary.rows)} weighted ops quantized (Linear and both attention "
          "matmuls; embeddings and the tiny classifier stay in floating point)")

    # 2. A few QAT steps on labels from the FP model itself (a stand-in for your data set).
    with torch.no_grad():
        labels = [model(**b).logits.argmax(1) for b in batches]
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3, momentum=0.9)
    for step, (batch, target) in enumerate(zip(batches, labels)):
        loss = F.cross_entropy(qmodel(**batch).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"QAT steps done, last loss {loss.item():.4f}")
    qmodel.eval()

    # 3. Deploy: ONNX Q/DQ + lint, then parity with ONNX Runtime on a batch of another size.
    path = os.path.join(args.out, "bert_int8.onnx")
    result = qatgraph.export_onnx(qmodel, path, (example["input_ids"], example["attention_mask"]))
    print(f"exported {result.path}: {result.num_qdq} DequantizeLinear nodes, {len(result.errors)} lint errors")
    check = token_batches(1, 6, seq, vocab, seed=5)[0]
    print(qatgraph.check_parity(qmodel, path, (check["input_ids"], check["attention_mask"])))


if __name__ == "__main__":
    main()
