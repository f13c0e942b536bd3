"""Coverage beyond ResNets: every zoo case end to end, a YOLO-style detector, a UNet, partial tracing
end to end, and the coverage table.

Every zoo case (tests/coverage_cases.py) goes compile -> calibrate -> export (ONNX Q/DQ, opset 17)
-> lint -> ONNX Runtime parity; the parity batches have another size than the export example
(dynamic batch). Slow cases are marked ``slow``. ``python tests/test_coverage_models.py`` prints
the table of docs/coverage.md from real runs of every case. SDPA decomposition and transformer
encoders (hand-written and Hugging Face BERT through the torch.export frontend):
tests/test_coverage_attention.py.
"""
from __future__ import annotations

import logging
import os
import tempfile

import models  # tests/ is on sys.path: conftest.py under pytest, the script's folder when run as a script
import models_extra
import onnx
import pytest
import torch
from coverage_cases import (
    CASES,
    FX_ONLY,
    WARNING_FILTERS,
    CaseResult,
    case_params,
    compile_block,
    conv_model,
    parity_verdict,
    run_case,
)
from placement import quantized_edges, quantizer_targets
from torch import fx, nn

import qatgraph
from qatgraph import pipeline
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.passes import attention

pytestmark = WARNING_FILTERS


@pytest.mark.parametrize("name", case_params(list(CASES)))
def test_compile_calibrate_export_lint_parity(name: str, tmp_path) -> None:
    result = run_case(name, str(tmp_path))
    assert result.export.errors == [], [f"{f.rule} {f.node}" for f in result.export.errors]
    assert {f.rule for f in result.export.warnings} <= CASES[name].lint_warnings
    assert result.parity.passed, str(result.parity)
    assert result.export.num_qdq > 0


def dq_weight_axes(model: onnx.ModelProto, op_type: str) -> list[tuple[int, int, int]]:
    """(axis, scale length, output channels) of every INT8 weight DequantizeLinear feeding ``op_type``."""
    initializers = {init.name: init for init in model.graph.initializer}
    consumers = {name: node for node in model.graph.node for name in node.input}
    found = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers or \
                consumers.get(node.output[0]) is None or consumers[node.output[0]].op_type != op_type:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        weight_dims = list(initializers[node.input[0]].dims)
        out_channels = weight_dims[1] if op_type in ("MatMul", "ConvTranspose") else weight_dims[0]
        found.append((axis, int(initializers[node.input[1]].dims[0]), out_channels))
    return found


def test_bert_like_per_channel_weights_on_the_output_axis(tmp_path) -> None:
    """Linear on 3-D tokens exports as MatMul(x, W^T): axis 1; the pooler on 2-D as Gemm(transB=1): axis 0."""
    model = run_case("bert_like", str(tmp_path)).onnx_model
    matmul, gemm = dq_weight_axes(model, "MatMul"), dq_weight_axes(model, "Gemm")
    assert len(matmul) == 12 and all(axis == 1 and length == channels for axis, length, channels in matmul)
    assert len(gemm) == 1 and all(axis == 0 and length == channels for axis, length, channels in gemm)


def test_unet_conv_transpose_weights_per_channel_on_axis_1(tmp_path) -> None:
    result = run_case("unet", str(tmp_path))
    assert result.qmodel.up2.weight_quantizer.axis == 1
    assert dq_weight_axes(result.onnx_model, "ConvTranspose") == [(1, 32, 32), (1, 16, 16)]


# --------------------------------------------------------------------------- detectors and partial tracing
def test_yolo_placement() -> None:
    qmodel = compile_block(models_extra.YoloLike(), torch.randn(2, 3, 64, 64))
    info, targets, edges = qmodel.qatgraph_info, quantizer_targets(qmodel), quantized_edges(qmodel)
    assert all(info.layer(f"head.box.{level}.2").quantized for level in range(3))
    assert all("tiny" in info.layer(f"head.cls.{level}.2").reason for level in range(3))
    # C2f: the half that feeds the bottleneck is quantized with the concat's scale (rule 5).
    assert targets["getitem_1"] == targets["cat"] == "quantizers.cat"
    # A neck output read by the next neck conv and both head towers: one quantizer (rule 5).
    assert edges["neck_top3_cv2_2"] == {"neck_down3_0", "head_box_0_0_0", "head_cls_0_0_0"}


def test_yolo_with_input_check_traces_backbone_neck_and_towers() -> None:
    qmodel = compile_block(models_extra.YoloWithInputCheck(), torch.randn(2, 3, 64, 64), policy=FX_ONLY)
    report = qmodel.trace_report
    assert report.traced == ["backbone", "neck", "head.box.0", "head.box.1", "head.box.2",
                             "head.cls.0", "head.cls.1", "head.cls.2"]
    root, head = report.untraced
    assert "if x.shape[-1] % self.max_stride" in root.location and "concrete_args" in root.fix
    assert head.name == "head" and "for level, feature in enumerate(features)" in head.location
    assert report.eager_layers == [] and all(isinstance(qmodel.get_submodule(n), fx.GraphModule) for n in report.traced)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        qmodel(torch.randn(1, 3, 48, 48))


class KwargsForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = models.BasicBlock(16, 16)

    def forward(self, x: torch.Tensor, **kwargs: float) -> torch.Tensor:
        return self.block(x) * kwargs.get("gain", 1.0)


