"""Streamed export: shard by shard from the source files, the same logits as the plan in memory."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeviz.adapters import get_adapter
from moeviz.apply import applied, apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.checkpoint import Checkpoint, fingerprint
from moeviz.evaluate import EvalConfig
from moeviz.export import export_plan
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import MOEVIZ_ONLY, PLAN_FILE, STANDARD, SUBSTITUTION, PlanError, PruningPlan, export_kind
from moeviz.reload import file_tensors, load_exported
from moeviz.rewrite import INDEX_FILE, REPLACEMENTS_FILE
from moeviz.runs import RunStore, store_evaluation
from moeviz.tiny import tiny_model
from moeviz.filecheck import check_files

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


PLANS = {  # name → (mode, experts per MoE layer, extra fields, the export's kind)
    "remove": ("remove", lambda i: [2, 5], {}, STANDARD),
    "uneven": ("remove", lambda i: [[1, 6], [2, 3, 5, 7]][i % 2], {}, MOEVIZ_ONLY),
    "novice": ("novice", lambda i: [1, 6], {}, SUBSTITUTION),
    "drop": ("drop", lambda i: [2, 5], {}, SUBSTITUTION),
    "merge": ("merge", lambda i: [1, 6], {"merge_into": "1,6→2"}, STANDARD),
    "uneven merge": ("merge", lambda i: [[1, 6], [0, 1, 5, 6]][i % 2], {"merge_into": "→2"}, MOEVIZ_ONLY),
    "sparsity": ("remove", lambda i: [], {"sparsity": 0.5}, STANDARD),
    "2:4": ("remove", lambda i: [], {"nm": (2, 4)}, STANDARD),
    "novice+2:4": ("novice", lambda i: [0, 7], {"nm": (2, 4)}, SUBSTITUTION),
    "uneven novice": ("novice", lambda i: [[1, 6], [2, 3, 5, 7]][i % 2], {}, SUBSTITUTION),
}
STANDARD_PLANS = [name for name, plan in PLANS.items() if plan[3] == STANDARD]


def _make(family, name):
    mode, pruned, extra, kind = PLANS[name]
    extra = dict(extra)
    if "merge_into" in extra:
        layers = get_adapter(tiny_model(family)).layer_indices
        extra["merge_into"] = {layer: {e: 2 for e in pruned(i)} for i, layer in enumerate(layers)}
    return _plan(family, mode, pruned, **extra), kind


def _reference(family, plan, stats):
    """The plan applied in memory, to a fresh model (apply_plan prunes in place)."""
    return apply_plan(tiny_model(family), plan, stats)


def _stock_load(dirs: list, tmp_path) -> list[dict]:
    """Load each directory with plain transformers in a fresh process that never imports moeviz:
    per directory {"ok", "error", "missing", "unexpected", "logits"} (logits of TOKENS)."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        tokens = torch.tensor({TOKENS.tolist()})
        results = []
        for i, path in enumerate(sys.argv[1:]):
            try:
                model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
            except Exception as err:
                results.append(dict(ok=False, error=f"{{type(err).__name__}}: {{err}}"))
                continue
            with torch.no_grad():
                save_file({{"logits": model.eval()(tokens).logits.float().contiguous()}}, path + "/../logits%d.st" % i)
            results.append(dict(ok=True, missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"])))
        assert "moeviz" not in sys.modules
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script, *map(str, dirs)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for i, (path, result) in enumerate(zip(dirs, results)):
        if result["ok"]:
            result["logits"] = load_file(Path(path).parent / f"logits{i}.st")["logits"]
    return results


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "olmoe", "qwen3_moe"])
def test_every_standard_export_loads_in_stock_transformers_with_the_plans_logits(family, saved, tmp_path):
    """Removal and merging with equal counts, and sparsity: a fresh process with plain transformers
    (no moeviz) loads them with no missing or unexpected key, and gives the plan's logits."""
    source, stats = saved(family)
    dirs, plans = [], []
    for name in STANDARD_PLANS:
        plan, kind = _make(family, name)
        assert export_kind(plan).name == kind == STANDARD
        assert export_plan(source, plan, stats, tmp_path / name / "out").name == STANDARD
        dirs.append(tmp_path / name / "out")
        plans.append(plan)
    for name, plan, result in zip(STANDARD_PLANS, plans, _stock_load(dirs, tmp_path)):
        assert result["ok"], (name, result)
        assert result["missing"] == [] and result["unexpected"] == [], (name, result)
        reference = _reference(family, plan, stats)
        torch.testing.assert_close(result["logits"], _logits(reference), rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(result["logits"], _logits(tiny_model(family)))
    config = json.loads((tmp_path / "remove" / "out" / "config.json").read_text())
    assert [config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in config] == [6]


@pytest.mark.parametrize("family", FAMILIES[:4])
@pytest.mark.parametrize("name", ["uneven", "novice", "drop", "uneven merge", "novice+2:4", "uneven novice"])
def test_every_other_plan_reloads_through_moeviz_with_the_logits_of_the_plan_in_memory(family, name, saved, tmp_path):
    source, stats = saved(family)
    plan, kind = _make(family, name)
    assert export_plan(source, plan, stats, tmp_path / "out").name == kind
    assert (PLAN_FILE in {p.name for p in (tmp_path / "out").iterdir()}) == (kind == MOEVIZ_ONLY)
    reloaded, _ = load_model(tmp_path / "out", device="cpu")
    reference = _reference(family, plan, stats)
    torch.testing.assert_close(_logits(reloaded), _logits(reference), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(_logits(reloaded), _logits(tiny_model(family)))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_novice_and_drop_exports_follow_the_expert_substitution_format(family, saved, tmp_path):
    """compression_config.transform_config.expert_substitution, version 1, as vLLM's loader reads
    it: every target is a module of the model, every constant a (hidden,) tensor in the shards,
    the retained experts' weights stored under their logical ids (in order) and no others."""
    source, stats = saved(family)
    model = tiny_model(family)
    adapter = get_adapter(model)
    for name in ("novice", "drop", "uneven novice"):
        plan, _ = _make(family, name)
        out = tmp_path / name
        export_plan(source, plan, stats, out)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model.config.model_type  # the architecture is unchanged
        block = config["compression_config"]["transform_config"]["expert_substitution"]
        assert block["version"] == 1 and block["router_semantics"] == dict(
            preserve_logical_expert_ids=True, preserve_router_weights=True, renormalize_after_substitution=False)
        weight_map = json.loads((out / INDEX_FILE).read_text())["weight_map"]
        ckpt = Checkpoint(out)
        assert len(block["targets"]) == len(plan.pruned)
        named = file_tensors(adapter)  # the model's tensors under the names its files (and vLLM) use
        for path, target in block["targets"].items():
            layer_idx = int(path.split(".")[2])
            layer = adapter.layer(layer_idx)
            assert named[path.removesuffix(".experts") + ".gate.weight"] is layer.router_weight  # the layer's block
            assert target["num_logical_experts"] == layer.num_experts
            assert target["weight_layout"] == "compact_retained_experts"
            assert sorted(map(int, target["replacements"])) == plan.pruned[layer_idx]
            for e, replacement in target["replacements"].items():
                assert replacement["format"] == "constant-v1" and list(replacement["tensors"]) == ["value"]
                value = replacement["tensors"]["value"]
                assert value in weight_map and ckpt.shape(value) == (layer.hidden_size,)
                if plan.mode == "drop":
                    assert not ckpt.tensor(value).any()
            stored = [int(k.split(".experts.")[1].split(".")[0]) for k in sorted(weight_map)
                      if k.startswith(path + ".")]
            assert sorted(set(stored)) == plan.kept(layer_idx, layer.num_experts)  # logical ids, pruned ones gone
            router = ckpt.tensor(path.removesuffix(".experts") + ".gate.weight")
            assert router.shape[0] == layer.num_experts  # the router keeps every logical expert


def test_a_substitution_checkpoint_another_tool_wrote_loads_through_moeviz(saved, tmp_path):
    """As llm-compressor writes it (constants under names of its own), and in vLLM's older
    `approximate_experts` form: moeviz.load_model gives the plan's logits with those constants."""
    source, stats = saved("qwen3_moe")
    plan, _ = _make("qwen3_moe", "novice")
    export_plan(source, plan, stats, tmp_path / "ours")
    ckpt = Checkpoint(tmp_path / "ours")
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys()}
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    block = config["compression_config"]
    block["producer"] = {"name": "llm-compressor", "version": "test"}
    for target in block["transform_config"]["expert_substitution"]["targets"].values():
        for e, replacement in target["replacements"].items():
            name = replacement["tensors"]["value"]
            replacement["tensors"]["value"] = f"constants.{name.split('.')[2]}.expert_{e}"
            tensors[replacement["tensors"]["value"]] = tensors.pop(name)
    approximate = dict(config, approximate_experts={str(i): v for i, v in plan.pruned.items()})
    del approximate["compression_config"]
    approximate_tensors = {k: v for k, v in tensors.items() if not k.startswith("constants.")}
    for key, value in tensors.items():
        if key.startswith("constants."):
            layer, e = key.split(".")[1], key.split("_")[-1]
            approximate_tensors[f"model.layers.{layer}.mlp.experts.{e}.approx_value"] = value
    reference = _logits(_reference("qwen3_moe", plan, stats))
    for name, cfg, files in (("theirs", config, tensors), ("approximate", approximate, approximate_tensors)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        save_file(files, tmp_path / name / "model.safetensors")
        model, _ = load_model(tmp_path / name, device="cpu")
        torch.testing.assert_close(_logits(model), reference, rtol=1e-6, atol=1e-6)


def test_a_moeviz_only_export_fails_loudly_in_stock_loaders_naming_moeviz(saved, tmp_path):
    source, stats = saved("mixtral")
    plan, _ = _make("mixtral", "uneven")
    kind = export_plan(source, plan, stats, tmp_path / "uneven" / "out")
    assert kind.name == MOEVIZ_ONLY and "moeviz" in kind.loaders
    result = _stock_load([tmp_path / "uneven" / "out"], tmp_path)[0]
    assert not result["ok"] and "moeviz" in result["error"], result
    config = json.loads((tmp_path / "uneven" / "out" / "config.json").read_text())
    assert config["moeviz"]["model_type"] == "mixtral"
    assert config["moeviz"]["experts_per_layer"] == {"0": 6, "1": 4}


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
        assert kind.name == STANDARD
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
        assert reloaded.config.num_local_experts == 12
    else:
        assert kind.name == SUBSTITUTION
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
    assert len(written) >= 5 and written == sorted(p.name for p in (tmp_path / "out").glob("model*.safetensors"))
    assert set(written) <= {s.name for s in shards} | {REPLACEMENTS_FILE}  # each shard from its source shard
    total = len(Checkpoint(tmp_path / "src").keys())
    assert calls == [(i, total) for i in range(1, total + 1)]
    experts = {k.split(".experts.")[1].split(".")[0] for k in index["weight_map"] if ".mlp.experts." in k}
    assert experts == {"0", "1", "3", "4", "6", "7"}  # the substitution keeps logical ids
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
    with pytest.raises(ValueError, match="is a pruned export"):
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


def test_a_target_that_cannot_take_the_export_is_refused_before_the_first_shard(saved, tmp_path, monkeypatch):
    source, stats = saved("mixtral")
    plan, _ = _make("mixtral", "remove")
    calls = []

    def progress(done, total):
        calls.append(done)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match=f"Cannot export to {tmp_path / 'file'}: it is a file"):
        export_plan(source, plan, stats, tmp_path / "file", progress)
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'file'} is a file"):
        export_plan(source, plan, stats, tmp_path / "file" / "sub" / "out", progress)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(OSError, match=f"Cannot export to {tmp_path / 'out'}: the checkpoint needs .* GiB and only"):
        export_plan(source, plan, stats, tmp_path / "out", progress)
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    def refuse(self, target):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(Path, "rename", refuse)  # as a read-only target answers, after every shard is written
    with pytest.raises(OSError, match=f"Could not move the finished export into {tmp_path / 'out'}: Operation not "
                                      "permitted"):
        export_plan(source, plan, stats, tmp_path / "out", progress)
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no temporary folder left


