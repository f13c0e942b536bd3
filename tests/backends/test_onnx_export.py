"""Tests for qatgraph.backends.onnx.export_onnx: Q/DQ structure, lint, size, dynamic batch,
atomic writes, errors, BN folding, learnable scales, low-bit formats and both exporters."""
from __future__ import annotations

import io
import os
import warnings
from collections import Counter

import models
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

import qatgraph
from qatgraph.backends import onnx as onnx_backend
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.onnxruntime import OrtRunner
from qatgraph.backends.parity import check_parity
from qatgraph.errors import ExportError
from qatgraph.passes.materialize import quantizer_nodes
from qatgraph.quant.quantizer import iter_quantizers

WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def compile_calibrated(factory, shape, policy="tensorrt", batches=2, seed=0):
    models.seed_everything(seed)
    model = factory().eval()
    models.randomize_batchnorm(model)
    example = torch.randn(shape)
    qmodel = qatgraph.compile(model, policy, example_inputs=(example,))
    qatgraph.calibrate(qmodel, [torch.randn(8, *shape[1:]) for _ in range(batches)], show_progress=False)
    return qmodel, example


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {init.name: init.data_type for init in model.graph.initializer}


def expected_weight_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
    return 1 if node.op_type == "MatMul" else 0


def assert_qdq_structure(model: onnx.ModelProto, qmodel: nn.Module, target: str = "tensorrt") -> None:
    """Q/DQ only, INT8 weights feeding weighted ops on the right axis, valid scales/zero points."""
    ops = Counter(node.op_type for node in model.graph.node)
    assert "BatchNormalization" not in ops
    assert not [op for op in ops if op.startswith("QLinear") or op.endswith("Integer")]
    values, types = initializers(model), initializer_types(model)
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weight_dqs = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        assert node.input[0] not in values or node.op_type == "DequantizeLinear", "float weight quantized at run time"
        scale = values[node.input[1]]
        assert types[node.input[1]] == TensorProto.FLOAT and np.all(scale > 0) and np.all(np.isfinite(scale))
        zero_point_type = types[node.input[2]]
        if node.op_type == "DequantizeLinear" and node.input[0] in values:  # an INT8 weight
            weight_dqs += 1
            assert types[node.input[0]] == TensorProto.INT8 and zero_point_type == TensorProto.INT8
            assert not values[node.input[2]].any()
            assert values[node.input[0]].min() >= -127  # narrow range survives
            (user,) = consumers[node.output[0]]
            assert user.op_type in WEIGHTED and list(user.input).index(node.output[0]) == 1
            axis = next(a.i for a in node.attribute if a.name == "axis")
            assert axis == expected_weight_axis(user)
            assert scale.shape == (values[node.input[0]].shape[axis],)
        elif target == "tensorrt":
            assert zero_point_type == TensorProto.INT8 and not values[node.input[2]].any()
    regions = [m for m in qmodel.modules() if isinstance(m, torch.fx.GraphModule) and "qatgraph_prefix" in m.meta]
    assert ops["QuantizeLinear"] == sum(len(quantizer_nodes(gm)) for gm in regions)
    assert weight_dqs == sum(1 for _, q in iter_quantizers(qmodel) if q.is_weight and q.is_enabled)


def assert_batch_dynamic(model: onnx.ModelProto) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch", value.name


@pytest.fixture(scope="module")
def zoo_exports(tmp_path_factory):
    directory = tmp_path_factory.mktemp("zoo")
    exports = {}
    for name, (factory, shape) in models.ZOO.items():
        qmodel, example = compile_calibrated(factory, shape)
        result = export_onnx(qmodel, directory / f"{name}.onnx", example)
        exports[name] = (qmodel, example, result, onnx.load(result.path))
    return exports


@pytest.mark.parametrize("name", list(models.ZOO))
def test_zoo_export_is_clean_qdq(zoo_exports, name):
    qmodel, _, result, model = zoo_exports[name]
    assert (result.opset, result.exporter) == (17, "torchscript")
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    onnx.checker.check_model(model, full_check=True)
    assert result.findings == []  # lint clean for TensorRT: no error and no warning
    assert_qdq_structure(model, qmodel)
    assert result.num_qdq == Counter(n.op_type for n in model.graph.node)["DequantizeLinear"] > 0
    assert result.num_nodes == len(model.graph.node) and result.size_bytes == os.path.getsize(result.path)


