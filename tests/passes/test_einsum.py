"""passes/einsum.py: two-operand einsum GEMMs become matmul; others stay and are listed."""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import qatgraph
from qatgraph.passes import einsum


class Einsum(nn.Module):
    def __init__(self, equation: str) -> None:
        super().__init__()
        self.equation = equation

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.einsum(self.equation, a, b)


g = torch.Generator().manual_seed(0)
GEMMS = {
    "bhqd,bhkd->bhqk": ((2, 3, 5, 8), (2, 3, 7, 8)),
    "bhqk,bhkd->bhqd": ((2, 3, 5, 7), (2, 3, 7, 8)),
    "bld,fd->blf": ((2, 5, 8), (6, 8)),
    "ij,jk->ki": ((5, 8), (8, 6)),
    "bi,bij->bj": ((2, 8), (2, 8, 6)),
    "bij,bj->bi": ((2, 5, 8), (2, 8)),
    "nqhd,nkhd->nhqk": ((2, 5, 3, 8), (2, 7, 3, 8)),
}


@pytest.mark.parametrize("equation", sorted(GEMMS))
def test_gemm_einsum_becomes_one_matmul(equation: str) -> None:
    shapes = GEMMS[equation]
    a, b = (torch.randn(s, generator=g) for s in shapes)
    gm = einsum.run(fx.symbolic_trace(Einsum(equation)))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.einsum not in targets and targets.count(torch.matmul) == 1
    torch.testing.assert_close(gm(a, b), torch.einsum(equation, a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("equation,shapes", [("ii->i", ((4, 4),)), ("bij,bjk,bkl->bil", ((2, 3, 4), (2, 4, 5), (2, 5, 6))),
                                             ("...d,...d->...", ((2, 3, 8), (2, 3, 8))), ("ij,ij->ij", ((3, 4), (3, 4)))])
def test_other_einsums_stay_and_are_listed(equation: str, shapes) -> None:
    class One(nn.Module):
        def forward(self, a):
            return torch.einsum(equation, a)

    class Two(nn.Module):
        def forward(self, a, b):
            return torch.einsum(equation, a, b)

    class Three(nn.Module):
        def forward(self, a, b, c):
            return torch.einsum(equation, a, b, c)

    model = (One, Two, Three)[len(shapes) - 1]()
    tensors = [torch.randn(s, generator=g) for s in shapes]
    gm = einsum.run(fx.symbolic_trace(model))
    assert gm.graph.find_nodes(op="call_function", target=torch.einsum)
    torch.testing.assert_close(gm(*tensors), torch.einsum(equation, *tensors))
    [row] = qatgraph.compile(model, "tensorrt").qatgraph_info.layers
    assert not row.quantized and "einsum is not rewritten" in row.reason


def test_compiled_einsum_attention_quantizes_both_inputs() -> None:
    q, k = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    qmodel = qatgraph.compile(Einsum("bhqd,bhkd->bhqk"), "tensorrt", example_inputs=(q, k))
    [row] = qmodel.qatgraph_info.layers
    assert row.kind == "matmul" and row.quantized and len(row.input_quantizers) == 2
