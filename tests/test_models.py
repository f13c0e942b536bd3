"""Tests for the test model zoo (tests/models.py, its blocks in tests/model_blocks.py).

Checks, for every golden block and zoo network: output shape, a working backward pass that
reaches every parameter, ``torch.fx.symbolic_trace`` reproducing the eager output exactly,
small parameter counts, and the structural promises other tests rely on (torchvision names,
channel counts >= 16, residual adds present). Also checks the seeding and BN-randomisation
helpers. Runs in a few seconds on CPU.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
from models import (
    BLOCKS,
    NUM_CLASSES,
    ZOO,
    AttentionBlock,
    BasicBlock,
    Bottleneck,
    InvertedResidual,
    example_input,
    randomize_batchnorm,
    resnet18_like,
    seed_everything,
    vit_like,
)
from torch import nn

ALL_MODELS = {**ZOO, **BLOCKS}

# Written out by hand (not computed from the models) so a wrong stride or width is caught.
EXPECTED_OUTPUT_SHAPES = {
    "resnet18": (2, NUM_CLASSES),
    "mobilenetv2": (2, NUM_CLASSES),
    "vgg": (2, NUM_CLASSES),
    "vit": (2, NUM_CLASSES),
    "conv_bn_relu_stack": (2, 64, 16, 16),
    "basic_identity": (2, 16, 16, 16),
    "basic_downsample": (2, 32, 8, 8),
    "bottleneck_identity": (2, 64, 16, 16),
    "bottleneck_downsample": (2, 64, 8, 8),
    "inverted_residual": (2, 32, 16, 16),
    "inverted_residual_strided": (2, 24, 8, 8),
    "inverted_residual_no_expand": (2, 16, 16, 16),
    "depthwise_separable": (2, 64, 16, 16),
    "inception": (2, 64, 16, 16),
    "linear_head": (2, NUM_CLASSES),
    "attention": (2, 16, 64),
}

# Blocks whose forward ends in (or contains) a residual add; the others must have none.
RESIDUAL_BLOCKS = {"basic_identity", "basic_downsample", "bottleneck_identity", "bottleneck_downsample",
                   "inverted_residual", "inverted_residual_no_expand", "attention"}


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    seed_everything(0)
    factory, _ = ALL_MODELS[name]
    return factory(), example_input(name)


def test_every_model_has_an_expected_shape() -> None:
    assert set(EXPECTED_OUTPUT_SHAPES) == set(ALL_MODELS)


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_forward_shape_and_finite(name: str) -> None:
    model, x = build(name)
    out = model.eval()(x)
    assert tuple(out.shape) == EXPECTED_OUTPUT_SHAPES[name]
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_backward_reaches_every_parameter(name: str) -> None:
    model, x = build(name)
    x.requires_grad_(True)
    model.train()(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {param_name}"


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_fx_trace_reproduces_eager_output(name: str) -> None:
    model, x = build(name)
    randomize_batchnorm(model, torch.Generator().manual_seed(1))
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    # The graph must call the real submodules, not inline them into a single opaque node.
    called = {node.target for node in traced.graph.nodes if node.op == "call_module"}
    assert len(called) >= 2


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_parameter_count_is_small(name: str) -> None:
    model, _ = build(name)
    assert 0 < sum(p.numel() for p in model.parameters()) < 3_000_000


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_channel_counts_are_at_least_16(name: str) -> None:
    """Only the RGB input conv and the final classifier may have fewer than 16 channels."""
    model, _ = build(name)
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert module.in_channels in (3,) or module.in_channels >= 16, module_name
            assert module.out_channels >= 16, module_name
        elif isinstance(module, nn.Linear):
            assert module.in_features >= 16, module_name
            assert module.out_features >= 16 or module.out_features == NUM_CLASSES, module_name
        elif isinstance(module, AttentionBlock):
            assert module.head_dim >= 16, module_name


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_residual_adds_present_exactly_where_expected(name: str) -> None:
    model, _ = build(name)
    graph = torch.fx.symbolic_trace(model).graph
    adds = [node for node in graph.nodes if node.op == "call_function" and node.target in (operator.add, torch.add)]
    assert bool(adds) == (name in RESIDUAL_BLOCKS)


def test_downsample_only_when_shape_changes() -> None:
    assert BasicBlock(16, 16).downsample is None
    assert BasicBlock(16, 32).downsample is not None
    strided = BasicBlock(16, 16, stride=2).downsample
    assert isinstance(strided, nn.Sequential) and strided[0].stride == (2, 2)
    assert isinstance(strided[1], nn.BatchNorm2d)
    assert Bottleneck(64, 16).downsample is None
    assert Bottleneck(16, 16).downsample is not None  # 16 -> 64 channels


def test_inverted_residual_structure() -> None:
    expanded = InvertedResidual(32, 32, stride=1, expand_ratio=6)
    assert expanded.use_res_connect and len(expanded.conv) == 4
    assert expanded.conv[1][0].groups == 32 * 6 and isinstance(expanded.conv[1][2], nn.ReLU6)
    assert isinstance(expanded.conv[-1], nn.BatchNorm2d)  # projection has no activation
    assert len(InvertedResidual(16, 16, stride=1, expand_ratio=1).conv) == 3
    assert not InvertedResidual(16, 24, stride=2, expand_ratio=6).use_res_connect


def test_resnet_uses_torchvision_state_dict_names() -> None:
    keys = set(resnet18_like().state_dict())
    expected = {"conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.1.bn2.weight",
                "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.conv2.weight",
                "fc.weight", "fc.bias"}
    assert expected <= keys
    assert not any(key.startswith("layer1.0.downsample") for key in keys)


def test_shared_relu_traces_to_two_calls_of_one_module() -> None:
    graph = torch.fx.symbolic_trace(BasicBlock(16, 16)).graph
    relu_calls = [node for node in graph.nodes if node.op == "call_module" and node.target == "relu"]
    assert len(relu_calls) == 2


def test_vit_names_and_token_count() -> None:
    model = vit_like()
    assert model.pos_embed.shape == (1, 17, 64) and model.cls_token.shape == (1, 1, 64)
    names = {name for name, _ in model.named_modules()}
    assert {"patch_embed", "blocks.0.qkv", "blocks.1.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.act",
            "blocks.0.mlp.fc2", "blocks.0.norm2", "norm", "head"} <= names


def test_attention_matches_reference_multihead_attention() -> None:
    """The explicit-matmul attention equals torch's fused attention on the same projections."""
    seed_everything(0)
    block = AttentionBlock().eval()
    x = example_input("attention")
    normed = block.norm1(x)
    q, k, v = block.qkv(normed).reshape(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
    reference = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 16, 64)
    torch.testing.assert_close(block.attention(normed), block.proj(reference), rtol=1e-5, atol=1e-5)


