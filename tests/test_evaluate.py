from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from moeviz.apply import apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.data import sample_sequences
from moeviz.evaluate import EvalConfig, evaluate, fidelity, parameter_counts, perplexity
from moeviz.plan import PruningPlan
from moeviz.runs import Run, RunStore
from moeviz.tiny import tiny_model


class Oracle(nn.Module):
    """Puts (almost) all probability on the true next token."""

    def __init__(self, vocab):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 100.0)
        return SimpleNamespace(logits=logits)


def test_perplexity_of_an_oracle_is_one_and_of_noise_near_vocab():
    tokens = sample_sequences("random", 4, 32, vocab_size=50)
    assert perplexity(Oracle(50), tokens) == pytest.approx(1.0, abs=1e-6)
    uniform = Oracle(50)
    uniform.forward = lambda input_ids, use_cache=False: SimpleNamespace(logits=torch.zeros(*input_ids.shape, 50))
    assert perplexity(uniform, tokens) == pytest.approx(50.0, rel=1e-5)


def test_a_model_against_itself_has_zero_kl_and_full_agreement():
    model = tiny_model("olmoe")
    tokens = sample_sequences("random", 4, 16, vocab_size=128)
    f = fidelity(model, model, tokens)
    assert f["kl"] == pytest.approx(0.0, abs=1e-7) and f["top1_agreement"] == 1.0
    other = fidelity(tiny_model("olmoe", seed=3), model, tokens)
    assert other["kl"] > 0.001 and other["top1_agreement"] < 1.0


def test_parameter_accounting_matches_a_hand_count():
    model = tiny_model("mixtral")  # 2 layers × 8 experts × (2·48·32 + 32·48) routed parameters
    per_expert = 2 * 48 * 32 + 32 * 48
    counts = parameter_counts(model)
    assert counts["routed_params"] == 2 * 8 * per_expert
    assert counts["params"] == sum(p.numel() for p in model.parameters()) and counts["bytes"] == 4 * counts["params"]
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0), use_cache=False)
    pruned = {0: [0, 1], 1: [2, 3]}
    info = model_info(model)
    removed = parameter_counts(apply_plan(tiny_model("mixtral"), PruningPlan("m", 0.25, mode="remove", model=info, pruned=pruned)))
    assert removed["routed_params"] == 2 * 6 * per_expert
    assert counts["params"] - removed["params"] == 4 * per_expert + 4 * 32  # and 4 router rows
    novice_plan = PruningPlan("m", 0.25, mode="novice", model=info, pruned=pruned)
    novice = parameter_counts(apply_plan(tiny_model("mixtral"), novice_plan, stats))
    assert novice["novice_params"] == 4 * 32 and novice["routed_params"] == 2 * 6 * per_expert
    assert novice["params"] == removed["params"] + 4 * 32 + 4 * 32  # novices, and the router keeps its rows
    sparse_plan = PruningPlan("m", 0.0, model=info, sparsity=0.5)
    sparse = parameter_counts(apply_plan(tiny_model("mixtral"), sparse_plan, stats))
    assert sparse["routed_nonzero"] == counts["routed_params"] // 2 and sparse["params"] == counts["params"]


@pytest.mark.parametrize("mode", ["remove", "novice", "sparsity"])
def test_a_plan_in_place_reports_what_the_pruned_model_does(mode):
    """evaluate(plan=…) on the original's weights equals evaluate of the pruned model against the original."""
    model = tiny_model("mixtral")
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0), use_cache=False)
    info = model_info(model)
    plan = (PruningPlan("m", 0.5, model=info, sparsity=0.5) if mode == "sparsity" else
            PruningPlan("m", 0.25, mode=mode, model=info, pruned={0: [0, 1], 1: [2, 3]}))
    config = EvalConfig(data="random", num_samples=6, seq_len=16, batch_size=4)
    in_place = evaluate(model, config, plan=plan, stats=stats)
    pruned = evaluate(apply_plan(tiny_model("mixtral"), plan, stats), config, reference=model)
    for key in ("perplexity", "kl", "top1_agreement"):
        assert in_place[key] == pytest.approx(pruned[key], rel=1e-4, abs=1e-6), key
    for key in ("params", "bytes", "routed_params", "routed_nonzero", "novice_params"):
        assert in_place[key] == pruned[key], key
    assert in_place["params_saved"] == pytest.approx(pruned["params_saved"])
    assert 0 < in_place["perplexity_se"] < in_place["perplexity"]


def test_evaluate_reports_every_metric():
    model = tiny_model("qwen2_moe")
    config = EvalConfig(data="random", num_samples=4, seq_len=16, batch_size=2, throughput=True)
    report = evaluate(model, config, reference=model)
    assert report["kl"] == pytest.approx(0, abs=1e-7) and report["params_saved"] == 0
    assert 1 < report["perplexity"] and report["tokens_per_s"] > 0 and report["perplexity_se"] > 0


