"""Tests for qatgraph/sensitivity_analysis/.

The main oracle is a model with one planted fragile layer: ``fc2`` has a column of huge weights
on an input that is always zero. In floating point those weights do nothing, but they set every
row's per-channel INT8 scale, so all its other weights round to (almost) zero: quantizing fc2
alone wrecks the output while the other layers are benign. Both modes must rank it first and the
skip recommendation must pick it. Also: quantizer sharing on a residual block (the skip list
matches a fresh compile), matmul layers, report files, the resumable cache and every error.
"""
from __future__ import annotations

import json
import math

import models
import pytest
import torch
from torch import nn

import qatgraph
import qatgraph.sensitivity_analysis.scores as sens
from qatgraph.errors import SensitivityError


class PlantedFragile(nn.Module):
    """Four ReLU Linear layers (32->64->64->64->64) and a 10-class head; fc2 is the fragile one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 64)
        self.fc3, self.fc4 = nn.Linear(64, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)  # N=10 < min_channels: stays FP (a layer that is never analysed)
        self.relu = nn.ReLU()
        with torch.no_grad():
            for layer in (self.fc1, self.fc2, self.fc3, self.fc4, self.head):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")  # well-separated logits
                layer.bias.zero_()
            self.fc1.weight[0].zero_()
            self.fc1.bias[0] = -1.0  # feature 0 is relu(-1) = 0 for every input
            self.fc2.weight[:, 0] = 40.0  # ~200x the other weights, on the dead feature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            x = self.relu(layer(x))
        return self.head(x)


LAYERS = ["fc1", "fc2", "fc3", "fc4"]


def _batches(n: int = 128, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))
    return list(x.split(size))


def _compiled(model: nn.Module | None = None, policy="tensorrt") -> nn.Module:
    model = (model or PlantedFragile()).eval()
    batches = _batches()
    qmodel = qatgraph.compile(model, policy, example_inputs=(batches[0][:2],))
    qatgraph.calibrate(qmodel, batches, show_progress=False)
    return qmodel


def _enabled(model: nn.Module) -> dict[str, bool]:
    return {name: q.is_enabled for name, q in qatgraph.iter_quantizers(model)}


class CountingMetric:
    """Top-1 agreement with FP; counts calls and can raise on the n-th call (a simulated crash)."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.agreement = sens.agreement_metric(_batches())
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated crash")
        return self.agreement(model)


# ------------------------------------------------------------------------------------- ranking
def test_fast_mode_ranks_the_planted_fragile_layer_first() -> None:
    qmodel = _compiled()
    qmodel.train()
    before = _enabled(qmodel)
    report = sens.sensitivity(qmodel, _batches(), gradient=True, show_progress=False)
    assert report.mode == "fast" and sorted(report.ranking) == LAYERS
    assert report.ranking[0] == "fc2"
    assert report.scores["fc2"] > 10 * max(report.scores[layer] for layer in LAYERS if layer != "fc2")
    fc2 = report.details["fc2"]
    assert fc2["nmse_only"] > 0.01 and fc2["sqnr_only_db"] < 20
    assert fc2["score_fast"] == pytest.approx(fc2["nmse_only"] + max(fc2["error_drop"], 0.0))
    assert report.ranking_by("fisher")[0] == "fc2"
    # 1 FP reference + 1 all-quantized + 2 per layer; one backward pass per batch.
    assert report.baseline["forward_passes"] == 2 + 2 * len(LAYERS)
    assert report.baseline["backward_passes"] == 4 and report.baseline["num_samples"] == 128
    assert _enabled(qmodel) == before and qmodel.training  # quantizer states and train mode restored


def test_full_mode_ranks_the_fragile_layer_first_and_top_k_limits_the_metric_calls() -> None:
    qmodel = _compiled()
    metric = CountingMetric()
    report = sens.sensitivity(qmodel, _batches(), metric, mode="full", show_progress=False)
    assert report.ranking[0] == "fc2" and metric.calls == len(LAYERS) + 2
    assert report.baseline["metric_fp"] == 1.0 and report.baseline["metric_int8"] < 0.9
    assert report.scores["fc2"] == pytest.approx(report.details["fc2"]["metric_without"] - report.baseline["metric_int8"])
    limited = CountingMetric()
    top = sens.sensitivity(qmodel, _batches(), limited, mode="full", top_k=1, show_progress=False)
    assert limited.calls == 1 + 2 and top.ranking[0] == "fc2"
    assert [layer for layer, score in top.scores.items() if score is not None] == ["fc2"]
    assert all("score_fast" in top.details[layer] for layer in LAYERS)  # the rest is ordered by the fast tier


def test_num_samples_input_fn_and_loss_fn_see_the_same_truncated_items() -> None:
    qmodel = _compiled()
    labelled = [(x, torch.arange(len(x)) % 10) for x in _batches(size=48)]
    seen = []

    def cross_entropy(output: torch.Tensor, item: tuple) -> torch.Tensor:
        seen.append((len(output), len(item[1])))
        return nn.functional.cross_entropy(output, item[1])

    report = sens.sensitivity(qmodel, iter(labelled), num_samples=100, input_fn=lambda item: item[0], gradient=True,
                              loss_fn=cross_entropy, show_progress=False)
    assert report.baseline["num_samples"] == 100 and report.baseline["num_batches"] == 3
    assert seen == [(48, 48), (48, 48), (4, 4)]
    assert all(report.details[layer]["fisher"] > 0 for layer in LAYERS)