class AssertForward(KwargsForward):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 4, "expected an NCHW batch")
        return self.block(x)


def export_and_check(qmodel: nn.Module, path: str, x: torch.Tensor) -> None:
    qatgraph.calibrate(qmodel, [torch.randn(4, *x.shape[1:])], show_progress=False)
    result = export_onnx(qmodel, path, x)
    assert result.errors == [] and result.warnings == [] and result.num_qdq == 4
    assert check_parity(qmodel, path, [torch.randn(3, *x.shape[1:])]).passed


@pytest.mark.parametrize("wrapper", ["kwargs", "assert", "data_parallel_module"])
def test_wrapped_forwards_export_end_to_end(wrapper: str, tmp_path) -> None:
    x = torch.randn(2, 16, 8, 8)
    model = {"kwargs": KwargsForward, "assert": AssertForward,
             "data_parallel_module": lambda: nn.DataParallel(models.BasicBlock(16, 16))}[wrapper]()
    example = (x,)
    qmodel = qatgraph.compile(conv_model(lambda: model)(), "tensorrt", example_inputs=example)
    # ONNX exporters reject DataParallel itself; the wrapped module carries every quantizer.
    export_and_check(qmodel.module if wrapper == "data_parallel_module" else qmodel, str(tmp_path / "m.onnx"), x)


def test_kwargs_forward_with_example_inputs() -> None:
    qatgraph.compile(KwargsForward(), "tensorrt", example_inputs=(torch.randn(2, 16, 8, 8),))


def test_data_parallel_wrapper_exports(tmp_path) -> None:
    x = torch.randn(2, 16, 8, 8)
    qmodel = qatgraph.compile(nn.DataParallel(models.BasicBlock(16, 16)), "tensorrt")
    export_and_check(qmodel, str(tmp_path / "m.onnx"), x)


# --------------------------------------------------------------------------- the coverage table
def skip_reason(reason: str) -> str:
    if reason.startswith("tiny layer"):
        return "tiny"
    return "override" if "override" in reason else "skip list" if "skip list" in reason else reason


def coverage_row(name: str, result: CaseResult) -> dict[str, str]:
    layers = result.qmodel.qatgraph_info.layers
    matmuls = sum(d.kind == "matmul" for d in layers)
    skipped: dict[str, int] = {}
    for decision in layers:
        if not decision.quantized:
            skipped[skip_reason(decision.reason)] = skipped.get(skip_reason(decision.reason), 0) + 1
    eager = sum(d.eager and d.quantized for d in layers)
    nodes = result.onnx_model.graph.node
    activation_qdq = sum(n.op_type == "QuantizeLinear" for n in nodes)
    warnings = sorted({f.rule for f in result.export.warnings})
    parity = result.parity
    return {
        "model": name, "frontend": CASES[name].frontend if CASES[name].frontend != "torch.fx" else
                                   result.qmodel.trace_report.frontend,
        "traced": "whole" if result.qmodel.trace_report.fully_traced else
                  f"partial ({len(result.qmodel.trace_report.traced)} regions)",
        "weighted": f"{len(layers)} ({len(layers) - matmuls} conv/linear + {matmuls} matmul)",
        "quantized": f"{sum(d.quantized for d in layers)}" + (f" ({eager} module-wise)" if eager else ""),
        "skipped": ", ".join(f"{count} {why}" for why, count in sorted(skipped.items())) or "0",
        "qdq": f"{activation_qdq} act + {result.export.num_qdq - activation_qdq} weight",
        "lint": f"{len(result.export.errors)} errors, {len(result.export.warnings)} warnings"
                + (f" ({', '.join(warnings)})" if warnings else ""),
        "parity": f"{parity_verdict(parity)} (rel {parity.relative_error:.1e}, "
                  f"{parity.activation_mismatch or 0:.2%} ints differ by <= {parity.activation_max_steps}; "
                  f"forced rel {parity.forced_relative_error or 0:.0e})",
    }


COLUMNS = {"model": "model", "frontend": "frontend", "traced": "traced", "weighted": "weighted ops",
           "quantized": "quantized", "skipped": "skipped (reason)", "qdq": "Q/DQ in ONNX", "lint": "lint",
           "parity": "ORT parity"}


def format_table(rows: list[dict[str, str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row[key] for key in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def test_coverage_row_counts_are_consistent(tmp_path) -> None:
    result = run_case("unet", str(tmp_path))
    row = coverage_row("unet", result)
    assert row["weighted"] == "13 (13 conv/linear + 0 matmul)" and row["quantized"] == "11"
    assert row["skipped"] == "2 tiny" and row["qdq"] == "11 act + 11 weight"
    assert row["lint"] == "0 errors, 0 warnings" and not row["parity"].startswith("failed")
    assert format_table([row]).splitlines()[2].count("|") == len(COLUMNS) + 1


def main() -> None:
    """Print docs/coverage.md's table from real runs of every case."""
    if not any(graph_pass is attention.run for _, graph_pass in pipeline.PASSES):
        pipeline.PASSES.insert(0, ("attention", attention.run))
    logging.disable(logging.WARNING)
    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py
    os.environ.setdefault("QATGRAPH_NO_PROGRESS", "1")
    with tempfile.TemporaryDirectory() as directory:
        print(format_table([coverage_row(name, run_case(name, directory)) for name in CASES]))


if __name__ == "__main__":
    main()
