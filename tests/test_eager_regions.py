"""Untraced (eager) code after partial tracing: one quantizer per tensor, BatchNorm folded at
export when nothing else reads the conv output, errors blamed on the right party."""
from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torch.nn.functional as F
from distributed_ranks import run_ranks
from torch import nn

import qatgraph
from qatgraph import QatgraphError
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.graph.eager_ops import float_run
from qatgraph.graph.folding import eager_foldable_pairs

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning")
FX = {"preset": "tensorrt", "tracing": {"frontend": "fx"}}


class EagerAttention(nn.Module):
    """Q, K, V read the same tensor in a forward torch.fx cannot trace."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if x.shape[-1] > 0:  # torch.fx cannot trace this (tracing.frontend fx: no torch.export)
            weights = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1)
        return self.out(weights @ v)


def test_qkv_in_untraced_code_share_one_input_quantizer(tmp_path) -> None:
    x = torch.randn(2, 8, 32)
    qmodel = qatgraph.compile(EagerAttention(), FX, example_inputs=(x,))
    assert qmodel.q.input_quantizer is qmodel.k.input_quantizer is qmodel.v.input_quantizer
    assert qmodel.out.input_quantizer is not qmodel.q.input_quantizer
    assert sorted(qmodel.trace_report.shared_quantizers) == [("k.input_quantizer", "q.input_quantizer"),
                                                             ("v.input_quantizer", "q.input_quantizer")]
    assert "one quantizer per tensor" in qmodel.trace_report.describe()
    assert {"q.input_quantizer.scale", "k.input_quantizer.scale"} <= set(qmodel.state_dict())
    qatgraph.calibrate(qmodel, [torch.randn(4, 8, 32)], show_progress=False)
    path = str(tmp_path / "m.onnx")
    result = export_onnx(qmodel, path, x)
    assert "tensor-quantized-twice" not in {f.rule for f in result.findings}
    assert check_parity(qmodel, path, [torch.randn(3, 8, 32)]).passed


class EagerConvBN(nn.Module):
    def __init__(self, reuse: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        out = self.bn(y)
        if x.shape[-1] > 0:  # torch.fx cannot trace this
            out = out + y if self.reuse else out
        return torch.relu(out)


@pytest.mark.parametrize("reuse", [False, True])
def test_eager_batchnorm_folds_only_when_the_conv_output_has_no_other_reader(reuse: bool, tmp_path) -> None:
    model = EagerConvBN(reuse).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(model, FX)
    assert "conv" in qmodel.trace_report.eager_layers
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    assert eager_foldable_pairs(qmodel, (x,)) == ([] if reuse else [("conv", "bn")])
    path = str(tmp_path / "m.onnx")
    export_onnx(qmodel, path, x)
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert ops["BatchNormalization"] == (1 if reuse else 0)
    assert check_parity(qmodel, path, [torch.randn(3, 16, 8, 8)]).passed


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_wrong_example_inputs_are_blamed_on_the_inputs() -> None:
    with pytest.raises(QatgraphError, match="running the model on example_inputs failed before quantization"):
        qatgraph.compile(Broken(), "tensorrt", example_inputs=(torch.randn(2, 3, 8, 8),))


def test_residual_add_in_untraced_code_is_named_in_the_summary() -> None:
    qmodel = qatgraph.compile(EagerConvBN(reuse=True).eval(), FX, example_inputs=(torch.randn(2, 16, 8, 8),))
    [where] = qmodel.trace_report.eager_adds
    assert where.endswith("`out = out + y if self.reuse else out`") and "test_eager_regions.py:" in where
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    assert "residual rule not applied to Adds in untraced code" in qatgraph.summary(qmodel, print_table=False).trace


def test_bn_fold_policy_folds_untraced_batchnorm_at_compile(tmp_path) -> None:
    model = EagerConvBN(reuse=False).eval()
    x = torch.randn(2, 16, 8, 8)
    policy = {"preset": "tensorrt", "bn": "fold", "tracing": {"frontend": "fx"}}
    qmodel = qatgraph.compile(model, policy, example_inputs=(x,))
    assert qmodel.trace_report.eager_folded == ["bn"] and isinstance(qmodel.bn, nn.Identity)
    assert "BatchNorm folded in untraced code" in qmodel.trace_report.describe()
    qatgraph.calibrate(qmodel, [torch.randn(4, 16, 8, 8)], show_progress=False)
    path = str(tmp_path / "m.onnx")
    export_onnx(qmodel, path, x)
    assert check_parity(qmodel, path, [torch.randn(3, 16, 8, 8)]).passed
    with torch.no_grad():  # quantization aside, the folded model computes the float model
        for quantizer in qmodel.modules():
            if isinstance(quantizer, qatgraph.FakeQuantizer):
                quantizer.disable()
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-4, atol=1e-5)


def test_without_example_inputs_the_first_calibration_batch_shares_the_quantizers(tmp_path) -> None:
    qmodel = qatgraph.compile(EagerAttention(), FX)
    assert qmodel.trace_report.untraced_pending and qmodel.q.input_quantizer is not qmodel.k.input_quantizer
    assert "happen at the first batch of qatgraph.calibrate" in qmodel.trace_report.describe()
    data = iter([torch.randn(4, 8, 32), torch.randn(4, 8, 32)])  # a one-shot iterator: no batch may be lost
    ranges = qatgraph.calibrate(qmodel, data, show_progress=False)
    assert qmodel.q.input_quantizer is qmodel.k.input_quantizer is qmodel.v.input_quantizer
    assert not qmodel.trace_report.untraced_pending and "first batch" not in qmodel.trace_report.describe()
    assert "k.input_quantizer" not in ranges and "q.input_quantizer" in ranges  # shared before ranges were collected
    reference = qatgraph.compile(EagerAttention(), FX, example_inputs=(torch.randn(2, 8, 32),))
    reference.load_state_dict(qmodel.state_dict())  # the same keys as a compile with example inputs
    x = torch.randn(2, 8, 32)
    path = str(tmp_path / "m.onnx")
    result = export_onnx(qmodel, path, x)
    assert "tensor-quantized-twice" not in {f.rule for f in result.findings}
    assert check_parity(qmodel, path, [torch.randn(3, 8, 32)]).passed


def test_without_example_inputs_bn_fold_happens_at_the_first_calibration_batch() -> None:
    model = EagerConvBN(reuse=False).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "bn": "fold", "tracing": {"frontend": "fx"}})
    x = torch.randn(4, 16, 8, 8)
    qatgraph.calibrate(qmodel, [(x, 0)], input_fn=lambda batch: batch[0], show_progress=False)
    assert qmodel.trace_report.eager_folded == ["bn"] and isinstance(qmodel.bn, nn.Identity)
    with torch.no_grad(), float_run(qmodel):
        torch.testing.assert_close(qmodel(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_bad_first_batch_is_named_before_the_untraced_code_runs() -> None:
    qmodel = qatgraph.compile(EagerAttention(), FX)
    with pytest.raises(QatgraphError, match="calibration batch 1 .* failed"):
        qatgraph.calibrate(qmodel, [torch.randn(4, 8, 7)], show_progress=False)
    assert qmodel.trace_report.untraced_pending


class ScaledLinear(nn.Linear):
    """A user subclass: op_kind leaves it alone (its forward is not nn.Linear's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 2


class EagerFunctional(nn.Module):
    """Weighted ops on parameters in a forward torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.2)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.scaled = ScaledLinear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if x.shape[-1] > 0:  # torch.fx cannot trace this
            y = F.linear(y, self.w)
            y = self.attn(y, y, y, need_weights=False)[0]
        return self.scaled(y)


@pytest.mark.parametrize("example", [True, False])
def test_weighted_ops_of_untraced_code_are_float_rows_and_efqat_float_layers(example: bool) -> None:
    x = torch.randn(2, 4, 16)
    policy = {**FX, "min_channels": 0, "freeze": {"mode": "lwpn", "ratio": 0.0, "float_layers": "freeze"}}
    qmodel = qatgraph.compile(EagerFunctional(), policy, example_inputs=(x,) if example else None)
    qatgraph.calibrate(qmodel, [torch.randn(2, 4, 16)], show_progress=False)
    rows = {row.layer: row for row in qatgraph.summary(qmodel, print_table=False).rows}
    # with example inputs the attention the untraced code calls becomes a graph of that call (test_attention_calls.py)
    attention = {"attn.in_proj": "INT", "attn.mha_attention_qk": "INT", "attn.mha_attention_pv": "INT",
                 "attn.out_proj": "INT"} if example else {"attn": "FP"}
    assert {name: row.status for name, row in rows.items()} == {"fc": "INT", "w": "FP", "scaled": "FP", **attention}
    if not example:
        assert rows["attn"].type_name == "MultiheadAttention" and "nn.MultiheadAttention called from untraced code" \
            in rows["attn"].reason and "test_eager_regions.py:" in rows["attn"].reason
    assert "`y = F.linear(y, self.w)`" in rows["w"].reason and "make that forward traceable" in rows["w"].reason
    assert all(rows[name].frozen == "float, weights frozen" for name in ("w", "scaled", *(() if example else ("attn",))))
    assert not (qmodel.w.requires_grad or qmodel.scaled.weight.requires_grad)
    assert ("attn.in_proj" in qmodel.qatgraph_freeze.float_layers) != example  # quantized: an EfQAT layer
    assert "float weighted ops in untraced code" in qmodel.trace_report.describe()


def test_a_traced_graph_gets_no_untraced_rows() -> None:
    class Traced(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 16))
            self.leaf = EagerAttention(16)  # a leaf: its Linear layers are quantized module-wise

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.leaf(F.linear(x, self.w))

    policy = {**FX, "tracing": {"frontend": "fx", "leaf_modules": ["EagerAttention"]}, "min_channels": 0}
    qmodel = qatgraph.compile(Traced(), policy, example_inputs=(torch.randn(2, 4, 16),))
    assert qmodel.trace_report.eager_layers and qmodel.trace_report.eager_weighted == []
    assert [d.quantized for d in qmodel.qatgraph_info.layers if d.layer == "w"] == [True]


class SeparateProjections(nn.Module):
    """An nn.MultiheadAttention with separate q/k/v weights (kdim) and a parameter read transposed
    and sliced, in a forward torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=12, vdim=12)
        self.w = nn.Parameter(torch.randn(24, 16) * 0.2)
        self.head = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 0:  # torch.fx cannot trace this
            x = self.attn(x, memory, memory, need_weights=False)[0]
        return self.head(x @ self.w[:16].t())


