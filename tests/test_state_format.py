"""A quantizer's saved state carries its format; loading refuses state it cannot hold (issue: an
INT8 state loaded into a 4-bit model reported "All keys matched" and kept INT8 scales; an
asymmetric zero point 131 loaded into a symmetric quantizer exported as -125)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qatgraph
from qatgraph.errors import ExportError, StateMismatchError
from qatgraph.quant.quantizer import iter_quantizers

POLICY = {"preset": "tensorrt", "min_channels": 0}


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10)).eval()


X = torch.randn(4, 3, 8, 8)


def compiled(policy: dict, calibrate: bool = True) -> nn.Module:
    qmodel = qatgraph.compile(small_model(), policy, example_inputs=(X,))
    if calibrate:
        qatgraph.calibrate(qmodel, [X], show_progress=False)
    return qmodel


def scales(qmodel: nn.Module) -> dict[str, torch.Tensor]:
    return {name: q.scale.detach().clone() for name, q in iter_quantizers(qmodel)}


def test_int8_state_into_a_4_bit_model_is_refused_naming_quantizer_and_formats():
    int8 = compiled(POLICY)
    int4 = compiled({**POLICY, "weight": {"bits": 4}})
    before = scales(int4)
    with pytest.raises(StateMismatchError) as raised:
        int4.load_state_dict(int8.state_dict())
    message = str(raised.value)
    assert "quantizer '0.weight_quantizer'" in message and "3 quantizer(s)" in message
    assert "the state holds INT8 symmetric per-channel (axis 0, 16 channels)" in message
    assert "this model's quantizer is INT4 symmetric per-channel (axis 0, 16 channels) (bits differ)" in message
    assert "Nothing was loaded" in message
    assert all(torch.equal(before[n], s) for n, s in scales(int4).items())  # refused before copying anything


def test_asymmetric_state_into_a_symmetric_model_is_refused():
    asymmetric = compiled({**POLICY, "preset": "onnxruntime"})
    symmetric = compiled({**POLICY, "preset": "onnxruntime", "activation": {"symmetric": True}}, calibrate=False)
    with pytest.raises(StateMismatchError, match=r"UINT8 asymmetric per-tensor values, this model's quantizer is "
                                                 r"INT8 symmetric per-tensor \(signedness, symmetry differ\)"):
        symmetric.load_state_dict(asymmetric.state_dict())
    with pytest.raises(StateMismatchError):  # strict=False is about keys; a wrong format is never loaded
        symmetric.load_state_dict(asymmetric.state_dict(), strict=False)


def test_a_bare_quantizer_refuses_another_format_too():
    int8, int4 = compiled(POLICY), compiled({**POLICY, "weight": {"bits": 4}}, calibrate=False)
    source, target = int8.get_submodule("2.weight_quantizer"), int4.get_submodule("2.weight_quantizer")
    with pytest.raises(StateMismatchError, match="quantizer '2.weight_quantizer'.*bits differ"):
        target.load_state_dict(source.state_dict())


def test_a_state_saved_before_formats_existed_still_loads():
    source, target = compiled(POLICY), compiled(POLICY, calibrate=False)
    old_state = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    assert target.load_state_dict(old_state).missing_keys == []
    with torch.no_grad():
        torch.testing.assert_close(target(X), source(X), rtol=0, atol=0)


def test_a_different_skip_list_is_explained_in_qatgraphs_words():
    everything = compiled(POLICY)
    skipping = compiled({**POLICY, "overrides": [{"name": "5", "skip": True}]}, calibrate=False)
    with pytest.raises(StateMismatchError) as raised:
        skipping.load_state_dict(everything.state_dict())
    message = str(raised.value)
    assert "Missing key" not in message and "Unexpected key" not in message
    assert "the state has 2 quantizer(s) this model does not (5.weight_quantizer, quantizers._4)" in message
    assert "quantized layers that this one keeps in floating point" in message and "strict=False" in message
    with pytest.raises(StateMismatchError, match=r"this model has 2 quantizer\(s\) the state lacks"):
        everything.load_state_dict(skipping.state_dict())
    # strict=False keeps torch's behaviour: the common keys load, the rest is reported
    result = skipping.load_state_dict(everything.state_dict(), strict=False)
    assert "5.weight_quantizer.scale" in result.unexpected_keys


def test_export_refuses_a_zero_point_that_would_wrap(tmp_path):
    qmodel = compiled(POLICY)
    quantizer = qmodel.get_submodule("quantizers._1")
    quantizer.zero_point.fill_(131)  # what an asymmetric state used to leave in a symmetric quantizer
    with pytest.raises(ExportError, match=r"quantizer 'quantizers._1' has zero point\(s\) \[131\] outside its "
                                          r"integer range \[-128, 127\]"):
        qatgraph.export_onnx(qmodel, tmp_path / "m.onnx", X)
    assert not (tmp_path / "m.onnx").exists()
