"""qatgraph: a quantization-aware-training compiler for PyTorch that ships INT8 models to TensorRT.

    import qatgraph
    qmodel = qatgraph.compile(model, policy="tensorrt", example_inputs=(x,))
    qatgraph.calibrate(qmodel, calib_batches, num_batches=16)
    qatgraph.summary(qmodel)
    # ... any PyTorch training loop on qmodel ...
"""
from __future__ import annotations

from .calibrate import calibrate
from .errors import (
                     BackendUnavailableError,
                     CalibrationError,
                     ExportError,
                     NotCalibratedError,
                     PolicyError,
                     QatgraphError,
                     SensitivityError,
                     TraceError,
)
from .finetune import FinetuneHistory, finetune, recipe
from .info import CompileInfo, LayerDecision, QatgraphWarning
from .layer_quantizers import apply_skip
from .pipeline import compile  # noqa: A004 - the public name users expect
from .policy import (
                     FreezeConfig,
                     LayerRule,
                     Policy,
                     QuantSpec,
                     SensitivityConfig,
                     TracingConfig,
)
from .quantizer import FakeQuantizer, iter_quantizers
from .sensitivity_analysis import recommend_skip, sensitivity
from .sensitivity_report import SensitivityReport, SkipRecommendation
from .summary import Summary, summary

__version__ = "0.1.0"

__all__ = [
    "compile", "calibrate", "summary", "Summary", "finetune", "recipe", "FinetuneHistory",
    "sensitivity", "recommend_skip", "apply_skip", "SensitivityReport", "SkipRecommendation",
    "export_onnx", "ExportResult", "check_parity", "ParityReport", "build_engine",
    "Policy", "QuantSpec", "LayerRule", "FreezeConfig", "SensitivityConfig", "TracingConfig",
    "FakeQuantizer", "iter_quantizers", "CompileInfo", "LayerDecision", "QatgraphWarning",
    "QatgraphError", "PolicyError", "TraceError", "CalibrationError", "NotCalibratedError", "ExportError",
    "BackendUnavailableError", "SensitivityError",
]

# Backends last: they import the core modules above.
from qatgraph.backends.onnx import ExportResult, export_onnx  # noqa: E402
from qatgraph.backends.parity import ParityReport, check_parity  # noqa: E402
from qatgraph.backends.tensorrt import build_engine  # noqa: E402
