"""End-to-end QAT of a ResNet with the Python API: compile, calibrate, summary, fine-tune,
sensitivity report, ONNX export + lint, ONNX Runtime parity.

    python examples/resnet_qat.py --out /tmp/resnet-qat            # a few minutes on a CPU
    python examples/resnet_qat.py --out /tmp/resnet-qat --small    # seconds (what CI runs)

The data here are random tensors with labels from a fixed random "teacher" network, so the
example runs anywhere without a download; replace ``make_data`` with your DataLoader.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import qatgraph
from qatgraph.demo.model import SmallResNet


def make_data(num_batches: int, batch_size: int, size: int, teacher: torch.nn.Module):
    generator = torch.Generator().manual_seed(0)
    batches = []
    with torch.no_grad():
        for _ in range(num_batches):
            images = torch.randn(batch_size, 3, size, size, generator=generator)
            batches.append((images, teacher(images).argmax(1)))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="resnet-qat")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    size, widths, num_batches = (16, (16, 32), 4) if args.small else (32, (32, 64, 128), 32)
    torch.manual_seed(0)
    model = SmallResNet(in_channels=3, num_classes=10, widths=widths).eval()
    teacher = SmallResNet(in_channels=3, num_classes=10, widths=widths).eval()
    train = make_data(num_batches, 16, size, teacher)
    os.makedirs(args.out, exist_ok=True)

    # 1. Compile for TensorRT and calibrate (PTQ): the starting point of QAT.
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(train[0][0],))
    qatgraph.calibrate(qmodel, train, num_batches=8, input_fn=lambda batch: batch[0])
    qatgraph.summary(qmodel)

    # 2. Which layers hurt most? (fast proxy, no labels needed) -> reports people read.
    report = qatgraph.sensitivity(qmodel, [x for x, _ in train], num_samples=64)
    report.save(os.path.join(args.out, "sensitivity"))
    print("most sensitive:", report.ranking[:3])

    # 3. QAT fine-tuning with the recipe (or any training loop of your own).
    history = qatgraph.finetune(qmodel, train, F.cross_entropy, epochs=1 if args.small else 3, base_lr=0.1)
    print("final train loss:", round(history.final["train_loss"], 4))

    # 4. Deploy: ONNX Q/DQ (linted against TensorRT's rules), then ONNX Runtime parity.
    result = qatgraph.export_onnx(qmodel, os.path.join(args.out, "resnet_int8.onnx"), (train[0][0],))
    print(f"exported {result.path}: {result.num_qdq} DequantizeLinear nodes, {len(result.errors)} lint errors")
    print(qatgraph.check_parity(qmodel, result.path, [x for x, _ in train[:2]]))


if __name__ == "__main__":
    main()