def test_every_export_has_a_model_card_with_the_hubs_front_matter_and_the_plans_evaluation(saved, tmp_path):
    source, stats = saved("qwen2_moe")
    (source / "README.md").write_text("---\nlicense: apache-2.0\ntags: [chat]\n---\n# The original\n")
    store = RunStore(tmp_path / "runs.sqlite")
    plan, _ = _make("qwen2_moe", "novice")
    model = tiny_model("qwen2_moe")
    config = EvalConfig(data="random", num_samples=4, seq_len=16, throughput=False)
    ids = store_evaluation(store, model, None, config, "tiny", fingerprint(source), plan, stats)
    cards = {}
    for name, runs in (("novice", store), ("uneven", None), ("remove", None)):
        export_plan(source, _make("qwen2_moe", name)[0], stats, tmp_path / name, runs=runs)
        text = (tmp_path / name / "README.md").read_text()
        front, body = text.removeprefix("---\n").split("\n---\n", 1)
        cards[name] = meta = yaml.safe_load(front), body
        assert meta[0]["license"] == "apache-2.0" and {"moe", "pruned", "moeviz"} <= set(meta[0]["tags"])
    # what can load it: transformers cannot load a substitution export (5.25 refuses it with a size mismatch)
    assert [cards[k][0]["library_name"] for k in ("novice", "uneven", "remove")] == ["moeviz", "moeviz", "transformers"]
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", tag) for card, _ in cards.values() for tag in card["tags"])
    body = cards["novice"][1]
    assert "**expert substitution**" in body and "6 of 8 in every MoE layer" in body and "vllm serve" in body
    assert "vLLM 0.33.0 or later" in body and "0.32.0 refuses it" in body and "random weights" not in body
    assert "refuses the checkpoint (5.19 and 5.25" in body
    run = store.get(ids["run_id"])
    assert f"run {run.id} of the runs store" in body
    assert f"| perplexity | {store.get(ids['baseline_id']).metrics['perplexity']:.4g} ± " in body
    assert f"| KL to the original (nats/token) | 0 | {run.metrics['kl']:.4g} |" in body
    assert "layer 0: 6/8, layer 1: 4/8" in cards["uneven"][1] and "moeviz_pruned" in cards["uneven"][1]
    assert "AutoModelForCausalLM.from_pretrained" in cards["remove"][1] and "Not evaluated yet" in cards["remove"][1]


