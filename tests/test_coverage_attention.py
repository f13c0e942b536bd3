"""Coverage of attention: SDPA decomposition, transformer encoders (hand-written and Hugging Face
BERT through the torch.export frontend).

The SDPA decomposition matches the fused kernel (masks, GQA, causal, dropout); golden placements of
an SDPA attention block and a masked BERT layer; Hugging Face BERT compiled through
``torch.export`` (module-level graph, dropout following train mode, repeated calls kept apart, errors
naming the line). The end-to-end cases and the coverage table: tests/test_coverage_models.py.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import models  # tests/ is on sys.path: conftest.py under pytest, the script's folder when run as a script
import models_extra
import pytest
import torch
import torch.nn.functional as F
from coverage_cases import (
    FX_ONLY,
    TOKEN_NAMES,
    WARNING_FILTERS,
    compile_block,
    hf_exported,
    tokens,
)
from placement import quantized_edges, quantizer_targets
from torch import fx, nn

import qatgraph
from qatgraph import TraceError
from qatgraph.graph import frontends
from qatgraph.passes import attention

pytestmark = WARNING_FILTERS


# --------------------------------------------------------------------------- SDPA decomposition
class Sdpa(nn.Module):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.options = options

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.options)


def decomposed(module: nn.Module, *args: Any) -> fx.GraphModule:
    concrete = {"mask": None} if args[3] is None else None
    gm = fx.symbolic_trace(module, concrete_args=concrete)
    fx.passes.shape_prop.ShapeProp(gm).propagate(*[a for a in args if a is not None])
    return attention.run(gm, qatgraph.Policy.from_any("tensorrt"))


def qkv(heads: int = 4, kv_heads: int = 4, queries: int = 6, keys: int = 9) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(2, heads, queries, 16, generator=generator),
            torch.randn(2, kv_heads, keys, 16, generator=generator),
            torch.randn(2, kv_heads, keys, 16, generator=generator))


BOOL_MASK = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(1)) > 0.4
BOOL_MASK[..., 0] = True  # every query sees a key (see test_fully_masked_row...)
SDPA_CASES = {
    "plain": ({}, None, {}), "scale": ({"scale": 0.3}, None, {}), "causal": ({"is_causal": True}, None, {}),
    "bool_mask": ({}, BOOL_MASK, {}), "float_mask": ({}, torch.randn(2, 4, 6, 9), {}),
    "mask_broadcast_keys": ({}, BOOL_MASK[:, :, :1, :], {}), "gqa": ({"enable_gqa": True}, None, {"heads": 8}),
}


@pytest.mark.parametrize("case", sorted(SDPA_CASES))
def test_sdpa_decomposition_matches_the_fused_kernel(case: str) -> None:
    options, mask, shape = SDPA_CASES[case]
    module, (q, k, v) = Sdpa(**options), qkv(**shape)
    gm = decomposed(module, q, k, v, mask)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.scaled_dot_product_attention not in targets and targets.count(torch.matmul) == 2
    expected = module(q, k, v, mask)
    torch.testing.assert_close(gm(q, k, v) if mask is None else gm(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
    assert gm.meta["qatgraph_attention"] == ["scaled_dot_product_attention"]
    qk = gm.graph.find_nodes(op="call_function", target=torch.matmul)[0]
    assert qk.meta["tensor_meta"].shape == (2, 8 if case == "gqa" else 4, 6, 9)  # shapes for the tiny-GEMM rule


def test_fully_masked_row_is_mean_of_values_not_nan() -> None:
    q, k, v = qkv()
    mask = BOOL_MASK.clone()
    mask[0, 0, 2] = False  # query 2 of batch 0 sees no key: SDPA returns 0, the decomposition the mean of v
    out = decomposed(Sdpa(), q, k, v, mask)(q, k, v, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :, 2], v[0].mean(-2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], Sdpa()(q, k, v, mask)[1], rtol=1e-5, atol=1e-5)


def test_dropout_kept_only_when_requested() -> None:
    q, k, v = qkv()
    with_dropout = decomposed(Sdpa(dropout_p=0.5), q, k, v, None)
    [dropout] = with_dropout.graph.find_nodes(op="call_function", target=F.dropout)
    assert dropout.kwargs == {"p": 0.5, "training": True}  # SDPA drops in eval mode too
    assert not decomposed(Sdpa(dropout_p=0.0), q, k, v, None).graph.find_nodes(op="call_function", target=F.dropout)


def test_mask_with_is_causal_is_left_as_one_op(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = qkv(queries=9)
    with caplog.at_level(logging.WARNING, logger="qatgraph.passes.attention"):
        gm = decomposed(Sdpa(is_causal=True), q, k, v, torch.ones(9, 9, dtype=torch.bool))
    assert gm.graph.find_nodes(op="call_function", target=F.scaled_dot_product_attention)
    assert "both attn_mask and is_causal" in caplog.text


# Golden placements, the TensorRT rules applied by hand: Linear inputs, Q and K^T into the first
# matmul, softmax P and V into the second, the residual skips; LayerNorm/GELU outputs only where
# they feed a Linear; never the mask, the bias or a matmul/Linear output.
SDPA_BLOCK_GOLDEN = {"x": {"add"}, "norm1": {"qkv"}, "getitem_3": {"scaled_dot_product_attention_qk"},
                     "scaled_dot_product_attention_key_t": {"scaled_dot_product_attention_qk"},
                     "scaled_dot_product_attention_softmax": {"scaled_dot_product_attention_pv"},
                     "getitem_5": {"scaled_dot_product_attention_pv"}, "reshape_1": {"proj"}, "add": {"add_1"},
                     "norm2": {"mlp_fc1"}, "mlp_act": {"mlp_fc2"}}
BERT_LAYER_GOLDEN = {"x": {"query", "key", "value", "add"}, "transpose": {"scaled_dot_product_attention_qk"},
                     "scaled_dot_product_attention_key_t": {"scaled_dot_product_attention_qk"},
                     "scaled_dot_product_attention_softmax": {"scaled_dot_product_attention_pv"},
                     "transpose_2": {"scaled_dot_product_attention_pv"}, "reshape": {"out"},
                     "norm1": {"fc1", "add_1"}, "act": {"fc2"}}


def test_golden_placement_sdpa_attention_block() -> None:
    qmodel = compile_block(models_extra.SdpaAttentionBlock(), torch.randn(2, 16, 64))
    assert quantized_edges(qmodel) == SDPA_BLOCK_GOLDEN
    matmuls = [d for d in qmodel.qatgraph_info.layers if d.kind == "matmul"]
    assert [d.layer for d in matmuls] == ["scaled_dot_product_attention_qk", "scaled_dot_product_attention_pv"]
    assert all(d.quantized and len(d.input_quantizers) == 2 for d in matmuls)


def test_golden_placement_masked_bert_layer() -> None:
    visible = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    qmodel = compile_block(models_extra.BertLikeLayer(), torch.randn(2, 16, 64), visible)
    assert quantized_edges(qmodel) == BERT_LAYER_GOLDEN
    [bias] = qmodel.graph.find_nodes(op="call_function", target=attention.attention_bias)
    assert bias.args[2].name == "visible"  # the boolean padding mask becomes the additive bias


def test_sdpa_block_compiles_to_the_explicit_matmul_block() -> None:
    """Same weights, same calibration: the decomposed SDPA block is the hand-written block, in QAT too."""
    explicit, fused = models.AttentionBlock().eval(), models_extra.SdpaAttentionBlock().eval()
    fused.load_state_dict(explicit.state_dict())
    x, batches = torch.randn(2, 16, 64), [torch.randn(4, 16, 64) for _ in range(2)]
    compiled = [compile_block(block, x) for block in (explicit, fused)]
    for qmodel in compiled:
        qatgraph.calibrate(qmodel, batches, show_progress=False)
    assert len(quantizer_targets(compiled[0])) == len(quantizer_targets(compiled[1])) == 10
    torch.testing.assert_close(compiled[1](x), compiled[0](x), rtol=1e-5, atol=1e-5)


def test_tiny_heads_keep_attention_matmuls_float() -> None:
    qmodel = compile_block(models_extra.SdpaAttentionBlock(dim=64, heads=8), torch.randn(2, 16, 64))
    qk = qmodel.qatgraph_info.layer("scaled_dot_product_attention_qk")
    assert not qk.quantized and "K=8" in qk.reason


def test_policy_skips_the_probability_matmul_by_name() -> None:
    policy = {"preset": "tensorrt", "overrides": [{"glob": "*_pv", "skip": True}]}
    qmodel = compile_block(models_extra.SdpaAttentionBlock(), torch.randn(2, 16, 64), policy=policy)
    info = qmodel.qatgraph_info
    assert info.layer("scaled_dot_product_attention_qk").quantized
    assert "skipped by override" in info.layer("scaled_dot_product_attention_pv").reason
    assert "scaled_dot_product_attention_softmax" not in quantized_edges(qmodel)


# --------------------------------------------------------------------------- Hugging Face BERT
def test_hf_bert_fx_partial_tracing_misses_the_attention() -> None:
    """transformers 5 has no fx tracer: without the torch.export frontend only the sub-blocks trace."""
    qmodel = qatgraph.compile(models_extra.hf_bert("sdpa"), FX_ONLY, example_inputs=tokens(2, 0))
    report = qmodel.trace_report
    untraced = {u.type_name: u for u in report.untraced}
    assert "co_varnames is too small" in untraced["BertForSequenceClassification"].reason
    # Where exactly tracing fails inside transformers moves between its releases: check that the
    # report points into transformers' source with a file:line and the offending code, and says how to fix it.
    for type_name in ("BertSelfAttention", "BertLayer"):
        location = untraced[type_name].location
        assert re.search(r"transformers[/\\].+\.py:\d+ `.+`", location), (type_name, location)
        assert f"leaf_modules: ['{type_name}']" in untraced[type_name].fix
    assert "bert.encoder.layer.0.intermediate" in report.traced and "bert.encoder.layer.0" not in report.traced
    decisions = qmodel.qatgraph_info.layers
    assert not any(d.kind == "matmul" for d in decisions)  # the attention GEMMs are never seen
    assert qmodel.qatgraph_info.layer("bert.encoder.layer.0.attention.self.query").eager


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_export_graph_gives_a_module_level_graph(implementation: str) -> None:
    model = models_extra.hf_bert(implementation)
    gm = frontends.export_graph(model, kwargs=dict(zip(TOKEN_NAMES, tokens(2, 0))))
    called = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]
    assert called.count("Linear") == 14 and called.count("Embedding") == 3 and called.count("Dropout") == 6
    assert not gm.graph.find_nodes(op="call_function", target=torch.ops.aten.linear.default)
    assert set(gm.state_dict()) == set(model.state_dict())
    ids, mask = tokens(3, 5)  # another batch size: the batch dimension stayed symbolic
    torch.testing.assert_close(gm(ids, mask), model(input_ids=ids, attention_mask=mask).logits)
    torch.testing.assert_close(gm(input_ids=ids, attention_mask=mask), gm(ids, mask))


def test_export_graph_dropout_follows_train_mode() -> None:
    gm = frontends.export_graph(models_extra.hf_bert("eager"), kwargs=dict(zip(TOKEN_NAMES, tokens(2, 0))))
    ids, mask = tokens(2, 1)
    assert torch.equal(gm.eval()(ids, mask), gm(ids, mask))
    assert not torch.equal(gm.train()(ids, mask), gm.eval()(ids, mask))


def test_hf_bert_compiled_placement() -> None:
    qmodel = qatgraph.compile(hf_exported("sdpa"), "tensorrt", example_inputs=tokens(2, 0))
    info = qmodel.qatgraph_info
    matmuls = [d for d in info.layers if d.kind == "matmul"]
    assert len(matmuls) == 4 and all(d.quantized and len(d.input_quantizers) == 2 for d in matmuls)
    linears = [d for d in info.layers if d.kind == "linear"]
    assert [d.layer for d in linears if not d.quantized] == ["classifier"]  # N=2: tiny
    edges = quantized_edges(qmodel)
    embeddings = [n.name for n in qmodel.graph.nodes
                  if n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), nn.Embedding)]
    assert len(embeddings) == 3 and not set(embeddings) & set(edges)  # embeddings stay floating point
    # The skip of each residual Add shares the quantizer of the Linears reading the same tensor.
    assert edges["bert_embeddings_dropout"] == {"add_2", "bert_encoder_layer_0_attention_self_query",
                                                "bert_encoder_layer_0_attention_self_key",
                                                "bert_encoder_layer_0_attention_self_value"}


def test_export_graph_compiles_like_fx_on_traceable_models() -> None:
    """Same layers quantized, same quantized function: the frontend is fx tracing by other means."""
    model = models.randomize_batchnorm(models.BasicBlock(16, 32, stride=2), torch.Generator().manual_seed(1)).eval()
    x, batches = torch.randn(2, 16, 8, 8), [torch.randn(4, 16, 8, 8) for _ in range(2)]
    by_fx = qatgraph.compile(model, "tensorrt", example_inputs=(x,))
    by_export = qatgraph.compile(frontends.export_graph(model, (x,)), "tensorrt", example_inputs=(x,))
    assert by_fx.qatgraph_info.quantized_layers == by_export.qatgraph_info.quantized_layers
    assert len(quantizer_targets(by_fx)) == len(quantizer_targets(by_export)) == 3
    for qmodel in (by_fx, by_export):
        qatgraph.calibrate(qmodel, batches, show_progress=False)
    torch.testing.assert_close(by_export(x), by_fx(x), rtol=0, atol=0)


def test_export_graph_separates_repeated_calls_of_one_module() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            first, second = self.fc(a), self.fc(b)  # two calls, adjacent in the exported graph
            return first + second

    gm = frontends.export_graph(Shared(), (torch.randn(2, 16), torch.randn(2, 16)))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["fc", "fc"]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


def test_export_graph_error_names_the_line() -> None:
    with pytest.raises(TraceError) as info:
        frontends.export_graph(DataDependent(), (torch.randn(2, 16),))
    message = str(info.value)
    assert "DataDependent" in message and "if x.sum() > 0" in message and "torch.cond" in message
