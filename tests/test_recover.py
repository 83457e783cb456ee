"""Recovery: expert-wise distillation of a pruned model from its original."""

import json

import pytest
import torch

from moeviz.adapters import get_adapter
from moeviz.apply import apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.checkpoint import fingerprint
from moeviz.cli import main
from moeviz.data import sample_sequences
from moeviz.export import export_plan
from moeviz.filecheck import check_files
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import PlanError, PruningPlan, read_lineage
from moeviz.recover import DistillConfig, distill, plan_of, recover_checkpoint
from moeviz.runs import RunStore
from moeviz.tiny import tiny_model

TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
ONE_STEP = dict(steps=1, batch_size=4, lr=1e-4, warmup_steps=1)


def _stats(model, tmp_path):
    return calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path), None)[0]


def _plan(model, mode, pruned, **kw):
    info = model_info(model, fingerprint=fingerprint(model))
    return PruningPlan("manual", 0.25, "layer", mode, info,
                       pruned={layer: list(pruned) for layer in info["layer_indices"]}, **kw)


def _pruned(family, plan_for, tmp_path):
    """(teacher, student pruned in memory by the plan, the plan)."""
    teacher = tiny_model(family)
    stats = _stats(teacher, tmp_path)
    plan = plan_for(teacher, stats)
    return teacher, apply_plan(tiny_model(family), plan, stats), plan


def test_experts_are_matched_by_their_original_index_after_a_removal(tmp_path):
    # expert 0 removed: the student's expert j is the teacher's j+1. Before any step the kept
    # experts equal their teachers, so the experts' error is zero only if they are matched right.
    teacher, student, plan = _pruned("qwen3_moe", lambda m, s: _plan(m, "remove", [0]), tmp_path)
    report = distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "lr": 0.0}), plan)
    assert report["first"]["mse"] < 1e-10
    shifted = PruningPlan(**{**vars(plan), "pruned": {i: [7] for i in plan.pruned}})  # wrong: same count, other expert
    assert distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "lr": 0.0}), shifted)["first"]["mse"] > 1e-3


def test_one_step_lowers_the_loss_on_a_fixed_batch(tmp_path):
    # the batch is all of TOKENS, so the second step's loss is the first batch's after one step.
    # Novices: after a removal the kept experts start at the error's minimum (zero), which
    # Adam's first step, the same size for every weight, can only leave.
    teacher, student, plan = _pruned("mixtral", lambda m, s: _plan(m, "novice", [2, 5]), tmp_path)
    report = distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "steps": 2}), plan)
    assert report["steps"] == 2 and report["last"]["loss"] < report["first"]["loss"]
    assert report["last"]["ce"] < report["first"]["ce"]


def test_only_what_pruning_touched_trains(tmp_path):
    teacher, student, plan = _pruned("qwen2_moe", lambda m, s: _plan(m, "remove", [1, 6]), tmp_path)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    distill(student, teacher, TOKENS, DistillConfig(**ONE_STEP), plan)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".mlp.experts." in n or ".mlp.gate." in n for n in changed)
    assert not any("shared_expert" in n or "embed" in n or "self_attn" in n for n in changed)
    assert not any(p.requires_grad for p in student.parameters())  # frozen again, in eval mode
    assert not student.training


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_zeroed_weights_stay_zero(family, tmp_path):
    teacher, student, plan = _pruned(family, lambda m, s: make_plan(s, PlanConfig("moe_pruner", ratio=0.5)), tmp_path)
    experts = [layer.experts for layer in get_adapter(student).layers]
    zeros = [(p == 0).clone() for e in experts for p in e.parameters()]
    before = [p.detach().clone() for e in experts for p in e.parameters()]
    distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "steps": 3}), plan)
    after = [p for e in experts for p in e.parameters()]
    assert all(torch.all(p[z] == 0) for p, z in zip(after, zeros))
    assert sum(z.sum().item() for z in zeros) > 0.4 * sum(p.numel() for p in after)  # half of each row
    assert any(not torch.equal(p, b) for p, b in zip(after, before))  # the rest trained


