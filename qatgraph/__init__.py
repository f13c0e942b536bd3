"""qatgraph: a quantization-aware-training compiler for PyTorch that ships INT8 models to TensorRT.

    import qatgraph
    qmodel = qatgraph.compile(model, policy="tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, calib_batches, num_batches=16)
    qatgraph.summary(qmodel)
    # ... any PyTorch training loop on qmodel ...
"""
from __future__ import annotations

from . import distributed  # qatgraph.distributed.setup(), this_rank_only(), ... after `import qatgraph`
from .errors import (
    BackendUnavailableError,
    CalibrationError,
    DistributedError,
    ExportError,
    NotCalibratedError,
    PolicyError,
    QatgraphError,
    QatgraphWarning,
    SensitivityError,
    StateMismatchError,
    TraceError,
    UsageError,
)
from .info import CompileInfo, LayerDecision
from .pipeline import compile  # noqa: A004 - the public name users expect
from .policy import FreezeConfig, LayerRule, Policy, QuantSpec, SensitivityConfig, TracingConfig
from .quant.calibrate import calibrate
from .quant.quantizer import FakeQuantizer, iter_quantizers
from .sensitivity_analysis.probes import apply_skip
from .sensitivity_analysis.recommend import SkipRecommendation, recommend_skip
from .sensitivity_analysis.report import SensitivityReport
from .sensitivity_analysis.scores import sensitivity
from .summary import Summary, summary
from .train.ddp import wrap_ddp
from .train.finetune import FinetuneHistory, finetune, recipe

__version__ = "0.1.0"

__all__ = [
    "compile", "calibrate", "summary", "Summary", "finetune", "recipe", "FinetuneHistory", "wrap_ddp", "distributed",
    "sensitivity", "recommend_skip", "apply_skip", "SensitivityReport", "SkipRecommendation",
    "export_onnx", "ExportResult", "check_parity", "ParityReport", "build_engine",
    "Policy", "QuantSpec", "LayerRule", "FreezeConfig", "SensitivityConfig", "TracingConfig",
    "FakeQuantizer", "iter_quantizers", "CompileInfo", "LayerDecision", "QatgraphWarning",
    "QatgraphError", "PolicyError", "TraceError", "CalibrationError", "NotCalibratedError", "ExportError",
    "BackendUnavailableError", "SensitivityError", "DistributedError", "UsageError", "StateMismatchError",
]

# Backends last: they import the core modules above.
from qatgraph.backends.onnx import ExportResult, export_onnx  # noqa: E402
from qatgraph.backends.parity import ParityReport, check_parity  # noqa: E402
from qatgraph.backends.tensorrt import build_engine  # noqa: E402
