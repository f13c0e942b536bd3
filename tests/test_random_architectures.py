"""Random small architectures written the way users write them (tests/random_architectures.py),
through both presets: compile -> calibrate -> export -> lint -> ONNX Runtime parity.

The seed decides the blocks, the preset (``tensorrt`` / ``onnxruntime``), the frontend
(``auto``: torch.export takes the models torch.fx cannot trace; ``fx``: partial tracing) and
whether ``compile`` gets example inputs; every failure message starts with the seed and the
case, so ``build(seed)`` reproduces it. ``QATGRAPH_RANDOM_CASES=1000`` runs more cases than the
default 40.
"""
from __future__ import annotations

import collections
import os

import onnx
import pytest
import random_architectures as ra
import torch

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.quant.qmodules import op_kind

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning")
CASES = int(os.environ.get("QATGRAPH_RANDOM_CASES", "40"))
# Rules the linter may warn about in untraced (eager) code, where no graph pass runs: the Add of a
# residual written in an untraced forward keeps its skip input in float (see docs/coverage.md).
EAGER_WARNINGS = {"residual-skip-unquantized"}


def case(seed: int) -> tuple[dict, bool]:
    preset = ("tensorrt", "onnxruntime")[seed % 2]
    frontend = ("auto", "fx")[(seed // 2) % 2]
    return {"preset": preset, "tracing": {"frontend": frontend}}, seed % 3 != 0


@pytest.mark.parametrize("seed", range(CASES))
def test_random_architecture(seed: int, tmp_path) -> None:
    model, description = ra.build(seed)
    policy, with_examples = case(seed)
    where = f"seed {seed}: {description}, policy {policy}, example_inputs {'yes' if with_examples else 'no'}"
    x = ra.images(2, seed)
    qmodel = qatgraph.compile(model, policy, example_inputs=(x,) if with_examples else None)
    report = qmodel.trace_report
    expected = "torch.export" if with_examples and policy["tracing"]["frontend"] == "auto" and \
        not _fx_traceable(description) else "torch.fx"
    assert report.frontend == expected, f"{where}: {report.describe()}"

    qatgraph.calibrate(qmodel, [ra.images(4, seed + 100), ra.images(4, seed + 200)], show_progress=False)
    summary = qatgraph.summary(qmodel, print_table=False)
    weighted = [name for name, module in model.named_modules() if op_kind(module) is not None]
    for name, module in model.named_modules():  # quantized in its GEMMs, or one float row (graph/attention_calls.py)
        if isinstance(module, torch.nn.MultiheadAttention):
            weighted += [f"{name}.in_proj", f"{name}.out_proj"] if any(
                row.layer == f"{name}.in_proj" for row in summary.rows) else [name]
    decisions = qmodel.qatgraph_info.layers
    assert sorted(d.layer for d in decisions if d.kind != "matmul") == sorted(weighted), where
    assert sorted(row.layer for row in summary.rows) == sorted(d.layer for d in decisions), where
    if with_examples:  # every attention GEMM is quantized or tiny, whichever frontend ran
        assert all(d.quantized or d.reason.startswith("tiny layer") for d in decisions
                   if d.kind in ("matmul", "attention")), f"{where}: {[(d.layer, d.reason) for d in decisions]}"

    path = str(tmp_path / "model.onnx")
    result = export_onnx(qmodel, path, x)
    assert result.errors == [], f"{where}: {[(f.rule, f.node) for f in result.errors]}"
    unexpected = {f.rule for f in result.warnings} - (EAGER_WARNINGS if not report.fully_traced else set())
    assert not unexpected, f"{where}: lint warnings {unexpected}; {report.describe()}"
    if with_examples and "residual-skip-unquantized" in {f.rule for f in result.warnings}:
        assert report.eager_adds and "residual rule not applied" in summary.trace, f"{where}: {summary.trace}"
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert ops["BatchNormalization"] == 0, f"{where}: BatchNorm left unfolded in the ONNX"
    parity = check_parity(qmodel, path, [ra.images(3, seed + 300)])
    assert parity.passed, f"{where}: {parity}"
    qmodel(ra.images(1, seed))  # the compiled model serves a batch of another size


def _fx_traceable(description: str) -> bool:
    return not any(name in description for name in ("indexed", "iterated", "gated", "branches", "attention"))


def test_traced_sequential_keeps_container_semantics() -> None:
    """The parent stays eager and indexes/iterates its traced body: items are graph segments
    (their quantizers included) that read missing attributes from the original child."""
    block = ra.IndexedBody(16).eval()
    qmodel = qatgraph.compile(block, {"preset": "tensorrt", "tracing": {"frontend": "fx"}})
    assert qmodel.trace_report.traced == ["body"]
    body = qmodel.body
    assert len(body) == 2 and len(list(body)) == 2 and len(body[1:]) == 1
    x = torch.randn(2, 16, 8, 8)
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    chained = x
    for item in body:
        chained = item(chained)
    torch.testing.assert_close(chained, body(x), rtol=0, atol=0)
    torch.testing.assert_close(body[1:](body[0](x)), body(x), rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range for a Sequential of 2"):
        body[2]

    flat = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU())
    qflat = qatgraph.compile(flat, "tensorrt")
    assert qflat[0].out_channels == 32 and qflat[0].weight is qflat.get_submodule("0").weight
    qatgraph.calibrate(qflat, [x], show_progress=False)
    torch.testing.assert_close(qflat[1](qflat[0](x)), qflat(x), rtol=0, atol=0)