# ---- quantized checkpoints ------------------------------------------------------------------
def _fp8_checkpoint(model, path: Path, block: int = 8) -> Path:
    """`model` saved as a block-wise FP8 checkpoint, as DeepSeek-V3 and Qwen3-FP8 ship: every
    projection's weight in float8_e4m3fn with a `weight_scale_inv` per (block × block) tile;
    embeddings, norms, routers and the head stay bf16."""
    model.to(torch.bfloat16).save_pretrained(path / "bf16")
    tensors = {}
    for key, w in load_file(path / "bf16" / "model.safetensors").items():
        if not (key.endswith("proj.weight") or key.endswith(("w1.weight", "w2.weight", "w3.weight"))):
            tensors[key] = w
            continue
        rows, cols = w.shape
        tiles = w.float().reshape(rows // block, block, cols // block, block)
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # (rows/b, cols/b)
        tensors[key] = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
        tensors[key + "_scale_inv"] = scale
    (path / "fp8").mkdir()
    save_file(tensors, path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "bf16" / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=[block, block])
    (path / "fp8" / "config.json").write_text(json.dumps(config))
    return path / "fp8"


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_checkpoints_export_with_their_quantization_intact(family, tmp_path):
    source = _fp8_checkpoint(tiny_model(family), tmp_path)
    model, _ = load_model(source, device="cpu")  # on a CPU, transformers dequantizes FP8 to bf16
    assert model.dtype == torch.bfloat16
    stats, _ = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path / "cache"))
    info = model_info(model, fingerprint=fingerprint(model))
    original = Checkpoint(source)
    for name, mode, extra in (("remove", "remove", {}), ("novice", "novice", {}), ("sparsity", "remove",
                                                                                    {"sparsity": 0.5})):
        pruned = {layer: [] if extra else [2, 5] for layer in info["layer_indices"]}
        plan = PruningPlan("manual", 0.25, "layer", mode, info, pruned=pruned, **extra)
        out = tmp_path / name
        kind = export_plan(source, plan, stats, out)
        assert check_files(out) == [], name  # scales consumed with their weights in the dry run
        assert (kind.name == SUBSTITUTION) == (mode == "novice")
        assert ("vLLM's expert substitution (0.33.0) refuses fp8 experts" in kind.loaders) == (mode == "novice")
        config = json.loads((out / "config.json").read_text())
        assert config["quantization_config"] == json.loads((source / "config.json").read_text())["quantization_config"]
        exported = Checkpoint(out)
        layer = info["layer_indices"][0]
        old = f"model.layers.{layer}.mlp.experts.6.gate_proj.weight"
        new = old.replace(".6.", ".4.") if kind.name == STANDARD and mode == "remove" and not extra else old
        assert exported.dtype(new) == torch.float8_e4m3fn
        assert torch.equal(exported.tensor(new + "_scale_inv"), original.tensor(old + "_scale_inv"))
        before, after = original.tensor(old).view(torch.uint8), exported.tensor(new).view(torch.uint8)
        if extra:  # MoE-Pruner's zeros, written in FP8; every other byte as it was
            zeroed = (after == 0) & (before != 0)
            assert abs(zeroed.float().mean().item() - 0.5) < 0.1 and torch.equal(after[~zeroed], before[~zeroed])
        else:
            assert torch.equal(after, before)  # byte for byte
        if kind.name == STANDARD:
            reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        else:
            reloaded, _ = load_model(out, device="cpu")
        with applied(model, plan, stats):
            reference = _logits(model)
        torch.testing.assert_close(_logits(reloaded), reference, rtol=1e-3, atol=1e-3, msg=name)
    merge = PruningPlan("manual", 0.25, "layer", "merge", info, pruned={i: [1, 5] for i in info["layer_indices"]},
                        merge_into={i: {1: 2, 5: 6} for i in info["layer_indices"]})
    with pytest.raises(NotImplementedError, match="fp8-quantized: merging averages expert weights"):
        export_plan(source, merge, stats, tmp_path / "merge")
    assert not (tmp_path / "merge").exists()


