"""`moeviz verify`: each kind of export, on both demo models, served by the engine that serves it
gives the intended model's tokens and log-probabilities; a broken copy is named in one line
before any model is built; what the files cannot show (experts swapped, checksums gone) the
engine's outputs do; the result lands in the lineage and the card."""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec

import pytest
from safetensors.torch import load_file, save_file

from moeviz.calibrate import CalibConfig, calibrate
from moeviz.export import export_plan
from moeviz.filecheck import check_files
from moeviz.loading import load_model
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import LINEAGE_FILE, MOEVIZ_ONLY, STANDARD, SUBSTITUTION, read_lineage
from moeviz.rewrite import INDEX_FILE, REPLACEMENTS_FILE
from moeviz.verify import VerifyError, compare, gpu_room, verify

PLANS = {STANDARD: PlanConfig("frequency", ratio=0.25), SUBSTITUTION: PlanConfig("mone", ratio=0.25, mode="novice"),
         MOEVIZ_ONLY: PlanConfig("frequency", ratio=0.25, scope="global")}
SERVED_BY = {STANDARD: "transformers", SUBSTITUTION: "moeviz", MOEVIZ_ONLY: "moeviz"}
VLLM_PYTHON = os.environ.get("MOEVIZ_VLLM_PYTHON")  # a Python with vLLM (bench/serve.py makes one)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    made = {}
    for name in ("demo", "demo-fine"):
        model, tokenizer = load_model(name, device="cpu")
        stats, path = calibrate(model, CalibConfig(data="demo", num_samples=8, seq_len=64, cache_dir=root / "cache"),
                                tokenizer)
        for kind, config in PLANS.items():
            plan = make_plan(stats, config, calibration=str(path))
            assert export_plan(name, plan, stats, root / name / kind).name == kind
            made[name, kind] = root / name / kind
    return made


def _copy(exports, name, kind, tmp_path):
    return shutil.copytree(exports[name, kind], tmp_path / "copy")


@pytest.mark.parametrize("name", ["demo", "demo-fine"])
@pytest.mark.parametrize("kind", [STANDARD, SUBSTITUTION, MOEVIZ_ONLY])
def test_an_export_verifies_in_the_engine_that_serves_it(exports, name, kind, tmp_path):
    path = _copy(exports, name, kind, tmp_path)
    assert check_files(path) == []
    result = verify(path, engine=SERVED_BY[kind], num_prompts=3, new_tokens=8)
    assert result.ok, result.summary()
    assert len(result.rows) == 3 and all(row["equal"] and row["diff"] <= 1e-3 for row in result.rows)
    assert result.reference == f"the plan applied in place on {name}"  # not the export against itself
    assert result.summary().startswith(f"Verified in {'transformers' if kind == STANDARD else 'moeviz.load_model'} ")
    assert read_lineage(path)["verifications"][SERVED_BY[kind]]["ok"] is True
    card = (path / "README.md").read_text()
    assert f"## Verification\n\n- {result.summary()}\n" in card and card.index("## Evaluation") < card.index("## Verification")
    assert check_files(path) == []  # the lineage and the card changed; the checksummed files did not


def test_stock_transformers_refuses_a_substitution_export_and_says_what_to_do(exports, tmp_path):
    path = _copy(exports, "demo", SUBSTITUTION, tmp_path)
    result = verify(path, engine="transformers", num_prompts=2, new_tokens=2)
    assert not result.ok and result.rows == []
    assert "--engine vllm (≥ 0.33) or --engine moeviz" in result.error and "--mode remove" in result.error
    assert result.summary().startswith("Refused by transformers")
    assert read_lineage(path)["verifications"]["transformers"]["ok"] is False


