"""Layer-by-layer calibration from the files gives the ordinary pass's statistics, bit for bit,
and shares its cache entry; MoE-Pruner's sequential mode scores each layer after the ones before
it are pruned."""

import pytest
import torch

from moeviz.calibrate import CalibConfig, cache_path, calibrate
from moeviz.cli import main
from moeviz.loading import load_model, load_skeleton
from moeviz.tiny import tiny_model

CONFIG = dict(data="random", num_samples=6, seq_len=16, batch_size=3, probe_tokens=32)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def saved(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tiny_model(request.param).save_pretrained(path, max_shard_size="40KB")  # several shards
    return path


def test_layer_by_layer_equals_the_ordinary_pass(saved):
    model, _ = load_model(saved, device="cpu")
    ordinary, _ = calibrate(model, CalibConfig(**CONFIG), use_cache=False)
    skeleton = load_skeleton(saved, with_files=True)
    assert all(p.is_meta for p in skeleton.parameters())
    layered, _ = calibrate(skeleton, CalibConfig(**CONFIG, layer_by_layer=True), use_cache=False)
    assert layered.meta["model_fingerprint"] == ordinary.meta["model_fingerprint"]
    for key, tensor in ordinary.tensors.items():
        assert torch.equal(layered[key], tensor), key
    assert all(p.is_meta for layer in skeleton.model.layers for p in layer.parameters())  # every layer freed


def test_one_cache_entry_serves_both(tmp_path):
    tiny_model("olmoe").save_pretrained(tmp_path / "olmoe")
    skeleton = load_skeleton(tmp_path / "olmoe", with_files=True)
    config = CalibConfig(**CONFIG, layer_by_layer=True, cache_dir=tmp_path / "cache")
    stats, path = calibrate(skeleton, config)
    model, _ = load_model(tmp_path / "olmoe", device="cpu")
    assert cache_path(model, CalibConfig(**CONFIG, cache_dir=tmp_path / "cache")) == path
    again, same = calibrate(model, CalibConfig(**CONFIG, cache_dir=tmp_path / "cache"))
    assert same == path and torch.equal(again["count"], stats["count"])


def test_cli_layer_by_layer(tmp_path, capsys):
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "q")
    args = ["calibrate", "--model", str(tmp_path / "q"), "--data", "random", "--samples", "4", "--seq-len", "16",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args + ["--layer-by-layer"]) == 0
    layered = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == layered and "cached" in captured.err
