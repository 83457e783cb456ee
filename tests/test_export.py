"""Streamed export: shard by shard from the source files, the same logits as the plan in memory."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moeviz.adapters import get_adapter
from moeviz.apply import apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.checkpoint import Checkpoint, fingerprint
from moeviz.export import INDEX_FILE, NOVICES_FILE, PLAN_FILE, export_plan, load_exported
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import PlanError, PruningPlan
from moeviz.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "gpt_oss"]


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (checkpoint directory of tiny_model(family), its stats); built once per family."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            model = tiny_model(family)
            model.save_pretrained(path / "model")
            config = CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=path / "cache")
            cache[family] = path / "model", calibrate(model, config, tokenizer=None)[0]
        return cache[family]
    return get


def _plan(family, mode, pruned, **kw):
    """A hand-made plan: `pruned(i)` gives the experts of the i-th MoE layer. Experts 0–3 and
    4–7 are DeepSeek's two routing groups: every plan takes as many from each."""
    model = tiny_model(family)
    info = model_info(model, fingerprint=fingerprint(model))
    return PruningPlan("manual", 0.25, "layer", mode, info,
                       pruned={layer: pruned(i) for i, layer in enumerate(info["layer_indices"])}, **kw)


PLANS = {  # name → (mode, experts per MoE layer, extra fields, how it reloads)
    "remove": ("remove", lambda i: [2, 5], {}, "transformers"),
    "uneven": ("remove", lambda i: [[1, 6], [2, 3, 5, 7]][i % 2], {}, "moeviz"),
    "novice": ("novice", lambda i: [1, 6], {}, "moeviz"),
    "drop": ("drop", lambda i: [2, 5], {}, "moeviz"),
    "merge": ("merge", lambda i: [1, 6], {"merge_into": "1,6→2"}, "transformers"),
    "sparsity": ("remove", lambda i: [], {"sparsity": 0.5}, "transformers"),
    "novice+2:4": ("novice", lambda i: [0, 7], {"nm": (2, 4)}, "moeviz"),
}


def _make(family, name):
    mode, pruned, extra, kind = PLANS[name]
    extra = dict(extra)
    if "merge_into" in extra:
        extra["merge_into"] = {layer: {1: 2, 6: 2} for layer in get_adapter(tiny_model(family)).layer_indices}
    return _plan(family, mode, pruned, **extra), kind


def _reference(family, plan, stats):
    """The plan applied in memory, to a fresh model (apply_plan prunes in place)."""
    return apply_plan(tiny_model(family), plan, stats)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_removal_streams_a_plain_checkpoint(family, saved, tmp_path):
    source, stats = saved(family)
    plan, _ = _make(family, "remove")
    assert export_plan(source, plan, None, tmp_path / "out") == "transformers"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert get_adapter(reloaded).num_experts == [6] * len(plan.pruned)
    reference = _reference(family, plan, stats)
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=0, atol=0)
    assert not torch.allclose(_logits(reloaded), _logits(tiny_model(family)))


@pytest.mark.parametrize("family", FAMILIES[:4])
@pytest.mark.parametrize("name", ["uneven", "novice", "drop", "merge", "sparsity", "novice+2:4"])
def test_every_plan_reloads_through_moeviz_with_the_logits_of_the_plan_in_memory(family, name, saved, tmp_path):
    source, stats = saved(family)
    plan, kind = _make(family, name)
    assert export_plan(source, plan, stats, tmp_path / "out") == kind
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert (PLAN_FILE in out) == (kind == "moeviz") and (NOVICES_FILE in out) == (plan.mode in ("novice", "drop"))
    reloaded = load_exported(tmp_path / "out")
    reference = _reference(family, plan, stats)
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(reloaded), _logits(tiny_model(family)))