def _swap_two_experts(path):
    """Exchange experts 0 and 1 of the first MoE layer in the files (shapes and names stay)."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    for key in [k for k in tensors if re.search(r"\.layers\.1\.\w+\.experts\.0\.", k)]:
        other = key.replace(".experts.0.", ".experts.1.")
        tensors[key], tensors[other] = tensors[other], tensors[key]
    save_file(tensors, file, metadata={"format": "pt"})
    return file.name


@pytest.mark.parametrize("name", ["demo", "demo-fine"])
def test_a_broken_copy_is_named_in_one_line_before_any_model_is_built(exports, name, tmp_path):
    # the replacement vectors' file lost in a copy, the index edited so that nothing else notices
    gone = _copy(exports, name, SUBSTITUTION, tmp_path / "gone")
    (gone / REPLACEMENTS_FILE).unlink()
    index = json.loads((gone / INDEX_FILE).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != REPLACEMENTS_FILE}
    (gone / INDEX_FILE).write_text(json.dumps(index))
    assert check_files(gone)[0].startswith(f"{REPLACEMENTS_FILE} is missing: the export wrote it")
    with pytest.raises(VerifyError, match=f"^{REPLACEMENTS_FILE} is missing"):
        verify(gone)
    # ... and with the lineage gone too, the config still promises the vectors
    (gone / LINEAGE_FILE).unlink()
    said = check_files(gone)
    assert len(said) == 1 and "replacement vector(s) of the expert substitution are not in the files" in said[0]

    swapped = _copy(exports, name, STANDARD, tmp_path / "swapped")
    shard = _swap_two_experts(swapped)
    said = check_files(swapped)
    assert len(said) == 1 and said[0].startswith(f"{shard} differs from the file the export wrote")

    recast = _copy(exports, name, STANDARD, tmp_path / "recast")  # one expert's tensor in another dtype
    tensors = load_file(recast / "model.safetensors")
    key = next(k for k in sorted(tensors) if re.search(r"\.layers\.1\.\w+\.experts\.0\.", k))
    tensors[key] = tensors[key].half()
    save_file(tensors, recast / "model.safetensors", metadata={"format": "pt"})
    said = check_files(recast)
    assert said[0].startswith("layer 1: its experts' ") and "come in 2 dtypes (F16, F32)" in said[0], said

    edited = _copy(exports, name, STANDARD, tmp_path / "edited")
    config = json.loads((edited / "config.json").read_text())
    field = next(f for f in ("num_local_experts", "num_experts") if f in config)
    kept, config[field] = config[field], config[field] + 2
    (edited / "config.json").write_text(json.dumps(config))
    said = check_files(edited)
    assert said[0].startswith(f"config.json gives {kept + 2} experts a layer, the plan makes it {kept} in layers ")
    assert said[1].startswith("config.json differs from the file the export wrote")


def test_a_file_that_is_not_whole_is_named_and_an_edit_that_shapes_nothing_is_a_note(exports, tmp_path):
    pointer = _copy(exports, "demo", STANDARD, tmp_path / "pointer")  # a clone without git-lfs
    (pointer / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    said = check_files(pointer)
    assert said[0].startswith("model.safetensors is a git-lfs pointer") and "git lfs pull" in said[0], said
    cut = _copy(exports, "demo", STANDARD, tmp_path / "cut")  # a copy cut off half-way
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    (cut / LINEAGE_FILE).write_text(json.dumps({k: v for k, v in read_lineage(cut).items() if k != "files"}))
    said = check_files(cut)
    assert len(said) == 1 and said[0].startswith("model.safetensors is cut short: its header promises"), said
    (cut / "config.json").write_text('{"model_type": "mix')
    assert check_files(cut) == ["config.json is not valid JSON (Unterminated string starting at: line 1 column 16 "
                                "(char 15); 19 bytes): a cut or edited copy"]
    edited = _copy(exports, "demo", STANDARD, tmp_path / "edited")  # serving settings, not weights
    (edited / "generation_config.json").write_text('{"do_sample": true}')
    notes = []
    assert check_files(edited, notes) == [] and notes[0].startswith("generation_config.json differs from the file")


def test_a_tie_is_the_runner_up_within_the_tolerance_and_nothing_else():
    reference = dict(tokens=[[5, 6, 7]], logprobs=[[-1.0, -1.0, -0.5, -0.6, -0.7]], margins=[[2.0, 1e-4, 3.0]],
                     runner_up=[[9, 8, 4]])
    took_runner_up = dict(tokens=[[5, 8, 7]], logprobs=[[-1.0, -1.0, -0.5, -0.6, -0.9]])
    [row] = compare([[1, 2, 3]], reference, took_runner_up, 1e-3)
    assert row["equal"] and row["first_difference"] == 1 and row["diff"] == 0.0  # only the shared tokens compared
    [row] = compare([[1, 2, 3]], reference, dict(took_runner_up, tokens=[[5, 3, 7]]), 1e-3)
    assert not row["equal"]  # not the runner-up: no tie, however close the top two
    [row] = compare([[1, 2, 3]], reference, dict(took_runner_up, tokens=[[5, 6]]), 1e-3)
    assert not row["equal"] and row["first_difference"] == 2  # stopped early (an engine that stops at EOS)


def test_the_dashboard_runs_no_engine_that_cannot_fit_beside_the_original_it_holds():
    gib = 2**30
    assert gpu_room(10 * gib, free=60 * gib, total=80 * gib, engine="transformers") is None
    assert "needs about 10.0 GiB" in gpu_room(10 * gib, free=8 * gib, total=80 * gib, engine="moeviz")
    assert "vLLM starts with 90 % of the GPU free, and 60.0 of 80.0 GiB are" == gpu_room(
        10 * gib, free=60 * gib, total=80 * gib, engine="vllm")


def test_the_export_against_its_own_reading_is_consistent_not_verified(exports, tmp_path):
    path = _copy(exports, "demo", SUBSTITUTION, tmp_path)
    lineage = read_lineage(path)
    (path / LINEAGE_FILE).unlink()  # no lineage: no original to compare with
    result = verify(path, engine="moeviz", data="demo", num_prompts=2, new_tokens=4)
    assert result.ok and not result.independent
    assert result.summary().startswith("Consistent in moeviz.load_model") and "it has no moeviz lineage" in result.summary()
    assert lineage["data"] == "demo"  # what the prompts are taken from when the stats are not at hand


def test_what_the_files_cannot_show_the_engine_does(exports, tmp_path):
    """Two experts swapped and the checksums gone from the lineage: the files look whole, the
    outputs are not the plan's."""
    path = _copy(exports, "demo", STANDARD, tmp_path)
    _swap_two_experts(path)
    lineage = read_lineage(path)
    del lineage["files"]
    (path / LINEAGE_FILE).write_text(json.dumps(lineage))
    assert check_files(path) == []
    result = verify(path, engine="transformers", num_prompts=3, new_tokens=8)
    assert not result.ok and max(row["diff"] for row in result.rows) > 0.1
    assert result.summary().startswith("Differs in transformers")


