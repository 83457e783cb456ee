"""The second shipped model, `demo-fine` (Qwen2-MoE, fine-grained experts, a shared expert):
it loads offline by name, its adapter is the shared-expert family's, and it calibrates and
takes a plan in seconds."""

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from moeviz.adapters import get_adapter
from moeviz.apply import applied, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.checkpoint import demo_names, demo_path, is_demo, resolve_source
from moeviz.demo import DEMO_MODELS, DOMAINS, task_accuracies
from moeviz.demo.train import SHAPES, build_model, build_tokenizer
from moeviz.loading import load_model, model_fingerprint
from moeviz.methods import PlanConfig, make_plan

FINE = DEMO_MODELS["demo-fine"].path


@pytest.fixture(scope="module")
def fine():
    model, tokenizer = load_model("demo-fine", device="cpu")
    return model, tokenizer, json.loads((FINE / "metrics.json").read_text())


def test_both_demo_models_resolve_by_name():
    assert demo_names() == ["demo", "demo-fine"] and is_demo("demo-fine") and not is_demo("demo-finer")
    assert resolve_source("demo-fine") == str(demo_path("demo-fine")) == str(FINE)
    assert resolve_source("demo") == str(DEMO_MODELS["demo"].path)
    with pytest.raises(ValueError, match="demo-fine"):
        demo_path("demo-xl")


def test_checkpoint_is_a_small_qwen2_moe_with_fine_experts_and_a_shared_expert(fine):
    model, tokenizer, _ = fine
    config = model.config
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and config.model_type == "qwen2_moe"
    assert config.num_experts >= 32 and 4 <= config.num_experts_per_tok <= 8
    assert len(tokenizer) == config.vocab_size
    assert sum(f.stat().st_size for f in FINE.iterdir()) < 30e6
    adapter = get_adapter(model)
    assert adapter.family.model_type == "qwen2_moe"
    assert len(adapter.layers) == config.num_hidden_layers
    assert all(len(layer.shared) == 1 and layer.num_experts == config.num_experts for layer in adapter.layers)


def test_metrics_json_reports_every_expert_used(fine):
    _, _, metrics = fine
    assert metrics["shape"] == "fine" and list(metrics["accuracy"]) == list(DOMAINS)
    assert min(metrics["min_expert_share"]) > 0  # no dead expert
    assert max(metrics["routing_js_bits"]) > 0.1  # the domains are routed differently


def test_task_accuracies_reproduce_metrics_json_on_a_subset(fine):
    model, tokenizer, metrics = fine
    accuracy = task_accuracies(model, tokenizer, n=40, seed=metrics["eval_seed"])
    assert np.mean(list(accuracy.values())) == pytest.approx(metrics["mean_accuracy"], abs=0.1)
    assert min(accuracy.values()) >= 0.9  # every task learnt, the two long-range ones included


def test_the_shipped_checkpoint_is_what_train_shape_fine_builds(fine):
    model, _, metrics = fine
    cfg = SHAPES["fine"]
    assert metrics["config"] == asdict(cfg) and metrics["steps"] == cfg.steps
    built = build_model(replace(cfg, num_layers=1), build_tokenizer()).config  # one layer: quick
    for key in ("model_type", "hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "vocab_size"):
        assert getattr(built, key) == getattr(model.config, key), key


def test_a_calibration_and_a_plan_run_on_it(fine, tmp_path):
    model, tokenizer, _ = fine
    config = CalibConfig(data="demo", num_samples=8, seq_len=64, cache_dir=tmp_path)
    stats, _ = calibrate(model, config, tokenizer)
    tokens = 8 * 64
    assert torch.equal(stats["count"].sum(1), torch.full((stats.num_layers,), float(tokens * stats.top_k)))
    plan = make_plan(stats, PlanConfig("frequency", ratio=0.25))
    plan.validate(model_info(model, fingerprint=model_fingerprint(model)))
    quarter = model.config.num_experts // 4
    assert all(len(set(experts)) == quarter for experts in plan.pruned.values())
    ids = tokenizer(["12+30=42\nrev abc:cba\n"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = model(ids).logits
        with applied(model, plan, stats):
            pruned = model(ids).logits
        after = model(ids).logits
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, before)
    assert torch.equal(after, before)  # the plan was applied in place and taken back


def test_the_ratio_curve_falls_off_and_scoring_beats_random(fine, tmp_path):
    """What the Prune page draws on demo-fine: drift from the original grows with the ratio, and
    MoNE's scores drift less than random picks at half the experts."""
    from moeviz.evaluate import ratio_curve

    model, tokenizer, _ = fine
    stats, _ = calibrate(model, CalibConfig(data="demo", num_samples=32, seq_len=64, cache_dir=tmp_path), tokenizer)
    curves = ratio_curve(model, tokenizer, stats, ["mone", "random"], [0.0, 0.25, 0.5], num_samples=4, seq_len=64)
    kl = {method: [row["kl"] for row in rows] for method, rows in curves.items()}
    assert kl["mone"][0] == pytest.approx(0.0, abs=1e-6)
    assert kl["mone"][0] < kl["mone"][1] < kl["mone"][2]
    assert kl["mone"][2] < kl["random"][2]