@pytest.mark.parametrize("name", list(models.ZOO))
def test_zoo_export_has_dynamic_batch(zoo_exports, name):
    _, example, result, model = zoo_exports[name]
    assert_batch_dynamic(model)
    runner = OrtRunner(result.path)
    for batch in (1, 5):
        (output,) = runner(torch.randn(batch, *example.shape[1:]))
        assert output.shape == (batch, models.NUM_CLASSES)


def fp32_size(model: nn.Module, example: torch.Tensor) -> int:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the same exporter export_onnx uses at opset 17
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=17)
    return len(buffer.getvalue())


@pytest.mark.parametrize("name", ["resnet18", pytest.param("vgg", marks=pytest.mark.slow),
                                  pytest.param("mobilenetv2", marks=pytest.mark.slow),
                                  pytest.param("vit", marks=pytest.mark.slow)])
def test_zoo_export_is_about_4x_smaller_than_fp32(zoo_exports, name):
    _, example, result, model = zoo_exports[name]
    factory, _ = models.ZOO[name]
    models.seed_everything(0)
    float_size = fp32_size(models.randomize_batchnorm(factory().eval()), example)
    quantized_params = sum(values.size for key, values in initializers(model).items() if values.dtype == np.int8)
    # Each quantized weight shrinks from 4 bytes to 1; what stays float (the RGB stem, the
    # 10-class head, depthwise biases and scales, embeddings) bounds the overall ratio.
    assert float_size - result.size_bytes >= 0.8 * 3 * quantized_params
    if name in ("resnet18", "vgg"):  # dominated by quantized weights
        assert float_size / result.size_bytes > 3.5


@pytest.mark.parametrize("name", list(models.BLOCKS))
def test_golden_block_exports(tmp_path, name):
    factory, shape = models.BLOCKS[name]
    qmodel, example = compile_calibrated(factory, shape)
    result = export_onnx(qmodel, tmp_path / "block.onnx", example)
    model = onnx.load(result.path)
    assert result.findings == []
    assert_qdq_structure(model, qmodel)
    assert_batch_dynamic(model)
    (output,) = OrtRunner(result.path)(torch.randn(3, *shape[1:]))
    assert output.shape[0] == 3