def test_the_command_exits_non_zero_on_a_refusal_and_zero_when_verified(exports, tmp_path):
    path = _copy(exports, "demo", SUBSTITUTION, tmp_path)
    cmd = [sys.executable, "-m", "moeviz.cli", "verify", str(path), "--prompts", "2", "--new-tokens", "4"]
    refused = subprocess.run([*cmd, "--engine", "transformers"], capture_output=True, text=True)
    assert refused.returncode == 1 and "Refused by transformers" in refused.stdout, refused.stderr
    done = subprocess.run(cmd, capture_output=True, text=True)  # the default engine: moeviz for a substitution
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert sum(line.startswith("prompt ") for line in lines) == 2 and lines[-1].startswith("Verified in moeviz")


@pytest.mark.skipif(find_spec("vllm") is None and not VLLM_PYTHON,
                    reason="vLLM is not importable here: set MOEVIZ_VLLM_PYTHON to a Python that has it "
                           "(bench/serve.py sets up vLLM's CPU build in a venv of its own)")
@pytest.mark.parametrize("kind", [STANDARD, SUBSTITUTION])
def test_vllm_serves_the_export_as_planned(exports, kind, tmp_path):
    path = _copy(exports, "demo", kind, tmp_path)
    result = verify(path, engine="vllm", python=VLLM_PYTHON, num_prompts=3, new_tokens=8)
    assert result.ok or (kind == SUBSTITUTION and "has no expert substitution" in (result.error or "")), \
        result.summary()
