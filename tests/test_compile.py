"""End-to-end behaviour of compile + calibrate on the test zoo, and bad input handled clearly."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import ZOO, BasicBlock, resnet18_like
from torch import nn

import qatgraph
from qatgraph.errors import (
    CalibrationError,
    NotCalibratedError,
    PolicyError,
    TraceError,
)


def calibration_batches(shape, count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_ptq_stays_close_to_fp32(name):
    factory, shape = ZOO[name]
    model = factory().eval()
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(torch.randn(*shape),))
    qatgraph.calibrate(qmodel, calibration_batches(shape, 4))
    x = torch.randn(8, *shape[1:])
    with torch.no_grad():
        reference, quantized = model(x), qmodel.eval()(x)
    cosine = F.cosine_similarity(reference.flatten(), quantized.flatten(), dim=0)
    assert cosine > 0.99, f"{name}: PTQ cosine {cosine:.4f}"
    assert qmodel.qatgraph_info.quantized_layers, "something was quantized"


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_training_steps_lower_the_loss(name):
    factory, shape = ZOO[name]
    torch.manual_seed(0)
    qmodel = qatgraph.compile(factory(), "tensorrt", example_inputs=(torch.randn(*shape),))
    qatgraph.calibrate(qmodel, calibration_batches(shape, 2))
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    qmodel.train()
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(qmodel(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"{name}: {losses}"


def test_original_model_is_not_modified():
    model = resnet18_like().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qatgraph.compile(model, {"preset": "tensorrt", "bn": "fold"}, example_inputs=(torch.randn(1, 3, 32, 32),))
    assert type(model.layer1[0].conv1) is nn.Conv2d
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip_into_a_fresh_compile():
    shape = (2, 3, 32, 32)
    policy = {"preset": "tensorrt", "activation": {"learnable_scale": True}}
    qmodel = qatgraph.compile(resnet18_like(), policy, example_inputs=(torch.randn(*shape),))
    qatgraph.calibrate(qmodel, calibration_batches(shape))
    qmodel.quantizers.layer1_0_relu.disable()
    state = qmodel.state_dict()
    assert "layer1.0.conv1.weight" in state and "layer1.0.conv1.weight_quantizer.scale" in state
    fresh = qatgraph.compile(resnet18_like(), policy, example_inputs=(torch.randn(*shape),))
    fresh.load_state_dict(state)
    assert not fresh.quantizers.layer1_0_relu.is_enabled
    assert fresh.quantizers.relu.is_calibrated
    assert isinstance(fresh.quantizers.relu.scale, nn.Parameter)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(qmodel.eval()(x), fresh.eval()(x))


def test_compiled_model_state_dict_loads_into_original_model_with_strict_false():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    original = resnet18_like()
    missing, unexpected = original.load_state_dict(qmodel.state_dict(), strict=False)
    assert not missing and all("quantizer" in key for key in unexpected)


def test_eager_region_quantizer_state_survives(tmp_path):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = BasicBlock(16, 16)
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            x = self.block(x)
            return self.conv(x) if x.mean() > -10 else x

    shape = (2, 16, 8, 8)
    qmodel = qatgraph.compile(Branchy(), "tensorrt", example_inputs=(torch.randn(*shape),))
    assert qmodel.trace_report.traced == ["block"] and qmodel.trace_report.eager_layers == ["conv"]
    qatgraph.calibrate(qmodel, calibration_batches(shape))
    path = tmp_path / "state.pt"
    torch.save(qmodel.state_dict(), path)
    fresh = qatgraph.compile(Branchy(), "tensorrt", example_inputs=(torch.randn(*shape),))
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(qmodel.eval()(x), fresh.eval()(x))


def test_uncalibrated_model_raises_clear_error():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    with pytest.raises(NotCalibratedError, match=r"quantizers\.relu.*qatgraph\.calibrate"):
        qmodel(torch.randn(1, 3, 32, 32))


def test_nan_in_calibration_names_the_quantizer_and_keeps_old_scales():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    qatgraph.calibrate(qmodel, calibration_batches((2, 3, 32, 32)))
    before = qmodel.quantizers.relu.scale.clone()
    bad = torch.randn(2, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"quantizer 'quantizers\.relu' received NaN values in calibration batch 2"):
        qatgraph.calibrate(qmodel, [torch.randn(2, 3, 32, 32), bad])
    assert torch.equal(qmodel.quantizers.relu.scale, before), "a failed calibration changes no scale"
    assert not any(q.collecting for _, q in qatgraph.iter_quantizers(qmodel))


def test_inf_in_calibration_is_reported():
    qmodel = qatgraph.compile(resnet18_like(), "onnxruntime")  # quantizes the model input itself
    with pytest.raises(CalibrationError, match="quantizers.x.*Inf"):
        qatgraph.calibrate(qmodel, [torch.full((1, 3, 32, 32), float("inf"))])


def test_empty_calibration_data():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    with pytest.raises(CalibrationError, match="no batches"):
        qatgraph.calibrate(qmodel, [])
    with pytest.raises(CalibrationError, match="num_batches"):
        qatgraph.calibrate(qmodel, calibration_batches((1, 3, 32, 32)), num_batches=0)


def test_calibration_with_labels_via_input_fn_and_num_batches():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    loader = [(x, torch.zeros(2, dtype=torch.long)) for x in calibration_batches((2, 3, 32, 32), 5)]
    amax = qatgraph.calibrate(qmodel, iter(loader), num_batches=2, input_fn=lambda batch: batch[0])
    assert "quantizers.relu" in amax and all(value > 0 for value in amax.values())


def test_nothing_quantizable_warns_and_returns_a_usable_model():
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.warns(qatgraph.QatgraphWarning, match="quantized no layer"):
        qmodel = qatgraph.compile(model, "tensorrt")
    x = torch.randn(2, 3, 4)
    assert torch.equal(qmodel(x), model(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qatgraph.calibrate(qmodel, [x])  # no quantizer: a no-op, not an error


def test_untraceable_model_without_quantizable_layers_errors_with_the_line():
    class Untraceable(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x

    with pytest.raises(TraceError, match=r"test_compile\.py:\d+ `if x\.sum\(\) > 0:`.*concrete_args"):
        qatgraph.compile(Untraceable(), "tensorrt")


def test_invalid_policy_is_a_policy_error_naming_the_key():
    with pytest.raises(PolicyError, match="activaton.*did you mean 'activation'"):
        qatgraph.compile(resnet18_like(), {"preset": "tensorrt", "activaton": {"bits": 8}})
    with pytest.raises(PolicyError, match="matches no module.*did you mean.*'layer1.0.conv1'"):
        qatgraph.compile(resnet18_like(), {"preset": "tensorrt", "overrides": [{"name": "layer1.0.conv", "skip": True}]})


def test_summary_lists_every_decision(capsys):
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt")
    result = qatgraph.summary(qmodel)
    printed = capsys.readouterr().out
    assert "layer1.0.conv1" in printed and "tiny layer" in printed and "INT8" in printed
    assert len(result.rows) == 21 and len(result.quantized) == 19
    assert result.to_dict()["layers"][0]["layer"] == "conv1"


def test_compiled_model_moves_and_trains_in_double():
    qmodel = qatgraph.compile(resnet18_like(), "tensorrt").double()
    qatgraph.calibrate(qmodel, [torch.randn(2, 3, 32, 32, dtype=torch.float64)])
    out = qmodel(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert out.dtype == torch.float64
    out.sum().backward()


def test_compile_in_train_mode_leaves_batchnorm_statistics_alone_and_takes_batch_one():
    """Shape propagation runs the example inputs in eval mode: a batch of one is fine and BatchNorm's
    running statistics stay those of the original model."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 32), nn.BatchNorm1d(32)).train()
    qmodel = qatgraph.compile(model, "tensorrt", example_inputs=(torch.randn(1, 3, 8, 8) * 5 + 3,))
    assert qmodel.training
    for name in ("1", "6"):
        original, compiled = model.get_submodule(name), qmodel.get_submodule(name)
        assert torch.equal(original.running_mean, compiled.running_mean), name
        assert torch.equal(original.running_var, compiled.running_var), name
        assert int(compiled.num_batches_tracked) == 0, name
