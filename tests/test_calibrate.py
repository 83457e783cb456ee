import json

import pytest
import torch

from moeviz.adapters import get_adapter
from moeviz.calibrate import CalibConfig, cache_path, calibrate, model_meta, observe
from moeviz.data import sample_sequences
from moeviz.loading import load_model
from moeviz.observe import Observer
from moeviz.stats import ExpertStats, StatsError
from moeviz.tiny import tiny_model

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
MODELS = FAMILIES + ["demo"]  # tiny random models of several families, and the trained demo model


def _model(name):
    return load_model("demo")[0] if name == "demo" else tiny_model(name)


def _config(tmp_path, **kw):
    return CalibConfig(**{**dict(data="random", num_samples=6, seq_len=16, batch_size=3,
                                 probe_tokens=32, cache_dir=tmp_path), **kw})


@pytest.mark.parametrize("model_type", MODELS)
def test_counts_sum_to_tokens_times_top_k(model_type, tmp_path):
    stats, _ = calibrate(_model(model_type), _config(tmp_path), use_cache=False)
    tokens = 6 * 16
    assert stats["tokens"].tolist() == [tokens] * stats.num_layers
    assert torch.equal(stats["count"].sum(1), torch.full((stats.num_layers,), float(tokens * stats.top_k)))
    assert torch.allclose(stats.frequency.sum(1), torch.tensor(float(stats.top_k), dtype=torch.float64))
    # every token's selected experts co-occur with themselves: the diagonal is the count
    assert torch.equal(torch.diagonal(stats["coactivation"], dim1=1, dim2=2), stats["count"])


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "gpt_oss", "demo"])
def test_statistics_equal_brute_force(model_type):
    model = _model(model_type)
    adapter = get_adapter(model)
    layer = adapter.layers[-1]
    tokens = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(3))
    inputs = []
    handle = layer.block.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    observer = Observer(adapter, probe_tokens=0)
    with torch.no_grad(), observer.attached():
        model(tokens)
    sums = observer.sums()
    stats = ExpertStats.from_sums(sums, dict(layer_indices=adapter.layer_indices, top_k=2))
    L = adapter.layers.index(layer)
    with torch.no_grad():
        x = inputs[0].reshape(-1, layer.hidden_size)
        routing = layer.route(x)
        for e in range(layer.num_experts):
            tok, k = torch.where(routing.top_k_index == e)
            g = routing.top_k_weights[tok, k].double()
            mid, out = layer.expert_forward(e, x[tok])
            out, mid, xe = out.double(), mid.double(), x[tok].double()
            assert stats["count"][L, e] == len(tok)
            close = dict(rtol=1e-5, atol=1e-6)  # each batch is reduced in float32, the model's precision
            torch.testing.assert_close(stats["gate_sum"][L, e], g.sum(), **close)
            if len(tok):
                # The observer's outputs come from the grouped kernel, these from one matmul per expert:
                # float32 results that differ by ~1e-7 of the outputs' size. A mean or variance near
                # zero is off by that much in absolute terms, so the tolerance scales with the outputs.
                size = out.abs().max().item()
                torch.testing.assert_close(stats["out_mean"][L, e], out.mean(0), rtol=1e-5, atol=1e-6 * size)
                torch.testing.assert_close(stats["out_var"][L, e], out.var(0, unbiased=False), rtol=1e-5,
                                           atol=1e-6 * size ** 2)
                torch.testing.assert_close(stats["in_sqnorm"][L, e], ((g[:, None] * xe) ** 2).sum(0), **close)
                torch.testing.assert_close(stats["mid_sqnorm"][L, e], ((g[:, None] * mid) ** 2).sum(0), **close)
                torch.testing.assert_close(stats["reap_sum"][L, e], (g * out.norm(dim=1)).sum(), **close)
        torch.testing.assert_close(stats["prob_sum"][L], routing.probs.double().sum(0), rtol=1e-5, atol=1e-6)  # float32 sums


@pytest.mark.parametrize("model_type", MODELS)
def test_logits_unchanged_and_hooks_removed(model_type):
    model = _model(model_type)
    adapter = get_adapter(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        before = model(tokens).logits
        with Observer(adapter, probe_tokens=16).attached():
            during = model(tokens).logits
        after = model(tokens).logits
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, before)
    for layer in adapter.layers:
        assert "forward" not in vars(layer.experts) and not layer.router._forward_hooks


def test_hooks_removed_after_an_error_inside_the_pass(tmp_path):
    model = tiny_model("qwen2_moe")
    adapter = get_adapter(model)
    boom = model.model.layers[-1].register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        calibrate(model, _config(tmp_path))
    boom.remove()
    for layer in adapter.layers:
        assert "forward" not in vars(layer.experts) and not layer.router._forward_hooks
    assert not any(tmp_path.iterdir()), "an interrupted run leaves no cache behind"