def test_novices_and_merged_experts_receive_gradients(tmp_path):
    teacher, student, plan = _pruned("qwen3_moe", lambda m, s: _plan(m, "novice", [1, 6]), tmp_path)
    novices = [get_adapter(student).layers[i].novices for i in range(2)]
    before = [n.detach().clone() for n in novices]
    distill(student, teacher, TOKENS, DistillConfig(**ONE_STEP), plan)
    assert all(not torch.equal(n, b) for n, b in zip(novices, before))

    def merge(model, stats):
        return _plan(model, "merge", [1, 6], merge_into={i: {1: 2, 6: 2} for i in get_adapter(model).layer_indices})

    teacher, student, plan = _pruned("qwen3_moe", merge, tmp_path / "merge")
    layer = get_adapter(student).layers[0]  # kept: 0, 2 (the merged one, now 1), 3, 4, 5, 7
    merged = layer.expert_weights(1).down.detach().clone()
    distill(student, teacher, TOKENS, DistillConfig(**ONE_STEP), plan)
    assert not torch.equal(layer.expert_weights(1).down, merged)


def test_a_recovered_checkpoint_reloads_with_the_logits_it_had_in_memory(tmp_path):
    teacher = tiny_model("qwen3_moe")
    teacher.save_pretrained(tmp_path / "original")
    stats = _stats(teacher, tmp_path / "cache")
    plan = make_plan(stats, PlanConfig("mone", ratio=0.25))  # novices: a moeviz-format checkpoint
    export_plan(tmp_path / "original", plan, stats, tmp_path / "pruned")
    teacher, _ = load_model(str(tmp_path / "original"), device="cpu")
    student, report = recover_checkpoint(tmp_path / "pruned", teacher, str(tmp_path / "original"), TOKENS,
                                         DistillConfig(**ONE_STEP), tmp_path / "recovered", device="cpu")
    again, _ = load_model(str(tmp_path / "recovered"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS).logits, student(TOKENS).logits, rtol=0, atol=0)
        assert not torch.equal(again(TOKENS).logits, load_model(str(tmp_path / "pruned"), device="cpu")[0](TOKENS).logits)
    lineage = read_lineage(tmp_path / "recovered")
    assert lineage["parent"] == str((tmp_path / "pruned").resolve()) and lineage["recovery"]["steps"] == 1
    assert plan_of(again).pruned == plan.pruned
    assert check_files(tmp_path / "recovered") == []  # its own checksums, not the export's
    assert "## Verification\n\nNot verified yet" in (tmp_path / "recovered" / "README.md").read_text()


def test_cli_distill_trains_saves_and_stores_the_pair(tmp_path, capsys):
    tiny_model("mixtral").save_pretrained(tmp_path / "original")
    main(["calibrate", "--model", str(tmp_path / "original"), "--data", "random", "--samples", "4", "--seq-len", "16",
          "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])
    stats = capsys.readouterr().out.strip().splitlines()[-1]
    main(["plan", "--stats", stats, "--method", "frequency", "--ratio", "0.25", "--out", str(tmp_path / "plan.json")])
    main(["prune", "--model", str(tmp_path / "original"), "--plan", str(tmp_path / "plan.json"),
          "--out", str(tmp_path / "pruned")])
    assert read_lineage(tmp_path / "pruned")["parent"] == str((tmp_path / "original").resolve())
    db = tmp_path / "runs.sqlite"
    main(["distill", "--model", str(tmp_path / "pruned"), "--steps", "2", "--data", "random", "--seq-len", "16",
          "--no-check",  # a random tiny model: 2 steps may move the KL either way (test_recovery_that_makes… checks)
          "--samples", "4", "--train-samples", "8", "--device", "cpu", "--runs", str(db), "--out", str(tmp_path / "rec")])
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "rec"))
    runs = {r.id: r for r in RunStore(db).list()}
    recovered = next(r for r in runs.values() if r.metrics.get("recovery"))
    parent = runs[recovered.metrics["recovery"]["parent_run"]]
    assert parent.method == recovered.method == "frequency" and not parent.metrics.get("recovery")
    assert parent.metrics["plan_digest"] == recovered.metrics["plan_digest"]
    assert recovered.metrics["params_saved"] == pytest.approx(parent.metrics["params_saved"])
    assert parent.metrics["params_saved"] > 0.15