@pytest.mark.parametrize("name", ["uneven", "novice", "drop"])
def test_gpt_oss_fused_files_are_sliced_and_merges_refused(name, saved, tmp_path):
    source, stats = saved("gpt_oss")
    plan, _ = _make("gpt_oss", name)
    export_plan(source, plan, stats, tmp_path / "out")
    torch.testing.assert_close(_logits(load_exported(tmp_path / "out")), _logits(_reference("gpt_oss", plan, stats)))
    for refused in ("merge", "sparsity"):
        with pytest.raises(NotImplementedError, match="fused expert tensors"):
            export_plan(source, _make("gpt_oss", refused)[0], stats, tmp_path / refused)
        assert not (tmp_path / refused).exists()


@pytest.fixture(scope="module")
def demo_stats(tmp_path_factory):
    model, _ = load_model("demo", device="cpu")
    config = CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path_factory.mktemp("cache"))
    return calibrate(model, config, tokenizer=None)[0]


DEMO_TOKENS = torch.randint(4, 54, (2, 24), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("mode", ["remove", "novice"])
def test_the_demo_model_exports_streamed_and_reloads(demo_stats, mode, tmp_path):
    plan = make_plan(demo_stats, PlanConfig("mone", ratio=0.25, mode=mode))
    kind = export_plan("demo", plan, demo_stats, tmp_path / "out")
    if mode == "remove":
        assert kind == "transformers"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert reloaded.config.num_local_experts == 12
    else:
        assert kind == "moeviz"
        reloaded, tokenizer = load_model(tmp_path / "out", device="cpu")  # through moeviz.load_model
        assert tokenizer.decode(tokenizer.encode("12+30=42"), skip_special_tokens=True) == "12+30=42"
    reference = apply_plan(load_model("demo", device="cpu")[0], plan, demo_stats)
    torch.testing.assert_close(_logits(reloaded, DEMO_TOKENS), _logits(reference, DEMO_TOKENS), rtol=0, atol=0)


def test_a_multi_shard_checkpoint_is_written_shard_by_shard(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    shards = Checkpoint(tmp_path / "src").files
    assert len(shards) >= 4
    calls = []
    plan, _ = _make("qwen2_moe", "drop")
    export_plan(tmp_path / "src", plan, None, tmp_path / "out", progress=lambda *a: calls.append(a))
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    written = sorted(set(index["weight_map"].values()))
    assert len(written) >= 4 and written == sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors"))
    assert set(written) <= {s.name for s in shards}  # each output shard from its source shard
    total = len(Checkpoint(tmp_path / "src").keys())
    assert calls == [(i, total) for i in range(1, total + 1)]
    experts = {k.split(".experts.")[1].split(".")[0] for k in index["weight_map"] if ".mlp.experts." in k}
    assert experts == {str(e) for e in range(6)}  # renumbered 0…5
    torch.testing.assert_close(_logits(load_exported(tmp_path / "out")), _logits(_reference("qwen2_moe", plan, None)))


def test_refusals_write_nothing(saved, tmp_path):
    source, stats = saved("mixtral")
    plan, _ = _make("mixtral", "novice")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_plan(source, plan, stats, tmp_path / "full")
    other = tiny_model("mixtral", seed=1)
    foreign = PruningPlan("manual", 0.25, "layer", "remove", model_info(other, fingerprint=fingerprint(other)),
                          pruned=plan.pruned)
    with pytest.raises(PlanError, match="another model"):
        export_plan(source, foreign, None, tmp_path / "a")
    with pytest.raises(PlanError, match="needs its ExpertStats"):
        export_plan(source, plan, None, tmp_path / "b")

    def fail(done, total):
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError, match="interrupted"):
        export_plan(source, plan, stats, tmp_path / "c", progress=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"], "no output and no temporary directory left"
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    export_plan(source, plan, stats, tmp_path / "export")
    with pytest.raises(ValueError, match="is a moeviz export"):
        export_plan(tmp_path / "export", plan, stats, tmp_path / "again")


def test_load_exported_fails_loudly_when_a_tensor_is_missing(saved, tmp_path):
    source, stats = saved("olmoe")
    export_plan(source, _make("olmoe", "novice")[0], stats, tmp_path / "out")
    index_file = tmp_path / "out" / INDEX_FILE
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not hold 1 of the model's tensors"):
        load_exported(tmp_path / "out")
