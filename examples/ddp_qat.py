"""Distributed QAT with DistributedDataParallel, one process per GPU (or CPU processes), started by torchrun:

    torchrun --nproc-per-node 2 examples/ddp_qat.py --out /tmp/ddp-qat           # 2 GPUs (nccl) or 2 CPU processes (gloo)
    torchrun --nproc-per-node 2 examples/ddp_qat.py --out /tmp/ddp-qat --small   # seconds on a CPU (what CI runs)
    torchrun --nproc-per-node 2 examples/ddp_qat.py --out /tmp/ddp-qat --efqat   # EfQAT: train 25% of the weight rows

Every rank runs this whole script. qatgraph's calls are collective while a process group is up
(every rank makes them, in the same order): ``calibrate`` merges the ranks' statistics, so every
rank gets the scales of one process calibrating on all shards; ``sensitivity`` shares its
per-layer probes among the ranks; ``finetune`` trains through DistributedDataParallel on a
DistributedSampler shard per rank; files (the sensitivity report, the fine-tune checkpoint, the
ONNX model) are written by rank 0 while the others wait. The data are random images labelled by the
floating-point model itself (accuracy is then agreement with it), so the example runs anywhere
without a download; replace ``make_data`` and the model with yours.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import qatgraph
from qatgraph.demo.model import SmallResNet


def make_data(count: int, size: int, teacher: torch.nn.Module, seed: int) -> TensorDataset:
    """Images labelled by ``teacher``, the same on every rank (same seed); samplers decide which rank
    reads which."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, size, size, generator=generator)
    with torch.no_grad():
        labels = teacher(images).argmax(1)
    return TensorDataset(images, labels)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """This rank's accuracy on its shard (finetune averages the ranks' values)."""
    device = next(model.parameters()).device
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
        total += len(labels)
    return correct / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ddp-qat")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--efqat", action="store_true", help="EfQAT (CWPN, 25%% of the rows train)")
    args = parser.parse_args()
    device = qatgraph.distributed.setup()  # nccl and cuda:LOCAL_RANK on GPUs, gloo on CPUs
    rank, ranks = qatgraph.distributed.rank(), qatgraph.distributed.world_size()
    size, widths, samples = (16, (16, 32), 128) if args.small else (32, (32, 64, 128), 2048)

    torch.manual_seed(0)  # the same weights on every rank (DDP would broadcast rank 0's anyway)
    model = SmallResNet(in_channels=3, num_classes=10, widths=widths).eval()
    train, validation = make_data(samples, size, model, seed=1), make_data(samples // 4, size, model, seed=2)
    example = train.tensors[0][:2]

    # 1. Compile and calibrate: each rank reads its own shard, the statistics are merged.
    policy: dict = {"preset": "tensorrt"}
    if args.efqat:
        policy["freeze"] = {"mode": "cwpn", "ratio": 0.25, "interval": samples}
    qmodel = qatgraph.compile(model, policy, example_inputs=(example,)).to(device)
    shard = [train.tensors[0][i:i + 32] for i in range(32 * rank, len(train), 32 * ranks)]
    qatgraph.calibrate(qmodel, shard, num_batches=8)

    # 2. Sensitivity on the same samples on every rank: the layers are shared among the ranks.
    report = qatgraph.sensitivity(qmodel, [train.tensors[0][:64].to(device)], num_samples=64)
    report.save(os.path.join(args.out, "sensitivity"))  # rank 0 writes

    # 3. QAT fine-tuning: DDP, a DistributedSampler shard per rank (finetune shards this plain loader).
    loader = DataLoader(train, batch_size=16, shuffle=True)
    validation_loader = DataLoader(validation, batch_size=64, sampler=DistributedSampler(validation, shuffle=False))
    history = qatgraph.finetune(qmodel, loader, F.cross_entropy, epochs=1 if args.small else 3, base_lr=0.1,
                                val_loader=validation_loader, metric=accuracy,
                                checkpoint_path=os.path.join(args.out, "finetune.pt"))

    # 4. Export (rank 0 writes; every rank returns once the file is complete).
    result = qatgraph.export_onnx(qmodel, os.path.join(args.out, "model_int8.onnx"), (example.to(device),))
    if qatgraph.distributed.is_main_process():
        print(f"{ranks} rank(s) on {device.type}; most sensitive: {report.ranking[:3]}")
        final = history.final
        print(f"final train loss {final['train_loss']:.4f}, agreement with the FP model {final['val_metric']:.3f}")
        print(f"exported {result.path}: {result.num_qdq} DequantizeLinear nodes, {len(result.errors)} lint errors")
        if args.efqat:
            print(f"EfQAT: {qmodel.qatgraph_freeze.trainable_rows} of {qmodel.qatgraph_freeze.total_rows} rows train")
    qatgraph.distributed.teardown()


if __name__ == "__main__":
    main()