def test_bad_input_is_refused(tmp_path):
    teacher = tiny_model("mixtral")
    with pytest.raises(ValueError, match="budget"):
        DistillConfig(steps=None)
    with pytest.raises(PlanError, match="plan"):
        distill(tiny_model("mixtral"), teacher, TOKENS, DistillConfig(**ONE_STEP))  # no plan known
    plan = _plan(teacher, "remove", [0, 1])
    with pytest.raises(PlanError, match="experts"):  # the plan does not match the (unpruned) student
        distill(tiny_model("mixtral"), teacher, TOKENS, DistillConfig(**ONE_STEP), plan)


def test_gradient_checkpointing_gives_the_same_steps_and_kl_adds_the_logits_term(tmp_path):
    reports = {}
    for name, extra in (("plain", {"logit_kl": 0.0}), ("checkpointed", {"logit_kl": 0.0, "gradient_checkpointing": True}),
                        ("kl", {"logit_kl": 1.0})):
        teacher, student, plan = _pruned("qwen3_moe", lambda m, s: _plan(m, "novice", [2, 5]), tmp_path / name)
        reports[name] = distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "steps": 2, **extra}), plan)
    assert reports["checkpointed"]["last"] == pytest.approx(reports["plain"]["last"], rel=1e-5)
    kl = reports["kl"]["first"]
    assert kl["kl"] > 0 and kl["loss"] == pytest.approx(kl["ce"] + kl["mse"] + kl["kl"], rel=1e-5)


def test_bf16_weights_train_through_float32_masters_and_drops_stay_dropped(tmp_path):
    teacher, student, plan = _pruned("qwen3_moe", lambda m, s: _plan(m, "drop", [2, 5]), tmp_path)
    teacher, student = teacher.to(torch.bfloat16), student.to(torch.bfloat16)
    layer = get_adapter(student).layers[0]
    before = layer.experts.down_proj.detach().clone()
    distill(student, teacher, TOKENS, DistillConfig(**{**ONE_STEP, "steps": 3, "lr": 1e-3}), plan)
    assert layer.experts.down_proj.dtype == torch.bfloat16 and not torch.equal(layer.experts.down_proj, before)
    assert torch.all(layer.novices == 0)  # a drop plan's answer for its pruned experts is zero, and stays so