def test_runs_are_stored_listed_and_deleted(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    run = Run("demo", "mone", 0.25, {"perplexity": 3.5, "task_mean": 0.9}, "novice", "layer", "cache/x", "fp")
    run_id = store.add(run)
    store.add(Run("demo", "original", 0.0, {"perplexity": 3.0}))
    again = RunStore(tmp_path / "runs.sqlite").get(run_id)
    assert (again.model, again.method, again.ratio, again.metrics, again.mode, again.calibration) == \
        (run.model, run.method, run.ratio, run.metrics, run.mode, run.calibration)
    assert [r.method for r in store.list(model="demo")] == ["mone", "original"]
    assert list(store.table(method="mone")["perplexity"]) == [3.5]
    store.delete(run_id)
    assert [r.method for r in store.list()] == ["original"]
    with pytest.raises(KeyError, match="No run"):
        store.delete(run_id)
    with pytest.raises(KeyError, match="Cannot filter"):
        store.list(colour="red")


def test_demo_model_perplexity_is_far_below_uniform_and_unigram():
    from moeviz.loading import load_model

    model, tokenizer = load_model("demo", device="cpu")
    config = EvalConfig(num_samples=64, throughput=False)
    report = evaluate(model, config, tokenizer)
    tokens = sample_sequences(config.data, config.num_samples, config.seq_len, tokenizer, config.seed, split="heldout")
    p = torch.bincount(tokens.reshape(-1)).double() / tokens.numel()
    unigram = torch.exp(-(p[p > 0] * p[p > 0].log()).sum()).item()  # the best context-free model
    assert report["perplexity"] < unigram / 2 < model.config.vocab_size / 2, (report["perplexity"], unigram)


def test_sweep_stores_every_run_and_averages_random_over_seeds(tmp_path):
    from moeviz.sweep import paper_table, sweep

    model = tiny_model("mixtral")
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=8, seq_len=16, probe_tokens=0),
                         use_cache=False)
    store = RunStore(tmp_path / "runs.sqlite")
    seen = []
    frame = sweep(model, None, stats, ["frequency", "mone:remove", "random", "moe_pruner"], [0.25],
                  EvalConfig(data="random", num_samples=4, seq_len=16, throughput=False), store=store,
                  progress=lambda done, total, label: seen.append((done, total)), random_seeds=3)
    assert list(frame["method"]) == ["original", "frequency", "mone", "random", "moe_pruner"]
    assert list(frame["mode"]) == ["", "remove", "remove", "remove", "sparsity"]
    assert seen[-1] == (7, 7) and len(store.list()) == 7
    randoms = store.table(method="random")
    row = frame.set_index("method").loc["random"]
    assert row["runs"] == 3 and row["perplexity"] == pytest.approx(randoms["perplexity"].mean())
    assert row["perplexity_std"] == pytest.approx(randoms["perplexity"].std())
    assert len(set(randoms["perplexity"])) == 3, "each seed prunes other experts"
    assert frame.set_index("method").loc["original", "kl"] == pytest.approx(0, abs=1e-7)
    assert list(paper_table(frame).columns[:4]) == ["method", "mode", "ratio", "runs"]
    again = sweep(model, None, stats, ["frequency", "random"], [0.25], EvalConfig(data="random", num_samples=4,
                  seq_len=16, throughput=False), store=store, random_seeds=3)
    assert len(store.list()) == 7 and again.set_index("method").loc["random", "perplexity"] == row["perplexity"]


def test_a_stored_evaluation_is_reused_only_for_the_same_plan_and_statistics():
    from moeviz.runs import plan_digest

    a = PruningPlan("moe_pruner", 0.5, sparsity=0.5, calibration="cache/one-pass")
    b = PruningPlan("moe_pruner", 0.5, sparsity=0.5, calibration="cache/sequential")
    assert plan_digest(a) != plan_digest(b)  # the masks come from the statistics
    c = PruningPlan("frequency", 0.25, pruned={0: [1]}, calibration="cache/one-pass")
    d = PruningPlan("reap", 0.25, pruned={0: [1]}, calibration="cache/other")
    assert plan_digest(c) == plan_digest(d)  # removing the same experts is the same model


def test_a_plan_is_evaluated_on_each_held_out_source_of_a_mix(tmp_path):
    """Several held-out sources: the pooled metrics and each source's, with its demo task."""
    from moeviz.loading import load_model
    from moeviz.methods import PlanConfig, make_plan

    model, tokenizer = load_model("demo", device="cpu")
    stats, _ = calibrate(model, CalibConfig(data="demo", num_samples=8, seq_len=32, cache_dir=tmp_path), tokenizer)
    plan = make_plan(stats, PlanConfig("mone", ratio=0.25))
    config = EvalConfig(data="arithmetic=demo:arithmetic,code=demo:code", num_samples=6, seq_len=32,
                        demo_tasks=True, task_examples=20)
    report = evaluate(model, config, tokenizer, plan=plan, stats=stats)
    assert set(report["sources"]) == {"arithmetic", "code"}
    for name in ("arithmetic", "code"):
        alone = evaluate(model, EvalConfig(data=f"demo:{name}", num_samples=6, seq_len=32), tokenizer, plan=plan,
                         stats=stats)
        entry = report["sources"][name]
        for key in ("perplexity", "perplexity_se", "kl", "top1_agreement"):
            assert entry[key] == pytest.approx(alone[key], rel=1e-5), (name, key)  # batched otherwise
        assert entry["task"] == report[f"task_{name}"] and entry["task_se"] == report["se"][f"task_{name}"]
    logs = [torch.log(torch.tensor(report["sources"][n]["perplexity"])) for n in ("arithmetic", "code")]
    assert report["perplexity"] == pytest.approx(torch.exp(sum(logs) / 2).item(), rel=1e-6)  # equal sequence counts
    assert report["kl"] == pytest.approx(sum(report["sources"][n]["kl"] for n in ("arithmetic", "code")) / 2)


