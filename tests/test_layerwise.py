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


def test_sequential_moe_pruner_scores_each_layer_after_the_ones_before_are_pruned(tmp_path):
    from moeviz.adapters import get_adapter
    from moeviz.surgery import sparsify_layer

    tiny_model("mixtral", num_hidden_layers=3).save_pretrained(tmp_path / "m")
    config = dict(CONFIG, probe_tokens=0)
    seq, _ = calibrate(load_skeleton(tmp_path / "m", with_files=True),
                       CalibConfig(**config, layer_by_layer=True, sequential_sparsity=0.5), use_cache=False)
    model, _ = load_model(tmp_path / "m", device="cpu")
    one_pass, _ = calibrate(model, CalibConfig(**config), use_cache=False)
    assert torch.equal(seq["in_sqnorm"][0], one_pass["in_sqnorm"][0])  # the first layer sees the same inputs
    for row, layer in enumerate(get_adapter(model).layers):  # the reference: prune layer by layer, recalibrate
        reference, _ = calibrate(model, CalibConfig(**config), use_cache=False)
        # float32: the pruned layer's outputs come from the model's own experts kernel, not the observer's
        torch.testing.assert_close(seq["in_sqnorm"][row], reference["in_sqnorm"][row], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seq["mid_sqnorm"][row], reference["mid_sqnorm"][row], rtol=1e-5, atol=1e-6)
        sparsify_layer(layer, {k: reference[k][row] for k in ("in_sqnorm", "mid_sqnorm")}, 0.5)
    assert not torch.allclose(seq["in_sqnorm"][2], one_pass["in_sqnorm"][2])  # later layers differ
    assert CalibConfig(**config, sequential_sparsity=0.5).key_fields() != CalibConfig(**config).key_fields()


def test_cli_prune_sequential_exports_the_sequential_masks(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tiny_model("olmoe").save_pretrained(tmp_path / "m")
    args = ["prune", "--model", str(tmp_path / "m"), "--sequential", "--ratio", "0.5", "--data", "random",
            "--samples", "4", "--seq-len", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    assert "weight sparsity 0.5" in capsys.readouterr().err
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for layer in pruned.model.layers:  # half of every row of every expert is zero
        w = layer.mlp.experts.down_proj
        assert torch.all((w == 0).sum(-1) == w.shape[-1] // 2)
    assert main(["prune", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o2")]) == 2
    assert "Give --plan, or --sequential" in capsys.readouterr().err


def test_an_interrupted_layer_by_layer_run_leaves_no_cache_entry(tmp_path):
    tiny_model("mixtral", num_hidden_layers=3).save_pretrained(tmp_path / "m")

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        calibrate(load_skeleton(tmp_path / "m", with_files=True),
                  CalibConfig(**CONFIG, layer_by_layer=True, cache_dir=cache), progress=stop_after_two)
    assert not cache.exists() or not any(cache.iterdir())