def test_untraced_ops_are_named_after_the_attention_module_and_seen_through_views() -> None:
    policy = {**FX, "freeze": {"mode": "lwpn", "ratio": 0.0, "float_layers": "freeze"}}
    qmodel = qatgraph.compile(SeparateProjections(), policy)  # without example inputs the attention stays a module
    qatgraph.calibrate(qmodel, [(torch.randn(2, 4, 16), torch.randn(2, 5, 12))], show_progress=False)
    ops = {op.name: op for op in qmodel.trace_report.eager_weighted}
    assert sorted(ops) == ["attn", "w"]
    assert set(ops["attn"].parameters) >= {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                           "attn.out_proj.weight"}
    assert ops["w"].parameters == ["w"] and "`return self.head(x @ self.w[:16].t())`" in ops["w"].where
    assert not qmodel.w.requires_grad and not qmodel.attn.q_proj_weight.requires_grad


def test_efqat_snapshots_the_weights_the_first_batch_folded() -> None:
    """EfQAT restores frozen rows from a snapshot: it must be of the folded weights, not of those
    compile saw before the first calibration batch folded the BatchNorm into them."""
    model = EagerConvBN(reuse=False).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    policy = {**FX, "bn": "fold", "freeze": {"mode": "cwpl", "ratio": 0.5}}
    qmodel = qatgraph.compile(model, policy)
    x = torch.randn(4, 16, 8, 8)
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    folded = qmodel.conv.weight.detach().clone()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.0)
    qmodel.train()
    qmodel(x).sum().backward()
    optimizer.step()
    torch.testing.assert_close(qmodel.conv.weight.detach(), folded, rtol=0, atol=0)