def test_the_runs_of_a_mix_are_tabled_per_source():
    from moeviz.runs import source_table

    setting = dict(data="a=demo:arithmetic,b=demo:code")
    base = Run("demo", "original", 0.0, dict(eval=setting, sources=dict(
        a=dict(perplexity=2.0, perplexity_se=0.1, task=0.9, task_se=0.02), b=dict(perplexity=3.0, perplexity_se=0.2))),
        fingerprint="f", id=1)
    run = Run("demo", "mone", 0.25, dict(eval=setting, sources=dict(
        a=dict(perplexity=2.5, perplexity_se=0.1, kl=0.2, top1_agreement=0.9, task=0.6, task_se=0.03),
        b=dict(perplexity=3.1, perplexity_se=0.2, kl=0.05, top1_agreement=0.97))), mode="novice", fingerprint="f", id=2)
    table = source_table([base, run, Run("demo", "frequency", 0.5, dict(eval=setting), fingerprint="f", id=3)])
    assert list(table["source"]) == ["a", "b", "a", "b"]
    row = table[(table["id"] == 2) & (table["source"] == "a")].iloc[0]
    assert row["Δ perplexity"] == "+0.5" and row["Δ task"] == "-0.3" and row["task"] == "0.6 ± 0.03"
    assert row["kl"] == 0.2


def test_the_run_tables_show_each_task_and_the_change_against_the_original_in_few_columns():
    from moeviz.runs import against_original, delta_table, recovery_pairs, task_table

    setting = dict(data="demo")
    base = Run("demo", "original", 0.0, dict(eval=setting, perplexity=14.0, perplexity_se=0.5, task_mean=0.9, kl=0.0,
                                              task_arithmetic=1.0, task_code=0.8, se=dict(task_arithmetic=0.0)),
               fingerprint="f", id=1)
    run = Run("demo", "mone", 0.25, dict(eval=setting, perplexity=15.0, perplexity_se=0.6, task_mean=0.6, kl=0.2,
                                          task_arithmetic=0.47, task_code=0.73, se=dict(task_arithmetic=0.035),
                                          params_saved=0.2), mode="novice", fingerprint="f", id=2)
    recovered = Run("demo", "mone", 0.25, dict(eval=setting, perplexity=3.8, task_mean=0.82, kl=0.4, task_code=0.8,
                                                recovery=dict(parent_run=2, steps=120, minutes=2.0)),
                    mode="novice", fingerprint="f", id=3)
    table = delta_table([base, run, recovered]).set_index("id")
    assert table.loc[2, "Δ perplexity"] == "+1" and table.loc[2, "Δ task_mean"] == "-0.3"
    assert table.loc[3, "Δ perplexity"] == "not comparable"  # recovery trained on this very text
    assert not {"arithmetic", "code"} & set(table.columns)  # in the tasks' own table, so that both fit a page
    tasks = task_table([base, run, recovered]).set_index("id")
    assert tasks.loc[2, "arithmetic"] == "0.47 ± 0.035" and tasks.loc[2, "code"] == "0.73"
    assert tasks.loc[3, "code"] == "0.8" and tasks.loc[3, "arithmetic"] != tasks.loc[3, "arithmetic"]  # NaN: not run

    rows = against_original(run, base).set_index("metric")  # one row per metric, the tasks after the main ones
    assert list(rows.index) == ["perplexity", "task_mean", "kl", "arithmetic", "code", "params_saved"]
    assert rows.loc["arithmetic", "original"] == "1" and rows.loc["arithmetic", "mone novice 25 %"] == "0.47 ± 0.035"
    assert rows.loc["arithmetic", "change"] == "-0.53" and pd.isna(rows.loc["params_saved", "change"])
    assert pd.isna(against_original(recovered, base).set_index("metric").loc["perplexity", "change"])

    pairs = recovery_pairs([base, run, recovered]).set_index("metric")
    assert list(pairs.columns) == ["run", "plan", "recovery", "original", "pruned", "recovered"]
    assert pairs.loc["task_mean", ["original", "pruned", "recovered"]].tolist() == [0.9, 0.6, 0.82]
    assert pairs.loc["kl", "recovery"] == "120 steps, 2.0 min" and set(pairs["run"]) == {3}