def test_merged_halves_equal_the_whole(tmp_path):
    model = tiny_model("olmoe")
    config = _config(tmp_path, num_samples=8, probe_tokens=0)
    whole, _ = calibrate(model, config, use_cache=False)
    tokens = sample_sequences("random", 8, 16, seed=0, vocab_size=128)  # what calibrate drew
    adapter = get_adapter(model)
    meta = model_meta(model, adapter, "fp")
    first, second = (ExpertStats.from_sums(observe(model, adapter, part, config), meta)
                     for part in (tokens[:3], tokens[3:]))
    merged = first.merge(second)
    assert merged.meta["tokens"] == whole.meta["tokens"] == 8 * 16
    for name in whole.tensors:
        torch.testing.assert_close(merged[name], whole[name], rtol=1e-6, atol=1e-10)


def test_second_call_loads_from_the_cache_without_running_the_model(tmp_path):
    model = tiny_model("mixtral")
    first, path = calibrate(model, _config(tmp_path))
    assert (path / "stats.safetensors").is_file() and (path / "meta.json").is_file()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    second, path2 = calibrate(model, _config(tmp_path, batch_size=2))  # batch size is not in the key
    assert path2 == path and not calls
    for name in first.tensors:
        assert torch.equal(first[name], second[name])
    third, path3 = calibrate(model, _config(tmp_path, seed=1))
    assert path3 != path and calls


def test_corrupted_and_mismatched_caches_are_refused(tmp_path):
    model = tiny_model("mixtral")
    _, path = calibrate(model, _config(tmp_path))
    data = (path / "stats.safetensors").read_bytes()
    (path / "stats.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(StatsError, match="corrupted or truncated"):
        calibrate(model, _config(tmp_path))
    (path / "stats.safetensors").write_bytes(data)
    meta = json.loads((path / "meta.json").read_text())
    meta["model_fingerprint"] = "0123456789abcdef"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StatsError, match="does not match"):
        calibrate(model, _config(tmp_path))
    (path / "meta.json").write_text("{not json")
    with pytest.raises(StatsError, match="meta.json is corrupted"):
        ExpertStats.load(path)


def test_cache_key_depends_on_the_model(tmp_path):
    a, b = tiny_model("mixtral", seed=0), tiny_model("mixtral", seed=1)
    assert cache_path(a, _config(tmp_path)) != cache_path(b, _config(tmp_path))
    assert cache_path(a, _config(tmp_path)) == cache_path(tiny_model("mixtral", seed=0), _config(tmp_path))


def test_probes_are_bounded_and_self_similar(tmp_path):
    stats, _ = calibrate(tiny_model("qwen3_moe"), _config(tmp_path, probe_tokens=40), use_cache=False)
    assert stats.has_probes and stats["probe_tokens"].tolist() == [40.0] * stats.num_layers
    sim = stats.probe_similarity
    torch.testing.assert_close(torch.diagonal(sim, dim1=1, dim2=2), torch.ones(stats.num_layers, 8, dtype=torch.float64))
    torch.testing.assert_close(sim, sim.transpose(1, 2))
    assert stats.probe_mean.shape == (stats.num_layers, 8, 32)
    off, _ = calibrate(tiny_model("qwen3_moe"), _config(tmp_path, probe_tokens=0), use_cache=False)
    assert not off.has_probes


def test_an_edited_calibration_file_is_a_new_key(tmp_path):
    from moeviz.calibrate import cache_key

    text = tmp_path / "calib.txt"
    text.write_text("some text\n\nmore text")
    key = cache_key("fp", CalibConfig(data=str(text)))
    assert key == cache_key("fp", CalibConfig(data=str(text), batch_size=1))
    text.write_text("other text\n\nmore text")
    assert cache_key("fp", CalibConfig(data=str(text))) != key