def _first_batch_on_two_ranks(rank: int) -> dict[str, str]:
    """Three calibrations of a model compiled without example inputs: a rank without a batch,
    ranks whose batches take different paths, and ranks that agree."""
    outcomes = {}
    cases = {"no batch on rank 1": (EagerAttention, [torch.randn(4, 8, 32)] if rank == 0 else []),
             "different paths": (DataDependent, [torch.full((2, 16), 1.0 if rank == 0 else -1.0)]),
             "agree": (EagerAttention, [torch.randn(4, 8, 32)])}
    for case, (build, batches) in cases.items():
        torch.manual_seed(0)
        qmodel = qatgraph.compile(build(), FX)
        try:
            qatgraph.calibrate(qmodel, batches, show_progress=False)
            outcomes[case] = f"shared {len(qmodel.trace_report.shared_quantizers)}"
        except qatgraph.QatgraphError as exc:
            outcomes[case] = str(exc)
    return outcomes


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if x.sum() > 0:  # torch.fx cannot trace this; the ranks' batches decide differently
            y = F.linear(y, self.w)
        return y


def test_ranks_analyse_untraced_code_alike_or_stop_together() -> None:
    rank0, rank1 = run_ranks(_first_batch_on_two_ranks)
    for outcomes in (rank0, rank1):
        assert "a rank got no calibration batch" in outcomes["no batch on rank 1"]
        assert "took different paths through the model's untraced code" in outcomes["different paths"]
        assert outcomes["agree"] == "shared 2"


def test_state_of_a_model_folded_at_calibration_loads_into_one_folded_alike() -> None:
    policy = {**FX, "bn": "fold"}
    trained = qatgraph.compile(EagerConvBN(reuse=False).eval(), policy)
    qatgraph.calibrate(trained, [torch.randn(4, 16, 8, 8)], show_progress=False)
    fresh = qatgraph.compile(EagerConvBN(reuse=False).eval(), policy)
    with pytest.raises(qatgraph.StateMismatchError, match="compile it with example_inputs, or calibrate it"):
        fresh.load_state_dict(trained.state_dict())
    qatgraph.calibrate(fresh, [torch.randn(4, 16, 8, 8)], show_progress=False)
    fresh.load_state_dict(trained.state_dict())