@pytest.fixture(scope="module")
def with_mtp(tmp_path_factory):
    """A DeepSeek-V3-shaped checkpoint whose files hold an MTP layer after its 3 decoder layers
    (`model.layers.3.*`, as DeepSeek-V3 ships `model.layers.61.*`), with its stats."""
    root = tmp_path_factory.mktemp("mtp")
    model = tiny_model("deepseek_v3")
    model.config.num_nextn_predict_layers = 1
    with torch.no_grad():
        for layer in get_adapter(model).layers:
            layer.router_weight.mul_(20)
    model.save_pretrained(root / "model")
    file = root / "model" / "model.safetensors"
    tensors = load_file(file)
    last = model.config.num_hidden_layers - 1
    mtp = {k.replace(f"layers.{last}.", f"layers.{last + 1}."): v.clone() for k, v in tensors.items()
           if f"layers.{last}." in k}
    gen = torch.Generator().manual_seed(5)
    for k in [k for k in mtp if ".mlp." in k]:
        mtp[k] = torch.randn(mtp[k].shape, generator=gen).to(mtp[k].dtype)  # its own experts and router
    H = model.config.hidden_size
    mtp.update({f"model.layers.{last + 1}.{name}": torch.ones(H) for name in ("enorm.weight", "hnorm.weight")})
    mtp[f"model.layers.{last + 1}.eh_proj.weight"] = torch.randn(H, 2 * H, generator=gen)
    save_file({**tensors, **mtp}, file, metadata={"format": "pt"})
    model = load_model(root / "model", device="cpu")[0]  # the model of these files (their fingerprint)
    stats = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=root / "cache"),
                      tokenizer=None)[0]
    return root, model, stats, last + 1