# ------------------------------------------------------------------------------------- skip selection
def test_recommend_skip_reaches_the_budget_and_apply_skip_records_it() -> None:
    qmodel = _compiled()
    metric = sens.agreement_metric(_batches())
    report = sens.sensitivity(qmodel, _batches(), show_progress=False)
    before = _enabled(qmodel)
    assert metric(qmodel) < 1.0 - 0.05  # full INT8 misses the budget
    rec = report.recommend_skip(metric, max_drop=0.05)
    assert rec.skip == ["fc2"] and rec.within_budget and rec.metric_fp == 1.0
    assert rec.metric_reached >= 0.95 > rec.metric_int8 and rec.steps == [("fc2", rec.metric_reached)]
    assert _enabled(qmodel) == before  # recommend_skip only tries skips
    assert sens.apply_skip(qmodel, rec.skip, report=report) == ["fc2"]
    assert metric(qmodel) == rec.metric_reached
    decision = qmodel.qatgraph_info.layer("fc2")
    assert not decision.quantized and decision.reason.startswith("skipped by sensitivity analysis (rank 1 of 4")
    row = next(r for r in qatgraph.summary(qmodel, print_table=False).rows if r.layer == "fc2")
    assert row.status == "FP" and "sensitivity" in row.reason
    fresh = qatgraph.compile(PlantedFragile(), qatgraph.Policy.from_dict({"preset": "tensorrt", "skip": rec.skip}))
    assert qmodel.qatgraph_info.policy.skip == ["fc2"]
    assert {n for n, on in _enabled(qmodel).items() if on} == {n for n, on in _enabled(fresh).items() if on}


def test_recommend_skip_stops_at_max_skipped() -> None:
    qmodel = _compiled()
    report = sens.sensitivity(qmodel, _batches(), show_progress=False)
    rec = report.recommend_skip(sens.agreement_metric(_batches()), max_drop=0.0, max_skipped=0)
    assert rec.skip == [] and rec.steps == [] and not rec.within_budget and rec.metric_reached == rec.metric_int8


def test_auto_skip_follows_the_policy_sensitivity_config() -> None:
    qmodel = _compiled()
    config = qatgraph.SensitivityConfig(mode="full", num_samples=96, max_drop=0.05, top_k=2)
    report, rec = sens.auto_skip(qmodel, iter(_batches()), config, show_progress=False)
    assert report.mode == "full" and report.baseline["num_samples"] == 96 and report.baseline["metric_evaluations"] == 4
    assert rec.skip == ["fc2"] and rec.within_budget
    assert qmodel.qatgraph_info.skipped_layers == ["fc2", "head"]


def test_shared_quantizers_on_a_residual_block_follow_the_compile_skip_rule() -> None:
    block = models.randomize_batchnorm(models.BasicBlock(16, 16)).eval()
    x = torch.randn(8, 16, 8, 8)
    qmodel = qatgraph.compile(block, "tensorrt", example_inputs=(x[:2],))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    by_layer = sens.layer_quantizers(qmodel)
    shared = by_layer["conv1"].inputs[0]
    assert by_layer["conv2"].residual == (shared,)  # the block input feeds conv1 and the residual Add
    report = sens.sensitivity(qmodel, [x], show_progress=False)
    assert report.details["conv1"]["shared_quantizers"] == [shared]
    sens.apply_skip(qmodel, ["conv2"])
    enabled = _enabled(qmodel)
    assert enabled[shared] and not enabled["conv2.weight_quantizer"] and not enabled[by_layer["conv2"].inputs[0]]
    fresh = qatgraph.compile(block, {"preset": "tensorrt", "skip": ["conv2"]}, example_inputs=(x[:2],))
    assert {n for n, on in enabled.items() if on} == {n for n, on in _enabled(fresh).items() if on}


def test_matmul_layers_are_analysed_without_a_fisher_score() -> None:
    block = models.AttentionBlock(dim=64, heads=4).eval()
    x = torch.randn(4, 16, 64)
    qmodel = qatgraph.compile(block, "tensorrt", example_inputs=(x[:2],))
    qatgraph.calibrate(qmodel, [x], show_progress=False)
    report = sens.sensitivity(qmodel, [x], gradient=True, show_progress=False)
    matmuls = [d.layer for d in qmodel.qatgraph_info.layers if d.kind == "matmul" and d.quantized]
    assert matmuls and set(qmodel.qatgraph_info.quantized_layers) == set(report.ranking)
    assert all(math.isfinite(report.scores[layer]) for layer in report.ranking)
    assert all(report.details[layer]["fisher"] is None for layer in matmuls)
    assert all(report.details[layer]["fisher"] >= 0 for layer in ("qkv", "proj", "mlp.fc1", "mlp.fc2"))


