"""Sensitivity, exports and checkpoints under torch.distributed: two CPU processes joined by gloo.

Oracles: the sensitivity report of two ranks sharing the probes equals one process's (bit for bit,
same thread count) while each rank runs its share; files are written by rank 0 alone and complete
when the call returns on any rank.
"""
from __future__ import annotations

import pytest
import torch
from distributed_cases import calibrated
from distributed_ranks import run_ranks
from torch import nn

import qatgraph
from qatgraph.distributed import run_on_main, this_rank_only


class FiveLayers(nn.Module):
    """Five quantized Linear layers (an odd count: the last round leaves a rank idle) and a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(5))
        self.head = nn.Linear(32, 10)  # N=10 < 16: stays in floating point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def _report(report) -> dict:
    data = report.to_dict()
    data["baseline"].pop("seconds")
    return data


def _sensitivity_everywhere(rank: int, folder: str) -> dict:
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = FiveLayers().eval()
    with torch.no_grad():  # layers.2 is fragile (as in test_sensitivity.py): huge weights on a dead input
        model.layers[1].weight[0].zero_()
        model.layers[1].bias[0] = -1.0
        model.layers[2].weight[:, 0] = 40.0
    generator = torch.Generator().manual_seed(6)
    samples = [(torch.randn(16, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
               for _ in range(3)]
    inputs = [x for x, _ in samples]
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(inputs[0],))
    qatgraph.calibrate(qmodel, inputs[rank::2])

    def analyse():
        fast = qatgraph.sensitivity(qmodel, samples, input_fn=lambda item: item[0], gradient=True,
                                    loss_fn=lambda output, item: F.cross_entropy(output, item[1]))
        full = qatgraph.sensitivity(qmodel, inputs, qatgraph.sensitivity_analysis.agreement_metric(inputs), "full")
        return _report(fast), _report(full)

    results = {"reports": analyse()}
    calls = []
    hook = qmodel.register_forward_hook(lambda *_: calls.append(1))
    qatgraph.sensitivity(qmodel, inputs)  # fast: 3 batches x (FP reference + all quantized + 2 per probed layer)
    results["forward_calls"] = len(calls)
    hook.remove()
    cached = qatgraph.sensitivity(qmodel, inputs, cache_dir=folder)  # rank 0 writes the cache file ...
    rerun = qatgraph.sensitivity(qmodel, inputs, cache_dir=folder)   # ... every rank reads it through rank 0
    results["cache"] = (_report(cached), _report(rerun))
    rerun.save(f"{folder}/report")
    results["saved"] = qatgraph.SensitivityReport.load(f"{folder}/report").ranking  # rank 1 reads rank 0's file
    if rank == 0:
        with this_rank_only():
            results["reference"] = analyse()
            calls.clear()
            hook = qmodel.register_forward_hook(lambda *_: calls.append(1))
            qatgraph.sensitivity(qmodel, inputs)
            results["reference_forward_calls"] = len(calls)
            hook.remove()
    with pytest.raises(qatgraph.DistributedError) as caught:  # a shard of the data per rank is refused
        qatgraph.sensitivity(qmodel, inputs[rank:rank + 1])
    results["sharded"] = str(caught.value)
    return results


def test_sensitivity_split_across_ranks_equals_one_process(tmp_path):
    rank0, rank1 = run_ranks(_sensitivity_everywhere, str(tmp_path))
    assert rank0["reports"] == rank1["reports"]
    # the 5 layers' probes are shared: rank 0 scores 3 of them, rank 1 two (6 batch passes each)
    assert rank0["reference_forward_calls"] == 3 + 3 + 5 * 6
    assert (rank0["forward_calls"], rank1["forward_calls"]) == (3 + 3 + 3 * 6, 3 + 3 + 2 * 6)
    assert rank0["reports"] == rank0["reference"], "the ranks' shared analysis differs from one process's"
    fast, full = rank0["reports"]
    assert fast["ranking"][0] == "layers.2" and len(full["ranking"]) == 5
    assert all(fast["details"][layer]["fisher"] is not None for layer in fast["ranking"])
    cached, rerun = rank0["cache"]
    assert cached["baseline"]["cached_results"] == 0 and rerun["baseline"]["cached_results"] == 6  # 5 layers + all
    assert rank1["cache"][1]["baseline"]["cached_results"] == 6 and rerun["details"] == cached["details"]
    assert [p.name for p in tmp_path.glob("sensitivity-*.jsonl")] and rank1["saved"] == rerun["ranking"]
    assert "rank 1's samples differ" in rank0["sharded"] and "rank 1's samples differ" in rank1["sharded"]


def _write_on_rank_0(rank: int, folder: str) -> dict:
    import onnx

    import qatgraph.checkpoint
    from qatgraph.checkpoint import ModelSource, load_checkpoint, save_checkpoint
    from qatgraph.policy import Policy

    writes: list[str] = []  # which files this rank writes itself
    save_onnx, save_torch = onnx.save, qatgraph.checkpoint.atomic_torch_save
    onnx.save = lambda model, path, *a, **k: (writes.append("onnx"), save_onnx(model, path, *a, **k))[1]
    qatgraph.checkpoint.atomic_torch_save = lambda obj, path: (writes.append("checkpoint"), save_torch(obj, path))[1]
    qmodel = calibrated("tensorrt")
    example = torch.randn(2, 3, 8, 8)
    result = qatgraph.export_onnx(nn.parallel.DistributedDataParallel(qmodel), f"{folder}/model.onnx", example)
    with open(f"{folder}/model.onnx", "rb") as handle:  # complete as soon as export_onnx returns, on every rank
        onnx_bytes = handle.read()
    with pytest.raises(qatgraph.ExportError) as caught:  # rank 0's error is every rank's error
        qatgraph.export_onnx(qmodel, f"{folder}/bad.onnx", example, opset=11)
    save_checkpoint(f"{folder}/qat.pt", qmodel, ModelSource("distributed_cases:tiny_model", None, (2, 3, 8, 8)),
                    Policy.preset("tensorrt"))
    loaded, _, _ = load_checkpoint(f"{folder}/qat.pt")
    if rank == 0:
        with this_rank_only():  # rank 0 alone: no other rank takes part, nothing waits
            qatgraph.export_onnx(qmodel, f"{folder}/alone.onnx", example)
    with pytest.raises(Exception) as unpicklable:  # an error that cannot travel still stops every rank
        run_on_main(_raise_unpicklable, "writing a file")
    return {"writes": writes, "onnx_bytes": len(onnx_bytes), "error": str(caught.value),
            "result": (result.path, result.num_nodes, result.num_qdq, result.size_bytes, len(result.findings)),
            "checkpoint_equal": all(torch.equal(v, qmodel.state_dict()[k]) for k, v in loaded.state_dict().items()),
            "unpicklable": f"{type(unpicklable.value).__name__}: {unpicklable.value}"}


class _UnpicklableError(RuntimeError):
    def __init__(self) -> None:
        super().__init__("disk full")
        self.callback = lambda: None  # a lambda does not pickle


def _raise_unpicklable() -> None:
    raise _UnpicklableError


def test_exports_and_checkpoints_are_written_by_rank_0_for_every_rank(tmp_path):
    rank0, rank1 = run_ranks(_write_on_rank_0, str(tmp_path))
    assert rank0["writes"] == ["onnx", "checkpoint", "onnx"] and rank1["writes"] == []
    assert rank0["result"] == rank1["result"] and rank1["onnx_bytes"] == rank0["result"][3] > 0
    assert rank0["error"] == rank1["error"] and "opset" in rank0["error"]
    assert rank0["checkpoint_equal"] and rank1["checkpoint_equal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone.onnx", "model.onnx", "qat.pt"]
    assert rank0["unpicklable"] == "_UnpicklableError: disk full"
    assert rank1["unpicklable"] == "DistributedError: writing a file failed on rank 0: _UnpicklableError: disk full"
