"""Tests for the eager CPU fake-quant: the C++ kernel (qatgraph/kernels/fake_quant_cpu.cpp), its
build-on-first-use loader and the torch-op form it falls back to.

The kernel must build on a machine with a C++ compiler (CI has one), equal ONNX QuantizeLinear's
rounding (``round(x / scale)``, tests/onnx_rounding.py) and ATen's straight-through mask bit for bit in
output and gradient for every memory layout it accepts (contiguous, channels-last, transposed
views, expanded gradients), skip the mask under ``no_grad``, propagate NaN with gradient 0 as the
torch-op form does, and be what ``FakeQuantizer`` runs in eager float32 training. A build that
fails (here: a deliberately broken source) must fall back with a warning, not raise; and
``QATGRAPH_CPU_KERNEL=0`` turns the kernel off.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from onnx_rounding import quantize_linear

from qatgraph import FakeQuantizer, QuantSpec
from qatgraph.kernels import fake_quant_cpu_ext
from qatgraph.ops import fake_quant_cpu
from qatgraph.ops.fake_quant_cpu import fake_quantize_cpu

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                    reason="no C++ compiler on PATH: the CPU kernel cannot be built here")

SCALE = torch.tensor(0.0123)


def _expected(x: torch.Tensor, zero_point: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ONNX QuantizeLinear -> DequantizeLinear of x, the straight-through mask)."""
    return quantize_linear(x, SCALE, torch.tensor(zero_point), qmin, qmax)


@needs_compiler
def test_kernel_builds_here() -> None:
    assert fake_quant_cpu_ext.load() is not None, "the C++ kernel failed to build; see the logged warning"


@needs_compiler
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed_view"])
@pytest.mark.parametrize("zero_point, qmin, qmax", [(0, -128, 127), (131, 0, 255), (0, -127, 127), (2, -8, 7)])
def test_kernel_rounds_as_onnx_in_every_layout(layout: str, zero_point: int, qmin: int, qmax: int) -> None:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 13, 11, generator=generator) * 2
    codes = torch.randint(-300, 300, x.shape, generator=generator).float() + 0.5  # exact half-way ties
    x = torch.where(torch.rand(x.shape, generator=generator) < 0.3, codes * SCALE, x)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed_view":
        x = x.transpose(1, 3)
    expected, mask = _expected(x, zero_point, qmin, qmax)
    ours_leaf = x.detach().clone().requires_grad_(True)
    ours = fake_quantize_cpu(ours_leaf, SCALE, torch.tensor(zero_point, dtype=torch.int32), qmin, qmax, None)
    assert torch.equal(ours, expected)
    grad = torch.randn(x.shape, generator=generator)
    ours.backward(grad)
    assert torch.equal(ours_leaf.grad, grad * mask)


@needs_compiler
def test_kernel_takes_an_expanded_gradient() -> None:
    x = (torch.randn(3, 5, 7) * 3).requires_grad_(True)
    fake_quantize_cpu(x, SCALE, torch.tensor(0, dtype=torch.int32), -8, 7, None).sum().backward()  # grad: stride 0
    assert torch.equal(x.grad, _expected(x, 0, -8, 7)[1].float())


def _spy_on_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple]]:
    """Route the kernel's calls through a recorder; returns the (method, arguments) list."""
    kernel = fake_quant_cpu_ext.load()
    calls: list[tuple[str, tuple]] = []

    class Spy:
        def forward(self, *args):
            calls.append(("forward", args))
            return kernel.forward(*args)

        def backward(self, *args):
            calls.append(("backward", args))
            return kernel.backward(*args)

    monkeypatch.setattr(fake_quant_cpu_ext, "load", lambda: Spy())
    return calls


@needs_compiler
def test_kernel_skips_the_mask_without_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_on_kernel(monkeypatch)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        out = fake_quantize_cpu(x, SCALE, torch.tensor(0, dtype=torch.int32), -128, 127, None)
    assert [(name, args[-1]) for name, args in calls] == [("forward", False)]  # need_mask=False
    assert torch.equal(out, _expected(x, 0, -128, 127)[0])


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch_ops"])
def test_nan_propagates_with_zero_gradient(use_kernel: bool) -> None:
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.05, 100.0], requires_grad=True)
    out = fake_quantize_cpu(x, SCALE, torch.tensor(0, dtype=torch.int32), -128, 127, None, use_kernel=use_kernel)
    assert math.isnan(out[0].item())
    assert out[1:].tolist() == pytest.approx([127 * 0.0123, -128 * 0.0123, 4 * 0.0123, 127 * 0.0123])
    out.backward(torch.ones(5))
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