def test_example_input_is_reproducible_and_rejects_unknown_names() -> None:
    assert torch.equal(example_input("vgg", seed=3), example_input("vgg", seed=3))
    assert not torch.equal(example_input("vgg", seed=3), example_input("vgg", seed=4))
    with pytest.raises(KeyError, match="known names"):
        example_input("resnet50")


def test_seed_everything_makes_initialisation_reproducible() -> None:
    seed_everything(7)
    first = resnet18_like().state_dict()
    seed_everything(7)
    second = resnet18_like().state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_randomize_batchnorm_ranges_and_negative_gamma() -> None:
    model = resnet18_like()
    generator = torch.Generator().manual_seed(0)
    assert randomize_batchnorm(model, generator) is model
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(batchnorms) == 1 + 4 * 4 + 3  # stem, two per block, three downsample BNs
    for bn in batchnorms:
        assert (bn.running_var >= 0.5).all() and (bn.running_var <= 2.0).all()
        assert (bn.weight < 0).any() and (bn.weight > 0).any() and (bn.weight.abs() >= 0.5).all()
        assert bn.running_mean.abs().sum() > 0 and bn.bias.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())


def test_randomize_batchnorm_changes_eval_output_deterministically() -> None:
    seed_everything(0)
    model = resnet18_like().eval()
    x = example_input("resnet18")
    before = model(x)
    after = randomize_batchnorm(model, torch.Generator().manual_seed(5))(x)
    assert not torch.allclose(before, after)
    seed_everything(0)
    again = randomize_batchnorm(resnet18_like().eval(), torch.Generator().manual_seed(5))(x)
    assert torch.equal(after, again)
