"""nn.MultiheadAttention called from untraced code (qatgraph/graph/attention_calls.py): with
example inputs, compile replaces it by a graph of the call the example made, which the mha pass
quantizes like a traced attention; the state_dict keys, the float function, the export and ONNX
Runtime parity are those of a traced attention, and a call made differently is refused in words."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import qatgraph
from qatgraph.backends.onnx import export_onnx
from qatgraph.backends.parity import check_parity
from qatgraph.graph.eager_ops import float_run

pytestmark = pytest.mark.filterwarnings("ignore::qatgraph.QatgraphWarning", "ignore::torch.jit.TracerWarning")
FX = {"preset": "tensorrt", "tracing": {"frontend": "fx"}, "min_channels": 0, "activation": {"calibrator": "max"}}


class UntracedCaller(nn.Module):
    """An encoder block whose forward torch.fx cannot trace, calling its attention one way."""

    def __init__(self, batch_first: bool, need_weights: bool, cross: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=32 if cross else None,
                                          vdim=32 if cross else None)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 16)
        self.batch_first, self.need_weights = batch_first, need_weights

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x if self.batch_first else x.transpose(0, 1)
        if x.shape[-1] > 0:  # torch.fx cannot trace this
            key = tokens if memory is None else memory if self.batch_first else memory.transpose(0, 1)
            assert tokens.shape[-1] == self.attn.embed_dim and self.attn.batch_first == self.batch_first  # read back
            out, weights = self.attn(tokens, key, key, key_padding_mask=padding, need_weights=self.need_weights)
        out = out if self.batch_first else out.transpose(0, 1)
        y = self.head(self.norm(out + x))
        return y + weights.sum() if weights is not None else y


def _inputs(batch: int = 2, seed: int = 0, masks: bool = True, cross: bool = False) -> tuple[torch.Tensor | None, ...]:
    """(x, padding, memory), the unused trailing ones left out (the ONNX has no unused input)."""
    generator = torch.Generator().manual_seed(seed)
    padding = torch.zeros(batch, 5, dtype=torch.bool)
    padding[:, -1] = True
    inputs = (torch.randn(batch, 5, 16, generator=generator), padding if masks else None,
              torch.randn(batch, 5, 32, generator=generator) if cross else None)
    return inputs[:2] if not cross and masks else inputs[:1] if not cross else inputs


CASES = {"batch_first, masked, weights": (True, True, True, False), "sequence first, masked": (False, True, False, False),
         "batch_first, no mask": (True, False, False, False), "cross attention, masked": (True, True, False, True)}


@pytest.mark.parametrize("case", CASES)
def test_untraced_attention_call_is_quantized_and_matches_onnx_runtime(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    batch_first, masks, need_weights, cross = CASES[case]
    model = UntracedCaller(batch_first, need_weights, cross).eval()
    example = _inputs(masks=masks, cross=cross)
    qmodel = qatgraph.compile(model, FX, example_inputs=example)
    assert isinstance(qmodel.attn, fx.GraphModule) and "attn" in qmodel.trace_report.traced
    assert copy.deepcopy(qmodel).attn.batch_first == batch_first  # the module's attributes, copies included
    assert [key for key in qmodel.state_dict() if not key.rpartition(".")[0].endswith("_quantizer")
            and "quantizers." not in key] == list(model.state_dict())  # the float model's keys, in order
    with float_run(qmodel):
        torch.testing.assert_close(qmodel(*example), model(*example), rtol=1e-5, atol=1e-5)
    rows = {row.layer: row.status for row in qatgraph.summary(qmodel, print_table=False).rows}
    projections = ["attn.q_proj", "attn.k_proj", "attn.v_proj"] if cross else ["attn.in_proj"]
    assert {name: rows.get(name) for name in [*projections, "attn.mha_attention_qk", "attn.mha_attention_pv",
                                               "attn.out_proj"]} == dict.fromkeys([*projections, "attn.mha_attention_qk",
                                                                                   "attn.mha_attention_pv", "attn.out_proj"], "INT")
    qatgraph.calibrate(qmodel, [_inputs(4, seed, masks, cross) for seed in (1, 2)], show_progress=False)
    path = str(tmp_path / "m.onnx")
    result = export_onnx(qmodel, path, example)
    assert not result.errors and not result.warnings, result.findings
    assert check_parity(qmodel, path, [_inputs(3, 3, masks, cross)]).passed


def test_a_call_made_differently_is_refused_in_words() -> None:
    qmodel = qatgraph.compile(UntracedCaller(True, False).eval(), FX, example_inputs=_inputs())
    qatgraph.calibrate(qmodel, [_inputs(4, 1)], show_progress=False)
    x, padding = _inputs()
    with pytest.raises(qatgraph.QatgraphError, match=r"attn \(nn.MultiheadAttention, called from untraced code\) "
                       r"was compiled for the call the example inputs made.*key_padding_mask: torch.bool then, "
                       r"no tensor now.*tracing.leaf_modules: \['attn'\]"):
        qmodel.attn(x, x, x, need_weights=False)
    qmodel.attn(x, x, x, key_padding_mask=padding, need_weights=False)  # the compiled call runs


@pytest.mark.parametrize("why", ["leaf_modules", "called twice differently", "no example inputs"])
def test_attention_stays_one_float_module_when_it_cannot_be_one_call(why: str) -> None:
    class TwoCalls(UntracedCaller):
        def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 0:  # torch.fx cannot trace this
                first = self.attn(x, x, x, need_weights=False)[0]
            return self.head(self.attn(first, first, first, key_padding_mask=padding, need_weights=False)[0])

    model = (TwoCalls if why == "called twice differently" else UntracedCaller)(True, False).eval()
    policy = {**FX, "tracing": {"frontend": "fx", "leaf_modules": ["attn"]}} if why == "leaf_modules" else FX
    qmodel = qatgraph.compile(model, policy, example_inputs=None if why == "no example inputs" else _inputs())
    qatgraph.calibrate(qmodel, [_inputs(4, 1)], show_progress=False)
    assert isinstance(qmodel.attn, nn.MultiheadAttention)
    rows = {row.layer: row for row in qatgraph.summary(qmodel, print_table=False).rows}
    assert rows["attn"].status == "FP" and "nn.MultiheadAttention called from untraced code" in rows["attn"].reason


def test_a_call_that_depends_on_the_mode_keeps_the_module_float_and_trains() -> None:
    class ModeDependent(UntracedCaller):
        def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
            if x.shape[-1] > 0:  # torch.fx cannot trace this
                out = self.attn(x, x, x, need_weights=not self.training)[0]
            return self.head(out)

    qmodel = qatgraph.compile(ModeDependent(True, False).train(), FX, example_inputs=_inputs()[:1])
    assert isinstance(qmodel.attn, nn.MultiheadAttention)  # recorded in both modes: two calls
    qatgraph.calibrate(qmodel, [_inputs(4, 1)[:1]], show_progress=False)
    qmodel.train()(*_inputs()[:1]).sum().backward()


def test_calls_the_graph_computes_alike_are_accepted() -> None:
    """The example passed a separate key tensor and a boolean mask; the query as key and an
    additive float mask are computed right too (compared with the float model)."""
    torch.manual_seed(0)

    class SeparateKey(UntracedCaller):
        def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            if x.shape[-1] > 0:  # torch.fx cannot trace this
                out = self.attn(x, x.clone(), x.clone(), key_padding_mask=padding, need_weights=False)[0]
            return self.head(out)

    model = SeparateKey(True, False).eval()
    qmodel = qatgraph.compile(model, FX, example_inputs=_inputs())
    x, padding = _inputs()
    additive = torch.zeros(padding.shape).masked_fill(padding, -1e4)
    with float_run(qmodel):
        got = qmodel.attn(x, x, x, key_padding_mask=additive, need_weights=False)[0]
    torch.testing.assert_close(got, model.attn(x, x, x, key_padding_mask=additive, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)


def test_an_attention_two_parents_hold_becomes_one_graph() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = UntracedCaller(True, False), UntracedCaller(True, False)
            self.second.attn = self.first.attn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.second(self.first(x))

    model = Shared().eval()
    policy = {**FX, "freeze": {"mode": "cwpn", "ratio": 0.5}}  # EfQAT refuses a weight with two quantizers
    qmodel = qatgraph.compile(model, policy, example_inputs=_inputs()[:1])
    assert qmodel.first.attn is qmodel.second.attn and isinstance(qmodel.first.attn, fx.GraphModule)
    assert sorted(layer.name for layer in qmodel.qatgraph_freeze.layers) == [
        "first.attn.in_proj", "first.attn.out_proj", "first.head", "second.head"]  # the shared weights once
    quantizers = {id(q) for name, q in qatgraph.iter_quantizers(qmodel) if name.endswith("in_proj_weight_quantizer")}
    assert len(quantizers) == 1
