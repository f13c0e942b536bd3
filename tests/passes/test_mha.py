"""passes/mha.py: nn.MultiheadAttention re-expressed as functional Linears + decomposed attention."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import qatgraph
from qatgraph.passes import mha

EMBED, HEADS, L, S, N = 32, 4, 6, 9, 2


class Attend(nn.Module):
    """Calls its MultiheadAttention with the configured arguments; returns output (+ weights)."""

    def __init__(self, self_attention: bool, call: dict, **options) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(EMBED, HEADS, **options)
        self.self_attention, self.call = self_attention, call

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None):
        if self.self_attention:
            k = v = q
        out, weights = self.attn(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **self.call)
        return (out, weights) if self.call.get("need_weights", True) else out


def inputs(batch_first: bool, kdim: int = EMBED, vdim: int = EMBED, self_attention: bool = False):
    g = torch.Generator().manual_seed(0)
    shape = (lambda n, t, e: (n, t, e)) if batch_first else (lambda n, t, e: (t, n, e))
    q = torch.randn(shape(N, L, EMBED), generator=g)
    if self_attention:
        return q, q, q
    return q, torch.randn(shape(N, S, kdim), generator=g), torch.randn(shape(N, S, vdim), generator=g)


KEYS = S
PADDING = torch.zeros(N, S, dtype=torch.bool)
PADDING[0, -3:] = True
CASES = {
    "self_batch_first": dict(options={"batch_first": True}, self_attention=True),
    "self_seq_first": dict(options={}, self_attention=True),
    "cross_packed": dict(options={"batch_first": True}),
    "separate_proj": dict(options={"batch_first": True, "kdim": 24, "vdim": 20}, kdim=24, vdim=20),
    "no_bias": dict(options={"bias": False}),
    "key_padding_bool": dict(options={"batch_first": True}, padding=PADDING),
    "key_padding_float": dict(options={"batch_first": True}, padding=torch.randn(N, S)),
    "attn_mask_bool_2d": dict(options={}, attn_mask=torch.rand(L, S, generator=torch.Generator().manual_seed(2)) > 0.7),
    "attn_mask_float_3d": dict(options={"batch_first": True}, attn_mask=torch.randn(N * HEADS, L, S)),
    "both_masks": dict(options={}, padding=PADDING, attn_mask=torch.randn(L, S)),
    "weights_averaged": dict(options={"batch_first": True}, call={"need_weights": True}),
    "weights_per_head": dict(options={}, call={"need_weights": True, "average_attn_weights": False}),
    "dropout_eval": dict(options={"batch_first": True, "dropout": 0.3}),
}


def traced(case: dict) -> tuple[Attend, fx.GraphModule, tuple, dict]:
    model = Attend(case.get("self_attention", False), case.get("call", {"need_weights": False}),
                   **case["options"]).eval()
    q, k, v = inputs(case["options"].get("batch_first", False), case.get("kdim", EMBED), case.get("vdim", EMBED),
                     case.get("self_attention", False))
    kwargs = {"key_padding_mask": case.get("padding"), "attn_mask": case.get("attn_mask")}
    gm = fx.symbolic_trace(model, concrete_args={n: None for n, value in kwargs.items() if value is None})
    args = (q, k, v, kwargs["key_padding_mask"], kwargs["attn_mask"])
    ShapeProp(gm).propagate(*args)
    return model, mha.run(gm).eval(), args, kwargs


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_matches_the_module(name: str) -> None:
    model, gm, args, kwargs = traced(CASES[name])
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)
                   for n in gm.graph.nodes)
    assert len(gm.graph.find_nodes(op="call_function", target=torch.matmul)) == 2
    expected = model(*args[:3], **kwargs)
    torch.testing.assert_close(gm(*args), expected, rtol=1e-5, atol=1e-5)
    assert set(gm.state_dict()) == set(model.state_dict())


def test_dropout_follows_train_mode() -> None:
    model, gm, args, _ = traced(CASES["dropout_eval"])
    assert isinstance(gm.attn.attention_dropout, nn.Dropout) and gm.attn.attention_dropout.p == 0.3
    assert not torch.equal(gm.train()(*args), gm.eval()(*args))


def test_packed_self_attention_is_one_linear() -> None:
    _, gm, _, _ = traced(CASES["self_batch_first"])
    [linear] = gm.graph.find_nodes(op="call_function", target=F.linear)
    assert linear.args[1].op == "get_attr" and linear.args[1].target == "attn.in_proj_weight"
    assert type(gm.attn.out_proj) is nn.Linear and gm.attn.out_proj.weight is gm.attn.out_proj.weight


def test_add_bias_kv_is_kept_whole_and_listed() -> None:
    block = Attend(True, {"need_weights": False}, batch_first=True, add_bias_kv=True)
    qmodel = qatgraph.compile(block, "tensorrt")
    decision = qmodel.qatgraph_info.layer("attn")
    assert not decision.quantized and "add_bias_kv=True" in decision.reason


@pytest.mark.parametrize("name", ["self_batch_first", "cross_packed", "separate_proj"])
def test_compiled_quantizes_projections_and_both_matmuls(name: str) -> None:
    case = CASES[name]
    model, _, args, kwargs = traced(case)
    # Heads of 8 and 6-9 tokens are tiny GEMMs: quantize them anyway to see the placement.
    qmodel = qatgraph.compile(model, {"preset": "tensorrt", "min_channels": 0}, example_inputs=args)
    rows = {d.layer: d for d in qmodel.qatgraph_info.layers}
    matmuls = [d for d in rows.values() if d.kind == "matmul"]
    assert len(matmuls) == 2 and all(d.quantized and len(d.input_quantizers) == 2 for d in matmuls)
    linears = [d for d in rows.values() if d.kind == "linear"]
    assert len(linears) == (2 if name == "self_batch_first" else 4)
    assert all(d.quantized and d.weight_quantizer and len(d.input_quantizers) == 1 for d in linears)
    assert rows["attn.out_proj"].quantized
    qatgraph.calibrate(qmodel, [args], show_progress=False)
    torch.testing.assert_close(qmodel(*args), model(*args[:3], **kwargs), rtol=0.1, atol=0.05)
    # Cross-attention on the packed weight: three row slices of one quantized weight (per row = per slice).
    slices = [n for n in qmodel.graph.nodes if n.target is operator.getitem and n.args[0].op == "call_module"
              and n.args[0].target == "attn.in_proj_weight_quantizer"]
    assert len(slices) == (3 if name == "cross_packed" else 0)
