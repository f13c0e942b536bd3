"""QAT on a CUDA GPU: training-step cost of qatgraph against FP32 and torch.ao, and EfQAT's backward.

Sections (``--sections``, all by default):

* ``kernels``: fake-quant of one large activation (128x256x56x56) per dtype, forward and backward,
  for each CUDA implementation (Triton, ATen's cachemask kernels) and the unfused torch-op
  reference, against a plain copy of the tensor (the memory-bandwidth yardstick);
* ``step``: one training step (forward + loss + backward + SGD with momentum) of ResNet-50 and
  MobileNetV2 at batch 128, 224 px: the float model, qatgraph (both fake-quant implementations in
  eager mode) and torch.ao's ``prepare_qat_fx``, eager and under ``torch.compile``, fp32 and bf16
  autocast; "x FP32" is the median over rounds of the ratio to the float model's step in the same
  precision and mode;
* ``efqat``: ``loss.backward()`` time of ResNet-50 (batch 96) and BERT-base (batch 16, seq 384):
  float model, full QAT, LWPN 0 % / 25 %, CWPN 5 % / 25 %, same weights and scales, fp32 and bf16
  autocast; speedup = full QAT's median over the variant's; the partial weight-gradient strategy
  each layer measured itself into is counted;
* ``profile``: the top CUDA kernels of the float and the qatgraph step (ResNet-50, bf16, eager),
  with device and host time per step (host time above device time means the GPU waits for Python).

Timing: CUDA events around each sample, variants interleaved in rotating order, medians
(``benchmarks/gpu_timing.py``); warm-up rounds first (compilation and the partial-dW measurement
happen there). ``--deadline-minutes`` stops starting new configurations after that much time and
prints what was measured. Tables go to stdout (Markdown) and, with ``--json``, to a file.

    python benchmarks/gpu_train.py [--sections kernels,step,efqat,profile] [--precisions fp32,bf16]
        [--modes eager,compiled] [--models resnet50,mobilenetv2] [--efqat-models resnet50,bert]
        [--rounds 10] [--warmup 3] [--json results.json] [--deadline-minutes 20]

Needs a CUDA GPU: without one it exits with status 2 (the CPU benchmarks are qat_step.py and
efqat_backward.py). ``--smoke`` runs every section on the CPU at toy sizes, only to check the
script itself (its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_models as gm
from common import format_table
from gpu_timing import describe_failure, interleave, profile_top_kernels

from qatgraph.ops import fake_quant_cuda, partial_wgrad
from qatgraph.quant.quantizer import fake_quantize_reference

AMP = {"fp32": None, "bf16": torch.bfloat16}
EFQAT_VARIANTS = (("full QAT", None), ("lwpn", 0.0), ("cwpn", 0.05), ("cwpn", 0.25), ("lwpn", 0.25))


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.deadline = time.monotonic() + 60 * args.deadline_minutes
        self.results: dict[str, list] = collections.defaultdict(list)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def save(self) -> None:
        if self.args.json:
            with open(self.args.json, "w", encoding="utf-8") as handle:
                json.dump({"environment": environment(), **self.results}, handle, indent=1, default=str)


def environment() -> str:
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor()})"
    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    return (f"{stamp}; {where}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
            f"triton {_version('triton')}; torchvision {_version('torchvision')}; Python {platform.python_version()}")


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


# ------------------------------------------------------------------------------------- kernels
def section_kernels(run: Run) -> None:
    shape = (8, 16, 28, 28) if run.args.smoke else (128, 256, 56, 56)
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = (torch.randn(shape, device=run.device) * 2).to(dtype)
        grad = torch.randn(shape, device=run.device).to(dtype)
        scale = torch.tensor(0.02, device=run.device)
        zero_point = torch.tensor(0, dtype=torch.int32, device=run.device)

        def forward(implementation):
            def prepare():
                return lambda: implementation(x.detach().requires_grad_())
            return prepare

        def backward(implementation):
            def prepare():
                out = implementation(x.detach().requires_grad_())
                return lambda: out.backward(grad)
            return prepare

        implementations = {
            "copy (bandwidth yardstick)": lambda t: t.clone(),
            "reference (torch ops)": lambda t: fake_quantize_reference(t, scale, zero_point, -128, 127, None),
        }
        if run.device.type == "cuda":
            for backend in fake_quant_cuda.BACKENDS:
                implementations[backend] = (lambda t, b=backend: fake_quant_cuda.fake_quantize_cuda(
                    t, scale, zero_point, -128, 127, None, backend=b))
        variants = {f"{name} fwd": forward(f) for name, f in implementations.items()}
        variants.update({f"{name} bwd": backward(f) for name, f in implementations.items() if "copy" not in name})
        series = interleave(variants, rounds=run.args.rounds, warmup=2, reference=None, deadline=run.deadline)
        elements = x.numel()
        for name, result in series.items():
            moved = elements * (2 * x.element_size() + (1 if "copy" not in name and "reference" not in name else 0))
            gbps = moved / (result.median_ms / 1e3) / 1e9 if result.samples_ms else float("nan")
            rows.append([dtype_name, name, f"{result.median_ms:.3f}", f"{gbps:.0f}", result.failure or ""])
            run.results["kernels"].append({"dtype": dtype_name, "variant": name, "ms": result.median_ms,
                                           "failure": result.failure})
    print(f"\n## Fake-quant kernels, one {tuple(shape)} tensor (median ms; GB/s counts each input read and "
          "output written once, the 1-byte mask included)")
    print(format_table(["dtype", "implementation", "ms", "GB/s", "failure"], rows), flush=True)


# ---------------------------------------------------------------------------------------- step
def build_step_models(run: Run, work: gm.Workload) -> dict:
    """The models of the step section, built once per workload (an exception where a build failed)."""
    builders = {"fp32": lambda: work.model, "qatgraph": lambda: gm.qat_model(work),
                "torch.ao": lambda: gm.torch_ao_model(work)}
    models = {}
    for name in run.args.variants.split(","):
        try:
            models[name] = builders[name]()
        except Exception as error:  # noqa: BLE001 - a failing build is a result to report
            models[name] = error
    return models


def step_variants(run: Run, models: dict, work: gm.Workload, amp, compiled: bool) -> dict:
    variants = {}
    for name, model in models.items():
        if isinstance(model, Exception) or name != "qatgraph":
            variants[name] = model if isinstance(model, Exception) else gm.training_step(model, work, amp, compiled)
        elif compiled:
            for form in run.args.compiled_forms.split(","):
                label = "qatgraph" if form == "split" else f"qatgraph[{form}]"
                shaped = model if form == "split" else copy.deepcopy(model)
                gm.set_compiled_form(shaped, None if form == "split" else form)
                variants[label] = gm.training_step(shaped, work, amp, True)
        else:
            for backend in run.args.fq_backends.split(","):
                label = "qatgraph" if backend == "default" else f"qatgraph[{backend}]"
                force = None if backend == "default" else backend
                variants[label] = gm.training_step(model, work, amp, False,
                                                   before=lambda f=force: fake_quant_cuda.force_backend(f))
    return variants


def section_step(run: Run) -> None:
    batch = 4 if run.args.smoke else run.args.batch
    size = 32 if run.args.smoke else 224
    for model_name in run.args.models.split(","):
        work = gm.workload(model_name, batch, run.device, size=size)
        models = build_step_models(run, work)
        for precision in run.args.precisions.split(","):
            for mode in run.args.modes.split(","):
                if run.out_of_time():
                    print(f"(deadline reached: {model_name} {precision} {mode} not measured)", flush=True)
                    continue
                torch._dynamo.reset()
                built = step_variants(run, models, work, AMP[precision], mode == "compiled")
                steps = {name: (lambda s=s: s) for name, s in built.items() if not isinstance(s, Exception)}
                series = interleave(steps, rounds=run.args.rounds, warmup=run.args.warmup, reference="fp32",
                                    deadline=run.deadline)
                fake_quant_cuda.force_backend(None)
                rows = []
                for name, item in built.items():
                    result = series.get(name)
                    failure = describe_failure(item) if isinstance(item, Exception) else result.failure
                    rows.append([work.name, precision, mode, name, f"{result.median_ms:.1f}" if result else "",
                                 f"{result.spread_percent:.0f}%" if result else "",
                                 f"{result.median_ratio:.2f}x" if result and result.ratios else "", failure or ""])
                    run.results["step"].append(dict(zip(["model", "precision", "mode", "variant", "ms", "iqr", "x_fp32",
                                                         "failure"], rows[-1])))
                print(f"\n## QAT step: {work.source}")
                print(format_table(["model", "precision", "mode", "variant", "ms/step", "IQR", "x FP32", "failure"], rows),
                      flush=True)
                run.save()
                del built, steps
                torch.cuda.empty_cache() if run.device.type == "cuda" else None


# --------------------------------------------------------------------------------------- efqat
def section_efqat(run: Run) -> None:
    for model_name in run.args.efqat_models.split(","):
        if model_name == "bert":
            work = gm.workload("bert", 2 if run.args.smoke else 16, run.device, tokens=32 if run.args.smoke else 384)
        else:
            work = gm.workload(model_name, 4 if run.args.smoke else 96, run.device, size=32 if run.args.smoke else 224)
        full = gm.qat_model(work)
        models = {"float": work.model, "full QAT": full}
        for mode, ratio in EFQAT_VARIANTS[1:]:
            models[f"{mode} {ratio:.0%}"] = gm.efqat_model(full, {"mode": mode, "ratio": ratio})
        for precision in run.args.precisions.split(","):
            if run.out_of_time():
                print(f"(deadline reached: EfQAT {model_name} {precision} not measured)", flush=True)
                continue
            chosen_before = dict(partial_wgrad.chosen_strategies())
            variants = {name: gm.backward_preparer(model, work, AMP[precision]) for name, model in models.items()}
            series = interleave(variants, rounds=run.args.rounds, warmup=run.args.warmup, reference="full QAT",
                                deadline=run.deadline)
            chosen = collections.Counter(v for k, v in partial_wgrad.chosen_strategies().items() if k not in chosen_before)
            rows = []
            full_ms = series["full QAT"].median_ms
            for name, result in series.items():
                speedup = "" if name == "float" else f"{full_ms / result.median_ms:.2f}x"
                versus_float = f"{full_ms / series['float'].median_ms:.2f}x" if name == "full QAT" else ""
                rows.append([work.name, precision, name, gm.trainable_rows(models[name]), f"{result.median_ms:.2f}",
                             f"{result.spread_percent:.0f}%", speedup, versus_float, result.failure or ""])
                run.results["efqat"].append(dict(zip(["model", "precision", "variant", "rows", "ms", "iqr",
                                                      "speedup_vs_full", "full_over_float", "failure"], rows[-1])))
            print(f"\n## EfQAT backward: {work.source}; partial-dW strategies measured: {dict(chosen) or 'none'}")
            print(format_table(["model", "precision", "variant", "rows trained", "backward ms", "IQR",
                                "speedup vs full QAT", "full QAT / float", "failure"], rows), flush=True)
            run.save()
        del models, full
        torch.cuda.empty_cache() if run.device.type == "cuda" else None


# ------------------------------------------------------------------------------------- profile
def section_profile(run: Run) -> None:
    if run.device.type != "cuda":
        print("(profile: CUDA only)")
        return
    model_name, precision = run.args.profile.split(":")
    work = gm.workload(model_name, run.args.batch, run.device)
    for name, model in (("fp32", work.model), ("qatgraph", gm.qat_model(work))):
        step = gm.training_step(model, work, AMP[precision], False)
        table, device_ms, host_ms = profile_top_kernels(lambda s=step: s)
        print(f"\n## Profile, {work.name} {precision} eager, {name}: device {device_ms:.1f} ms/step, "
              f"host {host_ms:.1f} ms/step\n{table}", flush=True)
        run.results["profile"].append({"variant": name, "device_ms": device_ms, "host_ms": host_ms, "table": table})
    run.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sections", default="kernels,step,efqat,profile")
    parser.add_argument("--models", default="resnet50,mobilenetv2", help="step section models")
    parser.add_argument("--efqat-models", default="resnet50,bert")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--variants", default="fp32,qatgraph,torch.ao")
    parser.add_argument("--fq-backends", default="default,triton,aten",
                        help="eager qatgraph rows: default (the measured table), or forced triton / aten")
    parser.add_argument("--compiled-forms", default="split",
                        help="compiled qatgraph rows: split (materialize's per-producer choice), mask, clip")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile", default="resnet50:bf16", help="MODEL:PRECISION for the profile section")
    parser.add_argument("--deadline-minutes", type=float, default=30.0)
    parser.add_argument("--json", default=None, help="also write every measured row to this file")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, CPU allowed: checks the script only")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("benchmarks/gpu_train.py needs a CUDA GPU, and torch.cuda.is_available() is False here. "
              "The CPU benchmarks are benchmarks/qat_step.py and benchmarks/efqat_backward.py.", file=sys.stderr)
        return 2
    torch._dynamo.config.cache_size_limit = 64
    os.environ.setdefault("QATGRAPH_NO_PROGRESS", "1")
    run = Run(args)
    print(f"# {environment()}", flush=True)
    sections = {"kernels": section_kernels, "step": section_step, "efqat": section_efqat, "profile": section_profile}
    for name in args.sections.split(","):
        if run.out_of_time():
            print(f"(deadline reached: section {name} not run)")
            continue
        started = time.monotonic()
        sections[name](run)
        print(f"(section {name}: {time.monotonic() - started:.0f} s)", flush=True)
    run.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