def test_recovery_that_makes_the_model_worse_keeps_the_pruned_one(tmp_path):
    """Checked on held-out text against the pruned model it started from: a learning rate that
    wrecks the student keeps the pruned model, writes nothing, and says why; a sane one keeps
    the recovered model."""
    teacher = tiny_model("qwen3_moe")
    teacher.save_pretrained(tmp_path / "original")
    stats = _stats(teacher, tmp_path / "cache")
    plan = make_plan(stats, PlanConfig("mone", ratio=0.25))
    export_plan(tmp_path / "original", plan, stats, tmp_path / "pruned")
    teacher, _ = load_model(str(tmp_path / "original"), device="cpu")
    check = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(11))
    wrecked = DistillConfig(**{**ONE_STEP, "steps": 3, "lr": 5.0, "warmup_steps": 0})
    student, report = recover_checkpoint(tmp_path / "pruned", teacher, "original", TOKENS, wrecked,
                                         tmp_path / "recovered", device="cpu", check=check)
    assert report["kept"] == "pruned" and report["check"]["loss_after"] > report["check"]["loss_before"]
    assert "it rose" in report["why"] and report["checkpoint"] == str((tmp_path / "pruned").resolve())
    assert not (tmp_path / "recovered").exists()
    from moeviz.evaluate import EvalConfig
    from moeviz.runs import store_recovery

    store = RunStore(tmp_path / "runs.sqlite")  # a rejected recovery is no new model: no run of its own
    ids = store_recovery(store, student, teacher, None, EvalConfig(data="random", num_samples=2, seq_len=16), "original",
                         fingerprint(teacher), plan, stats, None, report)
    assert ids["run_id"] is None and sorted(r.method for r in store.list()) == ["mone", "original"]
    pruned, _ = load_model(str(tmp_path / "pruned"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(student(TOKENS).logits, pruned(TOKENS).logits, rtol=0, atol=0)
    teacher, tokenizer = load_model("demo", device="cpu")  # a trained model, far from its pruned copy
    stats, _ = calibrate(teacher, CalibConfig(data="demo", num_samples=8, seq_len=32, cache_dir=tmp_path / "c"),
                         tokenizer)
    export_plan("demo", make_plan(stats, PlanConfig("frequency", ratio=0.5)), stats, tmp_path / "demo-pruned")
    train = sample_sequences("demo", 32, 32, tokenizer, 0, split="train")
    check = sample_sequences("demo", 8, 32, tokenizer, 7, split="heldout")
    student, report = recover_checkpoint(tmp_path / "demo-pruned", teacher, "demo", train,
                                         DistillConfig(steps=8, batch_size=8, lr=1e-3), tmp_path / "recovered",
                                         device="cpu", check=check)
    assert report["kept"] == "recovered" and report["check"]["loss_after"] < report["check"]["loss_before"]
    assert "cross-entropy + 1 × KL" in report["why"] and (tmp_path / "recovered").is_dir()


def test_mixed_sources_give_their_shares_of_the_sequences():
    from moeviz.data import sample_mixed

    tok = load_model("demo", device="cpu")[1]
    mixed = sample_mixed("a=demo:arithmetic,c=demo:code", 8, 32, tok, 0, "train", shares=[0.75, 0.25])
    arithmetic = sample_sequences("demo:arithmetic", 6, 32, tok, 0, "train")
    code = sample_sequences("demo:code", 2, 32, tok, 0, "train")
    rows = {tuple(r) for r in mixed.tolist()}
    assert len(mixed) == 8 and rows == {tuple(r) for r in torch.cat([arithmetic, code]).tolist()}
    assert torch.equal(sample_mixed("demo:code", 2, 32, tok, 0, "train"), code)  # one source: as before


def test_recovery_of_a_plan_made_from_a_mix_trains_on_the_mix_and_a_failure_leaves_nothing(tmp_path):
    """The Prune page hands recovery a mix's NAME=SOURCE,… list (as evaluation takes it); it once
    reached the dataset loader whole ("Could not load the dataset 'arithmetic=demo…'") and left
    the exported checkpoint behind."""
    from types import SimpleNamespace

    from moeviz import jobs
    from moeviz.data import mix_sources
    from moeviz.stats import load_mix

    model, tok = load_model("demo", device="cpu")
    paths = []
    for domain in ("arithmetic", "code"):
        config = CalibConfig(data=f"demo:{domain}", num_samples=8, seq_len=64, cache_dir=tmp_path / "cache")
        paths.append(str(calibrate(model, config, tok)[1]))
    spec = [[paths[0], 0.75], [paths[1], 0.25]]
    stats = load_mix(spec)
    plan = make_plan(stats, PlanConfig("frequency", 0.25))
    server = SimpleNamespace(model_name="demo", device="cpu", loaded=lambda: (model, tok, fingerprint(model)))
    data = mix_sources(stats.meta["mix"])
    assert data.startswith("arithmetic=demo:arithmetic,code=demo:code")
    args = dict(plan=json.loads(plan.to_json()), stats=spec, runs=str(tmp_path / "runs.sqlite"), minutes=0.02, lr=1e-3,
                train_samples=8, data=data, num_samples=4, seq_len=64)
    done = jobs.recover(server, lambda *a: None, out=str(tmp_path / "rec"), **args)
    assert (tmp_path / "rec" / "pruned" / "model.safetensors").is_file() and done["parent_id"]  # trained, checked
    assert done["kept"] in ("recovered", "pruned") and "held-out sequences" in done["why"]
    with pytest.raises(ValueError):
        jobs.recover(server, lambda *a: None, out=str(tmp_path / "bad"), **{**args, "data": "a=demo:nonsense"})
    assert not (tmp_path / "bad").exists()  # the checkpoint it had exported is gone with it