@needs_compiler
def test_fake_quantizer_trains_through_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_on_kernel(monkeypatch)
    quantizer = FakeQuantizer(QuantSpec(bits=8), name="act")
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.randn(4, 16, requires_grad=True)
    quantizer(x).sum().backward()
    assert [name for name, _ in calls] == ["forward", "backward"]


def test_broken_build_falls_back_with_a_warning(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken.cpp"
    broken.write_text("#error deliberately broken source\n")
    monkeypatch.setattr(fake_quant_cpu_ext, "_SOURCE", broken)
    monkeypatch.setattr(fake_quant_cpu_ext, "_NAME", "qatgraph_fake_quant_cpu_broken_test")
    monkeypatch.setenv("QATGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=fake_quant_cpu_ext.__name__):
        assert fake_quant_cpu_ext.build() is None
    assert "CPU fake-quant kernel unavailable" in caplog.text and "torch-op form" in caplog.text
    monkeypatch.setattr(fake_quant_cpu_ext, "load", fake_quant_cpu_ext.build)  # the uncached loader, now broken
    x = torch.randn(3, 4, requires_grad=True)
    out = fake_quant_cpu.fake_quantize_cpu(x, SCALE, torch.tensor(0, dtype=torch.int32), -128, 127, None)
    assert torch.equal(out, _expected(x, 0, -128, 127)[0])


@pytest.mark.parametrize("value, disabled", [("0", True), ("false", True), ("off", True), ("1", False), ("", False)])
def test_environment_switch(monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool) -> None:
    monkeypatch.setenv("QATGRAPH_CPU_KERNEL", value)
    assert fake_quant_cpu_ext.kernel_disabled() is disabled
    if disabled:
        assert fake_quant_cpu_ext.build() is None


def test_build_directory_follows_cache_dir_torch_version_and_source(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QATGRAPH_CACHE_DIR", str(tmp_path))
    directory = fake_quant_cpu_ext.build_directory()
    assert directory.parent.parent == tmp_path / "kernels"
    assert torch.__version__.split("+")[0] in directory.parent.name
    changed = tmp_path / "changed.cpp"
    changed.write_text("// another source\n")
    monkeypatch.setattr(fake_quant_cpu_ext, "_SOURCE", changed)
    assert fake_quant_cpu_ext.build_directory() != directory  # a new source builds afresh


def test_build_directory_is_keyed_by_the_install_and_the_compiler(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cpp_extension's build.ninja embeds the torch install's and the source's absolute paths: two venvs
    or clones sharing the cache used to rebuild each other's library (21-25 s) every time they alternated."""
    monkeypatch.setenv("QATGRAPH_CACHE_DIR", str(tmp_path))
    directory = fake_quant_cpu_ext.build_directory()
    assert fake_quant_cpu_ext.build_directory() == directory  # stable while nothing changes
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__file__", str(tmp_path / "other-venv" / "torch" / "__init__.py"))
        assert fake_quant_cpu_ext.build_directory() != directory
    with monkeypatch.context() as patch:
        clone = tmp_path / "clone" / "fake_quant_cpu.cpp"
        clone.parent.mkdir()
        clone.write_bytes(fake_quant_cpu_ext._SOURCE.read_bytes())  # same contents, another clone
        patch.setattr(fake_quant_cpu_ext, "_SOURCE", clone)
        assert fake_quant_cpu_ext.build_directory() != directory
    monkeypatch.setenv("CXX", "clang++")
    assert fake_quant_cpu_ext.build_directory() != directory


def test_every_build_is_announced(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Before, the notice printed only when no library existed: a rebuild ninja decided on was silent."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("QATGRAPH_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QATGRAPH_CPU_KERNEL", raising=False)
    builds = {"touch": True}

    def fake_load(name, sources, build_directory, **_):
        library = Path(build_directory) / f"{name}.so"
        if builds["touch"] or not library.exists():
            library.write_bytes(os.urandom(8))
            os.utime(library, ns=(time.time_ns() + 10**9,) * 2)  # a newer file, as after a compile
        return object()

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert fake_quant_cpu_ext.build() is not None
    assert "compiling the CPU fake-quant kernel" in capsys.readouterr().err
    assert fake_quant_cpu_ext.build() is not None  # ninja rebuilt although a library was there
    assert "rebuilt the CPU fake-quant kernel" in capsys.readouterr().err
    builds["touch"] = False
    assert fake_quant_cpu_ext.build() is not None  # loaded as it was: nothing to say
    assert capsys.readouterr().err == ""
    assert (fake_quant_cpu_ext.build_directory() / "build-inputs.json").exists()