class TransposeNet(nn.Module):
    """Conv -> ConvTranspose (weight axis 1 holds the output channels) -> Conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 24, 2, stride=2)
        self.bn = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.head = nn.Conv2d(24, 16, 1)

    def forward(self, x):
        return self.head(self.relu(self.bn(self.up(torch.relu(self.conv(x))))))


def test_conv_transpose_weights_are_per_channel_on_axis_1(tmp_path):
    qmodel, example = compile_calibrated(TransposeNet, (2, 16, 8, 8))
    result = export_onnx(qmodel, tmp_path / "up.onnx", example)
    model = onnx.load(result.path)
    assert_qdq_structure(model, qmodel)  # checks axis 1 and 24 scales for the ConvTranspose
    (deconv,) = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    dq = next(n for n in model.graph.node if n.output[0] == deconv.input[1])
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    assert result.errors == []
    report = check_parity(qmodel, result.path, torch.randn(8, 16, 8, 8))
    assert report.relative_error < 1e-2 and report.activation_max_steps <= 2  # float-rounding flips only


def test_uncalibrated_model_is_rejected(tmp_path):
    model = models.ConvBNReLUStack().eval()
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(torch.randn(2, 16, 8, 8),))
    with pytest.raises(ExportError) as info:
        export_onnx(qmodel, tmp_path / "m.onnx", torch.randn(2, 16, 8, 8))
    assert "run qatgraph.calibrate first" in str(info.value) and "quantizers.x" in str(info.value)
    assert os.listdir(tmp_path) == []


def skipped_weight_model():
    """A block whose second conv has its weight quantizer disabled: a lint error (mixed inputs)."""
    qmodel, example = compile_calibrated(models.ConvBNReLUStack, (2, 16, 8, 8))
    qmodel.get_submodule("layers.1.0").weight_quantizer.disable()
    return qmodel, example


def test_disabled_quantizers_vanish(tmp_path):
    qmodel, example = skipped_weight_model()
    activation = qmodel.get_submodule("quantizers.x")
    activation.disable()
    model = onnx.load(export_onnx(qmodel, tmp_path / "m.onnx", example).path)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 2 + 2  # 3 activations, 3 weights, minus 1 each
    assert initializer_types(model)["layers.1.0.weight"] == TensorProto.FLOAT  # the float weight stays
    assert [n.op_type for n in model.graph.node if "x" in n.input] == ["Conv"]  # the input is no longer quantized


def test_strict_export_raises_and_writes_nothing(tmp_path):
    qmodel, example = skipped_weight_model()
    relaxed = export_onnx(qmodel, tmp_path / "relaxed.onnx", example)
    assert [f.rule for f in relaxed.errors] == ["weighted-input-unquantized"]
    with pytest.raises(ExportError, match="weighted-input-unquantized"):
        export_onnx(qmodel, tmp_path / "strict.onnx", example, strict=True)
    assert sorted(os.listdir(tmp_path)) == ["relaxed.onnx"]


@pytest.mark.parametrize("failure", ["exporter", "checker", "lint"])
def test_failed_export_keeps_the_existing_file(tmp_path, monkeypatch, failure):
    qmodel, example = compile_calibrated(models.DepthwiseSeparable, (2, 32, 8, 8))
    path = tmp_path / "model.onnx"
    good = export_onnx(qmodel, path, example)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure")
    if failure == "exporter":
        monkeypatch.setattr(onnx_backend, "_export_torchscript", boom)
    elif failure == "checker":
        def invalid(*args, **kwargs):
            raise onnx.checker.ValidationError("simulated invalid model")
        monkeypatch.setattr(onnx.checker, "check_model", invalid)
    else:
        monkeypatch.setattr(onnx_backend, "lint_model", boom)
    with pytest.raises((ExportError, RuntimeError), match="simulated"):
        export_onnx(qmodel, path, example)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["model.onnx"]  # no temporary left
    assert good.size_bytes == len(before)
    with pytest.raises((ExportError, RuntimeError)):
        export_onnx(qmodel, tmp_path / "new.onnx", example)
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_export_leaves_the_qat_model_untouched(tmp_path):
    qmodel, example = compile_calibrated(lambda: models.BasicBlock(16, 32, stride=2), (2, 16, 8, 8))
    state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    qmodel.train()
    export_onnx(qmodel, tmp_path / "m.onnx", example)
    assert qmodel.training and any(isinstance(m, nn.BatchNorm2d) for m in qmodel.modules())
    after = qmodel.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_bn_train_and_bn_fold_export_the_same_model(tmp_path):
    outputs = {}
    for mode in ("train", "fold"):
        qmodel, example = compile_calibrated(models.resnet18_like, (2, 3, 32, 32),
                                             policy={"preset": "tensorrt", "bn": mode})
        result = export_onnx(qmodel, tmp_path / f"{mode}.onnx", example)
        assert "BatchNormalization" not in {n.op_type for n in onnx.load(result.path).graph.node}
        outputs[mode] = OrtRunner(result.path)(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)))[0]
        weights = initializers(onnx.load(result.path))
        outputs[mode + "_weights"] = {k: v for k, v in weights.items() if v.dtype == np.int8}
    # Folding at export rescales each channel's weight scale exactly: the same integers ...
    assert outputs["train_weights"].keys() == outputs["fold_weights"].keys()
    for key, train_weight in outputs["train_weights"].items():
        assert np.mean(train_weight != outputs["fold_weights"][key]) < 1e-3, key  # ties of float rounding only
    # ... and, up to float-rounding flips of intermediate activations, the same outputs.
    train, fold = outputs["train"], outputs["fold"]
    print("bn train vs fold: relative", np.abs(train - fold).max() / np.abs(fold).max(), "weights differing",
          max(np.mean(w != outputs["fold_weights"][k]) for k, w in outputs["train_weights"].items()))
    assert (train.argmax(1) == fold.argmax(1)).all()
    assert np.abs(train - fold).max() / np.abs(fold).max() < 2e-2


def test_learnable_scales_export_as_plain_qdq_constants(tmp_path):
    policy = {"preset": "tensorrt", "activation": {"learnable_scale": True, "calibrator": "max"},
              "weight": {"learnable_scale": True}}
    qmodel, example = compile_calibrated(models.LinearHead, (2, 64, 8, 8), policy=policy)
    assert any(isinstance(q.scale, nn.Parameter) for _, q in iter_quantizers(qmodel))
    reference, _ = compile_calibrated(models.LinearHead, (2, 64, 8, 8))
    result = export_onnx(qmodel, tmp_path / "lsq.onnx", example)
    plain = export_onnx(reference, tmp_path / "plain.onnx", example)
    model = onnx.load(result.path)
    assert Counter(n.op_type for n in model.graph.node) == Counter(n.op_type for n in onnx.load(plain.path).graph.node)
    assert [i.name for i in model.graph.input] == ["x"]  # scales are initializers, not inputs
    assert_qdq_structure(model, qmodel)
    report = check_parity(qmodel, result.path, torch.randn(8, 64, 8, 8))
    assert report.activation_max_steps <= 2 and report.relative_error < 1e-2


def test_4bit_weights_export_as_int8_in_the_narrow_4bit_range(tmp_path):
    policy = {"preset": "tensorrt", "weight": {"bits": 4}}
    qmodel, example = compile_calibrated(models.DepthwiseSeparable, (2, 32, 8, 8), policy=policy)
    model = onnx.load(export_onnx(qmodel, tmp_path / "w4.onnx", example).path)
    weights = [v for v in initializers(model).values() if v.dtype == np.int8 and v.ndim == 4]
    assert len(weights) == 2 and all(w.min() >= -7 and w.max() <= 7 for w in weights)
    assert max(w.max() for w in weights) == 7
    report = check_parity(qmodel, tmp_path / "w4.onnx", torch.randn(8, 32, 8, 8))
    assert report.activation_max_steps <= 2 and report.relative_error < 1e-2


@pytest.mark.parametrize("preset, zero_point_type", [("tensorrt", TensorProto.INT4), ("onnxruntime", TensorProto.UINT4)])
def test_4bit_activations_need_opset_21(tmp_path, preset, zero_point_type):
    policy = {"preset": preset, "activation": {"bits": 4, "input_bits": None}, "weight": {"bits": 4}}  # input too
    qmodel, example = compile_calibrated(lambda: models.BasicBlock(16, 32, stride=2), (2, 16, 8, 8), policy=policy)
    with pytest.raises(ExportError, match="opset 21"):
        export_onnx(qmodel, tmp_path / "a4.onnx", example)
    assert os.listdir(tmp_path) == []
    result = export_onnx(qmodel, tmp_path / "a4.onnx", example, opset=21)
    model = onnx.load(result.path)
    assert result.exporter == "dynamo" and result.errors == []
    types = initializer_types(model)
    activation_zero_points = [types[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zero_points and set(activation_zero_points) == {zero_point_type}
    runner = OrtRunner(result.path, quantize_bias=False)
    assert runner.optimization == "basic"  # ORT 1.32's QLinearConv fusion rejects INT4
    report = check_parity(qmodel, result.path, torch.randn(8, 16, 8, 8), runner=runner)
    assert report.activation_max_steps <= 2 and report.relative_error < 1e-2


def test_narrow_range_activations_are_rejected(tmp_path):
    policy = {"preset": "tensorrt", "activation": {"narrow_range": True}}
    qmodel, example = compile_calibrated(models.DepthwiseSeparable, (2, 32, 8, 8), policy=policy)
    with pytest.raises(ExportError, match=r"no integer type with this range"):
        export_onnx(qmodel, tmp_path / "m.onnx", example)


def test_opset_and_exporter_validation(tmp_path):
    qmodel, example = compile_calibrated(models.DepthwiseSeparable, (2, 32, 8, 8))
    with pytest.raises(ExportError, match="axis"):
        export_onnx(qmodel, tmp_path / "m.onnx", example, opset=12)
    with pytest.raises(ExportError, match="torchscript"):
        export_onnx(qmodel, tmp_path / "m.onnx", example, opset=17, exporter="dynamo")
    with pytest.raises(ExportError, match="did you mean 'dynamo'"):
        export_onnx(qmodel, tmp_path / "m.onnx", example, exporter="dynamic")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["basic_downsample", pytest.param("attention", marks=pytest.mark.slow)])
def test_dynamo_exporter_at_opset_18(tmp_path, name):
    factory, shape = models.BLOCKS[name]
    qmodel, example = compile_calibrated(factory, shape)
    result = export_onnx(qmodel, tmp_path / "m.onnx", example[:1], opset=18, input_names=["images"],
                         output_names=["features"])
    model = onnx.load(result.path)
    assert result.exporter == "dynamo" and result.findings == []
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["features"]
    assert_qdq_structure(model, qmodel)
    assert_batch_dynamic(model)  # traced from a batch of 1
    report = check_parity(qmodel, result.path, torch.randn(5, *shape[1:]))
    assert report.activation_max_steps <= 2 and report.relative_error < 1e-2


def test_static_batch_export(tmp_path):
    qmodel, example = compile_calibrated(models.DepthwiseSeparable, (2, 32, 8, 8))
    model = onnx.load(export_onnx(qmodel, tmp_path / "m.onnx", example, dynamic_batch=False).path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