# ------------------------------------------------------------------------------------- report files
def test_report_files_are_valid(tmp_path) -> None:
    qmodel = _compiled()
    report = sens.sensitivity(qmodel, _batches(), gradient=True, show_progress=False)
    report.recommend_skip(sens.agreement_metric(_batches()), max_drop=0.05)
    paths = report.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sensitivity.html", "sensitivity.json",
                                                                     "sensitivity.md"]  # no temporaries left
    data = json.loads(paths["json"].read_text())
    assert data["ranking"][0] == "fc2" and data["recommendation"]["skip"] == ["fc2"]
    assert sens.SensitivityReport.load(tmp_path / "out").to_dict() == data
    page = paths["html"].read_text()
    assert "data:image/png;base64," in page and all(layer in page for layer in LAYERS)
    assert page.count('<tr class="skipped">') == 1
    markdown = paths["md"].read_text()
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0].startswith("| rank | layer | score |") and len(table) == 2 + len(LAYERS)
    assert table[2].startswith("| 1 | fc2 |") and "NMSE" in markdown and "yes |" in table[2]


# ------------------------------------------------------------------------------------- cache
def test_cache_resumes_a_crashed_full_run(tmp_path) -> None:
    qmodel = _compiled()
    crashing = CountingMetric(fail_on_call=2 + 2 + 1)  # both baselines and two layers finish, then a crash
    with pytest.raises(KeyboardInterrupt):
        sens.sensitivity(qmodel, _batches(), crashing, mode="full", cache_dir=tmp_path, show_progress=False)
    (cache_file,) = tmp_path.iterdir()
    assert len(cache_file.read_text().splitlines()) == 4
    with open(cache_file, "a") as handle:
        handle.write('{"id": "full:fc')  # a record torn by the crash
    resumed = CountingMetric()
    report = sens.sensitivity(qmodel, _batches(), resumed, mode="full", cache_dir=tmp_path, show_progress=False)
    assert resumed.calls == len(LAYERS) - 2 and report.baseline["cached_results"] == 4
    again = CountingMetric()
    cached = sens.sensitivity(qmodel, _batches(), again, mode="full", cache_dir=tmp_path, show_progress=False)
    assert again.calls == 0 and cached.scores == report.scores and cached.ranking[0] == "fc2"
    fresh = sens.sensitivity(qmodel, _batches(), CountingMetric(), mode="full", show_progress=False)
    assert fresh.scores == report.scores


def test_cache_skips_finished_fast_layers_and_is_keyed_by_data(tmp_path) -> None:
    qmodel = _compiled()
    first = sens.sensitivity(qmodel, _batches(), cache_dir=tmp_path, show_progress=False)
    second = sens.sensitivity(qmodel, _batches(), cache_dir=tmp_path, show_progress=False)
    assert second.baseline["forward_passes"] == 1  # only the FP reference; the rest came from the cache
    assert second.scores == first.scores and second.baseline["cached_results"] == len(LAYERS) + 1
    sens.sensitivity(qmodel, _batches(seed=2), cache_dir=tmp_path, show_progress=False)
    assert len(list(tmp_path.iterdir())) == 2  # other data, other fingerprint


# ------------------------------------------------------------------------------------- errors
def _no_quantized_layer() -> nn.Module:
    with pytest.warns(qatgraph.QatgraphWarning, match="quantized no layer"):
        return qatgraph.compile(PlantedFragile(), {"preset": "tensorrt", "skip": LAYERS})


@pytest.mark.parametrize("call, message", [
    (lambda q: sens.sensitivity(q, [], show_progress=False), "yielded no batches"),
    (lambda q: sens.sensitivity(PlantedFragile(), _batches()), "not produced by qatgraph.compile"),
    (lambda q: sens.sensitivity(q, _batches(), mode="fulll"), "did you mean 'full'"),
    (lambda q: sens.sensitivity(q, _batches(), mode="full"), "pass metric="),
    (lambda q: sens.sensitivity(q, _batches(), lambda m: float("nan"), mode="full", show_progress=False),
     "must be finite"),
    (lambda q: sens.sensitivity(q, _batches(), lambda m: "good", mode="full", show_progress=False),
     "must return one float"),
    (lambda q: sens.sensitivity(q, _batches(), num_samples=0), "positive number of samples"),
    (lambda q: sens.sensitivity(q, _batches(), top_k=0), "positive number of layers"),
    (lambda q: sens.sensitivity(q, [["not a tensor"]], show_progress=False), "holds no tensor"),
    (lambda q: sens.apply_skip(q, ["fc22"]), "did you mean 'fc2'"),
    (lambda q: sens.sensitivity(_no_quantized_layer(), _batches()), "no quantized layer"),
    (lambda q: sens.sensitivity(qatgraph.compile(PlantedFragile()), _batches()), "run qatgraph.calibrate"),
])
def test_errors_say_what_and_how_to_fix(call, message) -> None:
    qmodel = _compiled()
    before = _enabled(qmodel)
    with pytest.raises(SensitivityError, match=message):
        call(qmodel)
    assert _enabled(qmodel) == before