def _rank(rank, world_size, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        config = CalibConfig(data="random", num_samples=6, seq_len=16, batch_size=2, probe_tokens=32,
                             cache_dir=out_dir / "cache")
        stats, path = calibrate(tiny_model("olmoe"), config)
        stats.save(out_dir / f"rank{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_stats_of_one(tmp_path):
    """Data-parallel calibration (gloo, two CPU processes) adds up to a single process's stats."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank, args=(2, tmp_path / "init", tmp_path), nprocs=2, start_method="spawn")
    config = _config(tmp_path / "single", probe_tokens=32, batch_size=2)
    single, _ = calibrate(tiny_model("olmoe"), config, use_cache=False)
    ranks = [ExpertStats.load(tmp_path / f"rank{r}") for r in (0, 1)]
    cached = list((tmp_path / "cache").glob("*/stats.safetensors"))
    assert len(cached) == 1, "rank 0 writes the cache, once"
    for name in ("count", "gate_sum", "prob_sum", "coactivation", "tokens"):
        for stats in ranks:
            torch.testing.assert_close(stats[name], single[name], rtol=1e-6, atol=1e-9)
    for name in ("out_mean", "out_var", "in_sqnorm", "mid_sqnorm", "reap_sum"):
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-5, atol=1e-6)
    # the pooled probe sample: as many tokens as asked, the same on every rank
    assert ranks[0]["probe_tokens"].tolist() == [32.0] * ranks[0].num_layers
    torch.testing.assert_close(ranks[0]["probe_sim_sum"], ranks[1]["probe_sim_sum"])
    diag = torch.diagonal(ranks[0].probe_similarity, dim1=1, dim2=2)
    torch.testing.assert_close(diag, torch.ones_like(diag))


def test_an_offloaded_model_gives_the_same_stats_and_fingerprint():
    """Weights kept off the device (accelerate's cpu_offload, one module at a time)."""
    pytest.importorskip("accelerate", reason="offloading needs accelerate: pip install 'moeviz[eval]'")
    import copy

    from accelerate import cpu_offload

    from moeviz.loading import model_fingerprint

    model = tiny_model("mixtral")
    config = _config(None, probe_tokens=32)
    whole, _ = calibrate(model, config, use_cache=False)
    offloaded = cpu_offload(copy.deepcopy(model), execution_device=torch.device("cpu"))
    assert all(p.is_meta for p in offloaded.parameters())
    assert model_fingerprint(offloaded) == model_fingerprint(model)
    experts = get_adapter(offloaded).layers[0].experts
    wrapper, inner = vars(experts)["forward"], vars(experts)["_old_forward"]
    stats, _ = calibrate(offloaded, config, use_cache=False)
    for name in ("count", "out_mean", "out_var", "in_sqnorm", "probe_sim_sum"):
        torch.testing.assert_close(stats[name], whole[name])
    # accelerate's wrapper stayed in place throughout, and its inner forward is back
    assert vars(experts)["forward"] is wrapper and vars(experts)["_old_forward"] is inner


def _sources(model, config, tokens, splits):
    adapter = get_adapter(model)
    meta = model_meta(model, adapter, "fp")
    return [ExpertStats.from_sums(observe(model, adapter, tokens[a:b], config), meta) for a, b in splits]


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def test_a_mix_at_token_shares_equals_one_calibration_over_every_source():
    """Two sources (8 and 16 sequences), mixed at 1:2, are the statistics of one pass over all
    24 sequences: every tensor, float64, to 1e-9; at share 1, a source's own statistics."""
    model = tiny_model("qwen2_moe")
    config = CalibConfig(data="random", num_samples=24, seq_len=16, batch_size=8, probe_tokens=0)
    tokens = sample_sequences("random", 24, 16, seed=3, vocab_size=128)
    whole, a, b = _sources(model, config, tokens, [(0, 24), (0, 8), (8, 24)])
    mixed = ExpertStats.mix({a: 1, b: 2})
    assert mixed.meta["tokens"] == whole.meta["tokens"] == 24 * 16
    assert set(mixed.tensors) == set(whole.tensors)
    for name in whole.tensors:
        assert whole[name].dtype == mixed[name].dtype == torch.float64
        assert _relative(mixed[name], whole[name]) < 1e-9, name
    assert [m["share"] for m in mixed.meta["mix"]] == pytest.approx([1 / 3, 2 / 3])
    for alone in (ExpertStats.mix({b: 1, a: 0}), ExpertStats.mix([(b, 3.0)])):
        for name in b.tensors:
            assert _relative(alone[name], b[name]) < 1e-12, name
    equal = ExpertStats.mix({a: 1, ExpertStats(dict(a.tensors), dict(a.meta)): 1})  # equal counts, equal shares
    for name, merged in a.merge(a).tensors.items():
        assert _relative(equal[name], merged) < 1e-12, name


def test_a_mix_scales_the_probe_sums_and_refuses_what_cannot_mix():
    model = tiny_model("olmoe")
    config = CalibConfig(data="random", num_samples=8, seq_len=16, batch_size=4, probe_tokens=16)
    tokens = sample_sequences("random", 8, 16, seed=1, vocab_size=128)
    a, b = _sources(model, config, tokens, [(0, 4), (4, 8)])
    mixed = ExpertStats.mix({a: 3, b: 1})  # a's tokens weigh 1, b's 1/3
    torch.testing.assert_close(mixed["probe_out_sum"], a["probe_out_sum"] + b["probe_out_sum"] / 3, rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed.probe_similarity, (a["probe_sim_sum"] + b["probe_sim_sum"] / 3)
                               / (a["probe_tokens"] + b["probe_tokens"] / 3)[:, None, None], rtol=1e-12, atol=0)
    other = _sources(tiny_model("olmoe", seed=1), config, tokens, [(0, 4)])[0]
    other.meta["model_fingerprint"] = "another"
    with pytest.raises(StatsError, match="different models or layouts \\(model_fingerprint differs"):
        ExpertStats.mix({a: 1, other: 1})
    for weights in ({a: -1, b: 2}, {a: 0, b: 0}):
        with pytest.raises(StatsError, match="non-negative and not all zero"):
            ExpertStats.mix(weights)
