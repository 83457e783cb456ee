"""Every MoE family of the installed transformers, end to end: found by structure, checked against
the model's own forward, calibrated, planned, applied in place and for good, exported, and reloaded
by stock transformers in a fresh process without moeviz. A family that neither works nor is refused
here with its reason fails: the next transformers release tells us what it added."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeviz.adapters import check_reading, get_adapter
from moeviz.apply import applied, apply_plan
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.export import export_plan
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import STANDARD, SUBSTITUTION, PlanError
from moeviz.tiny import moe_families, tiny_model
from moeviz.filecheck import check_files

# Families moeviz refuses, with the words of the reason it gives.
REFUSED = {
    "jetmoe": "attention heads",
    "dbrx": "flattened 2-D tensors",
    "ergo": "misreads this expert layout",  # refused by check_reading: each expert's output has its own norm
}
# Families whose novice and drop plans moeviz refuses (removal and merging work), with the reason's words.
NO_NOVICES = {"llama4_text": "scales each expert's input"}
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
FAMILIES = moe_families()


def _model(family):
    model = tiny_model(family)
    with torch.no_grad():  # routers spread, so that routing varies from token to token
        for layer in get_adapter(model).layers:
            layer.router_weight.mul_(20)
    return model


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _pipeline(family, root: Path) -> dict:
    """The loop on one family: returns what the tests compare."""
    model = _model(family)
    adapter = get_adapter(model)
    check_reading(adapter)
    source = root / family / "model"
    model.save_pretrained(source)
    config = CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=root / family / "cache")
    stats = calibrate(model, config, tokenizer=None)[0]
    original = _logits(model)
    out = dict(original=original)
    for mode in ("remove", "novice"):
        plan = make_plan(stats, PlanConfig("mone", 0.25, mode=mode))
        if family in NO_NOVICES and mode == "novice":
            with pytest.raises(PlanError) as refused, applied(model, plan, stats):
                pass
            with pytest.raises(PlanError):
                export_plan(source, plan, stats, root / family / mode)
            return dict(out, novice_refused=str(refused.value))
        with applied(model, plan, stats):
            out[f"{mode}_in_place"] = _logits(model)
        out[f"{mode}_restored"] = torch.equal(_logits(model), original)
        out[f"{mode}_applied"] = _logits(apply_plan(load_model(source, device="cpu")[0], plan, stats))
        target = root / family / mode
        out[f"{mode}_kind"] = export_plan(source, plan, stats, target).name
        out[f"{mode}_export"] = target
        out[f"{mode}_files"] = check_files(target)  # what `moeviz verify` finds wrong: nothing
    out["novice_reloaded"] = _logits(load_model(out["novice_export"], device="cpu")[0])
    return out


def _stock_logits(dirs: list[Path], cwd: Path) -> list:
    """Each directory loaded by AutoModelForCausalLM in one fresh process without moeviz: logits or the error."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
        tokens = torch.tensor({TOKENS.tolist()})
        results = []
        for i, path in enumerate(sys.argv[1:]):
            try:
                try:
                    cls = AutoModelForCausalLM
                    cls._model_mapping[type(AutoConfig.from_pretrained(path))]
                except KeyError:  # no auto mapping (Mistral-4): the class the config names
                    cls = getattr(transformers, AutoConfig.from_pretrained(path).architectures[0])
                model, info = cls.from_pretrained(path, output_loading_info=True)
                with torch.no_grad():
                    save_file({{"logits": model.eval()(tokens).logits.float().contiguous()}}, path + "/../stock.st")
                results.append(dict(ok=True, missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"])))
            except Exception as err:
                results.append(dict(ok=False, error=f"{{type(err).__name__}}: {{str(err)[:300]}}"))
        assert "moeviz" not in sys.modules
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script, *map(str, dirs)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    found = {}
    for family in FAMILIES:
        try:
            found[family] = _pipeline(family, root)
        except Exception as err:  # noqa: BLE001 (each family's test reports its own)
            found[family] = err
    ok = [f for f in FAMILIES if isinstance(found[f], dict) and found[f]["remove_kind"] == STANDARD]
    for family, result in zip(ok, _stock_logits([found[f]["remove_export"] for f in ok], root)):
        found[family]["stock"] = result
        if result["ok"]:
            result["logits"] = load_file(found[family]["remove_export"].parent / "stock.st")["logits"]
    return found


def test_every_moe_family_of_transformers_is_found():
    assert len(FAMILIES) >= 55
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen3_5_moe_text", "glm_moe_dsa"} <= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_end_to_end(family, results):
    result = results[family]
    if family in REFUSED:
        assert isinstance(result, ValueError) and "Unsupported architecture" in str(result), result
        assert REFUSED[family] in str(result)
        return
    if isinstance(result, Exception):
        raise result
    tol = dict(atol=1e-5, rtol=1e-4)
    assert not torch.allclose(result["remove_in_place"], result["original"]), "removal changed nothing"
    modes = ("remove",) if family in NO_NOVICES else ("remove", "novice")
    if family in NO_NOVICES:
        assert NO_NOVICES[family] in result["novice_refused"]
    for mode in modes:
        assert result[f"{mode}_restored"], f"{mode}: the model is not restored bit for bit"
        assert result[f"{mode}_files"] == [], result[f"{mode}_files"]
        torch.testing.assert_close(result[f"{mode}_applied"], result[f"{mode}_in_place"], **tol)
    assert result["remove_kind"] == STANDARD and result.get("novice_kind", SUBSTITUTION) == SUBSTITUTION
    stock = result["stock"]
    assert stock["ok"], stock["error"]
    assert not stock["missing"] and not stock["unexpected"], stock
    torch.testing.assert_close(stock["logits"], result["remove_in_place"], **tol)
    if family in NO_NOVICES:
        return
    torch.testing.assert_close(result["novice_reloaded"], result["novice_in_place"], **tol)


def test_composite_checkpoint_as_it_ships(tmp_path):
    """Qwen3.5-MoE ships as an image-text model, its decoder under `model.language_model.`: it
    calibrates on text through the language model (in one pass or layer by layer from the files),
    and its exports keep the vision tower byte for byte, say the new count in the nested text
    config, and reload in stock transformers as a causal LM and as image-text-to-text."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from moeviz.loading import load_skeleton
    from moeviz.tiny import tiny_config

    text = tiny_config("qwen3_5_moe_text")
    config = AutoConfig.for_model("qwen3_5_moe", text_config=text.to_dict(), vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text.hidden_size, patch_size=4,
        temporal_patch_size=1, spatial_merge_size=1))
    torch.manual_seed(0)
    composite = AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for layer in get_adapter(composite).layers:
            layer.router_weight.mul_(20)
    source = tmp_path / "model"
    composite.save_pretrained(source)
    model = load_model(source, device="cpu")[0]
    calib = CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path / "cache")
    stats = calibrate(model, calib, tokenizer=None)[0]
    calib = dataclasses.replace(calib, layer_by_layer=True, cache_dir=tmp_path / "cache-layers")
    by_layer = calibrate(load_skeleton(source, with_files=True), calib, tokenizer=None)[0]
    torch.testing.assert_close(by_layer["count"], stats["count"])  # the same weights, read from the files

    plans = {mode: make_plan(stats, PlanConfig("mone", 0.25, mode=mode)) for mode in ("remove", "novice")}
    wanted = {}
    for mode, plan in plans.items():
        with applied(model, plan, stats):
            wanted[mode] = _logits(model)
        export_plan(source, plan, stats, tmp_path / mode)
        assert check_files(tmp_path / mode) == []  # its vision tower too: every tensor in place
    saved = json.loads((tmp_path / "remove" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    assert saved["text_config"]["num_experts"] == plans["remove"].model["num_experts"][0] - 2
    before, after = load_file(source / "model.safetensors"), load_file(next((tmp_path / "remove").glob("*.safetensors")))
    visual = [k for k in before if ".visual." in k]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)

    script = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        tokens = torch.tensor({TOKENS.tolist()})
        out = {{}}
        for name, cls in (("clm", AutoModelForCausalLM), ("itt", AutoModelForImageTextToText)):
            model, info = cls.from_pretrained(sys.argv[1], output_loading_info=True)
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            with torch.no_grad():
                out[name] = model.eval()(tokens).logits.float().contiguous()
        assert "moeviz" not in sys.modules
        save_file(out, sys.argv[2])
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "remove"), str(tmp_path / "stock.st")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = load_file(tmp_path / "stock.st")
    tol = dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stock["clm"], wanted["remove"], **tol)
    torch.testing.assert_close(stock["itt"], wanted["remove"], **tol)
    torch.testing.assert_close(_logits(load_model(tmp_path / "novice", device="cpu")[0]), wanted["novice"], **tol)


def test_an_aliased_model_type_reads_as_its_family(tmp_path):
    """Kimi-K2's hub config says `model_type: kimi_k2` (remote code that is DeepSeek-V3's): moeviz
    reads it as DeepSeek-V3 without running remote code, and its export keeps the original's type."""
    model = _model("deepseek_v3")
    source = tmp_path / "kimi"
    model.save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    (source / "config.json").write_text(json.dumps(config))
    loaded = load_model(source, device="cpu")[0]
    assert type(loaded).__name__ == "DeepseekV3ForCausalLM"
    torch.testing.assert_close(_logits(loaded), _logits(model))
    stats = calibrate(loaded, CalibConfig(data="random", num_samples=4, seq_len=16, cache_dir=tmp_path / "cache"),
                      tokenizer=None)[0]
    plan = make_plan(stats, PlanConfig("mone", 0.25, mode="remove"))
    with applied(loaded, plan, stats):
        wanted = _logits(loaded)
    export_plan(source, plan, stats, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "kimi_k2" and written["n_routed_experts"] == config["n_routed_experts"] - 2
    torch.testing.assert_close(_logits(load_model(tmp_path / "out", device="cpu")[0]), wanted, atol=1e-5, rtol=1e-4)