def test_mtp_layers_export_as_the_user_chooses(with_mtp):
    root, model, stats, n = with_mtp
    source, src = root / "model", load_file(root / "model" / "model.safetensors")
    remove = make_plan(stats, PlanConfig("mone", 0.25, mode="remove"))
    E, K = model.config.n_routed_experts, model.config.n_routed_experts - len(remove.pruned[1])
    with pytest.raises(ValueError, match="multi-token-prediction.*mtp='prune'.*mtp='drop'"):
        export_plan(source, remove, stats, root / "unchosen")
    assert not (root / "unchosen").exists()

    export_plan(source, remove, stats, root / "prune", mtp="prune")
    out = load_file(root / "prune" / "model.safetensors")
    router = f"model.layers.{n}.mlp.gate.weight"
    keep = sorted(src[router].float().norm(dim=-1).topk(K).indices.tolist())  # the largest router rows
    assert out[router].shape[0] == K and torch.equal(out[router], src[router][keep])
    bias = f"model.layers.{n}.mlp.gate.e_score_correction_bias"
    assert torch.equal(out[bias], src[bias][keep])
    experts = {int(k.split(".experts.")[1].split(".")[0]) for k in out if f"layers.{n}.mlp.experts." in k}
    assert experts == set(range(K))  # renumbered 0…K-1, as the config's count says
    for new, old in enumerate(keep):
        key = f"model.layers.{n}.mlp.experts.{{}}.down_proj.weight"
        assert torch.equal(out[key.format(new)], src[key.format(old)])
    assert torch.equal(out[f"model.layers.{n}.eh_proj.weight"], src[f"model.layers.{n}.eh_proj.weight"])
    config = json.loads((root / "prune" / "config.json").read_text())
    assert config["n_routed_experts"] == K and config["num_nextn_predict_layers"] == 1
    assert "largest router rows" in (root / "prune" / "README.md").read_text()
    assert "largest router rows" in json.loads((root / "prune" / "moeviz_lineage.json").read_text())["mtp"]
    with applied(model, remove, stats):
        wanted = _logits(model)
    reloaded = AutoModelForCausalLM.from_pretrained(root / "prune")
    torch.testing.assert_close(_logits(reloaded), wanted, atol=1e-5, rtol=1e-4)

    export_plan(source, remove, stats, root / "drop", mtp="drop")
    assert not [k for k in load_file(root / "drop" / "model.safetensors") if f"layers.{n}." in k]
    config = json.loads((root / "drop" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == K
    assert "left out" in (root / "drop" / "README.md").read_text()

    novice = make_plan(stats, PlanConfig("mone", 0.25, mode="novice"))  # the count stays E: the MTP layer stays whole
    export_plan(source, novice, stats, root / "novice")
    kept = {k: v for k, v in load_file(root / "novice" / "model.safetensors").items() if f"layers.{n}." in k}
    assert kept.keys() == {k for k in src if f"layers.{n}." in k} and kept[router].shape[0] == E
    assert "kept whole" in (root / "novice" / "README.md").read_text()
    for done in ("prune", "drop", "novice"):  # `moeviz verify` finds each whole, MTP layer counted, not built
        assert check_files(root / done) == [], done
    assert check_files(source) == []  # the original too (no lineage: against its config)


def test_an_export_of_a_demo_model_names_it_by_its_name_and_tags_are_valid(tmp_path):
    """The app exports from the demo's directory: the card still calls the original `demo-fine`,
    not its path; an edited plan's method `mone (edited)` becomes the Hub tag `mone-edited`."""
    from moeviz.card import hub_tag
    from moeviz.checkpoint import resolve_source

    assert hub_tag("mone (edited)") == "mone-edited" and hub_tag("moe_pruner") == "moe-pruner"
    model, tok = load_model("demo-fine", device="cpu")
    stats = calibrate(model, CalibConfig(data="demo", num_samples=4, seq_len=32, cache_dir=tmp_path / "c"), tok)[0]
    plan = make_plan(stats, PlanConfig("frequency", 0.25))
    export_plan(resolve_source("demo-fine"), plan, stats, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "# demo-fine, pruned by moeviz" in card and "`demo-fine` with" in card
    assert json.loads((tmp_path / "out" / "moeviz_lineage.json").read_text())["parent"] == "demo-fine"


def test_export_and_run_names_say_what_was_done():
    """A plan edited by hand to 51 of 256 experts is named by that share, not the method's ratio; a
    run calibrated on a mix says so."""
    from moeviz.export import export_name
    from moeviz.runs import run_name

    info = dict(model_fingerprint="f", layer_indices=[3], num_experts=[256])
    plan = PruningPlan("mone (edited)", 0.1875, "layer", "novice", info, pruned={3: list(range(51))})
    assert export_name("demo-fine", plan) == "demo-fine-mone-edited-novice-19.92pct"
    run = dict(method="mone", mode="novice", ratio=0.25, scope="layer", calibration="a@0.75,b@0.25")
    assert run_name(run) == "mone novice 25 % on a mix" and run_name({**run, "calibration": "a"}) == "mone novice 25 %"
