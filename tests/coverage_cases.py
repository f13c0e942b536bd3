"""The model-coverage cases of tests/test_coverage_models.py and their helpers.

``CASES`` maps a name to a ``Case`` (model factory, input builder, expected lint warnings, policy,
frontend); ``run_case`` goes compile -> calibrate -> export (ONNX Q/DQ, opset 17) -> lint -> ONNX
Runtime parity on batches of another size than the export example (dynamic batch) and returns a
``CaseResult``. Also the input builders (``images``, ``tokens``), ``compile_block``, and the
warning filters every coverage test runs under (``WARNING_FILTERS``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import models  # tests/ is on sys.path: conftest.py under pytest, the script's folder when run as a script
import models_arch
import models_extra
import onnx
import pytest
import torch
from torch import fx, nn

import qatgraph
from qatgraph.backends.onnx import ExportResult, export_onnx
from qatgraph.backends.parity import ParityReport, check_parity
from qatgraph.graph import frontends

WARNING_FILTERS = pytest.mark.filterwarnings(
    "ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning",
    "ignore:Exporting aten.*index operator:UserWarning")
TOKEN_NAMES = ("input_ids", "attention_mask")


# --------------------------------------------------------------------------- the cases
@dataclass
class Case:
    build: Callable[[], nn.Module]  # the model handed to qatgraph.compile
    inputs: Callable[[int, int], tuple]  # (batch, seed) -> forward's positional arguments
    tokens: bool = False  # calibrate with {"input_ids", "attention_mask"} dicts
    slow: bool = False
    lint_warnings: frozenset[str] = frozenset()  # lint warnings this case is known to get (see docs)
    frontend: str = "torch.fx"
    policy: Any = "tensorrt"


def images(shape: tuple[int, ...]) -> Callable[[int, int], tuple]:
    return lambda batch, seed: models_extra.image_batch((batch, *shape), seed)


def tokens(batch: int, seed: int) -> tuple:
    return models_extra.token_batch(batch, models_extra.SEQUENCE_LENGTH, seed)


def conv_model(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: models.randomize_batchnorm(factory(), torch.Generator().manual_seed(1)).eval()


def hf_exported(implementation: str) -> nn.Module:
    return frontends.export_graph(models_extra.hf_bert(implementation), kwargs=dict(zip(TOKEN_NAMES, tokens(2, 0))))


FX_ONLY = {"preset": "tensorrt", "tracing": {"frontend": "fx"}}
CASES: dict[str, Case] = {
    "unet": Case(conv_model(models_extra.UNetLike), images((3, 32, 32))),
    "bert_like": Case(models_extra.BertLikeEncoder, tokens, tokens=True),
    "vit_sdpa": Case(models_extra.vit_sdpa_like, images((3, 32, 32)), slow=True),
    "vit_mha": Case(models_arch.VitMha, images((3, 32, 32))),
    "swin_window": Case(models_arch.SwinLike, images((3, 32, 32))),
    "efficientnet_mbconv": Case(conv_model(models_arch.EfficientNetLike), images((3, 32, 32))),
    "yolo": Case(conv_model(models_extra.YoloLike), images((3, 64, 64)), slow=True),
    # tracing.frontend fx: partial torch.fx tracing (auto would export it whole with torch.export).
    "yolo_input_check": Case(conv_model(models_extra.YoloWithInputCheck), images((3, 64, 64)), slow=True,
                             policy=FX_ONLY),
    "hf_bert_eager": Case(lambda: hf_exported("eager"), tokens, tokens=True, slow=True, frontend="torch.export"),
    "hf_bert_sdpa": Case(lambda: hf_exported("sdpa"), tokens, tokens=True, slow=True, frontend="torch.export"),
    # Without the frontend: what partial torch.fx tracing reaches (for the coverage table).
    "hf_bert_sdpa_fx": Case(lambda: models_extra.hf_bert("sdpa"), tokens, tokens=True, slow=True,
                            lint_warnings=frozenset({"residual-skip-unquantized"}), policy=FX_ONLY),
    # Plain qatgraph.compile: tracing.frontend auto falls back to torch.export.
    "hf_bert_auto": Case(lambda: models_extra.hf_bert("sdpa"), tokens, tokens=True, slow=True,
                         frontend="torch.export (auto)"),
}


@dataclass
class CaseResult:
    qmodel: nn.Module
    export: ExportResult
    parity: ParityReport
    onnx_model: onnx.ModelProto


def calibration_batches(case: Case) -> list[Any]:
    batches = [case.inputs(4, seed) for seed in (1, 2)]
    return [dict(zip(TOKEN_NAMES, b)) for b in batches] if case.tokens else batches


def run_case(name: str, directory: str) -> CaseResult:
    case = CASES[name]
    torch.manual_seed(0)
    example = case.inputs(2, 0)
    qmodel = qatgraph.compile(case.build(), case.policy, example_inputs=example)
    qatgraph.calibrate(qmodel, calibration_batches(case), show_progress=False)
    path = os.path.join(directory, f"{name}.onnx")
    result = export_onnx(qmodel, path, example)
    parity = check_parity(qmodel, path, [case.inputs(3, seed) for seed in (3, 4)])
    return CaseResult(qmodel, result, parity, onnx.load(path))


def case_params(names: list[str]) -> list[Any]:
    return [pytest.param(n, marks=pytest.mark.slow) if CASES[n].slow else n for n in names]


def parity_verdict(report: ParityReport) -> str:
    """``exact`` (the strict criterion holds free-running), ``near-tie rounding`` or ``failed``.

    ORT and PyTorch sum GEMMs and LayerNorms in different orders (and in a machine-dependent
    way: the kernels follow the CPU's vector width and thread count); a value within ~1e-5 step
    of a rounding tie then lands one integer away, and the model amplifies it downstream, so a
    float output can move by more than 1e-4 relative free-running. The teacher-forced check
    (PyTorch fed ORT's integers) tells that apart from an export bug: see ParityReport.
    """
    if report.strict_passed:
        return "exact"
    return "near-tie rounding" if report.passed else "failed"


def compile_block(block: nn.Module, *inputs: torch.Tensor, policy: Any = "tensorrt") -> fx.GraphModule:
    return qatgraph.compile(block.eval(), policy, example_inputs=inputs)
