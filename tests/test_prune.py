import numpy as np
import pytest
import torch

from moeviz.adapters import get_adapter
from moeviz.apply import applied, apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.loading import load_model, model_fingerprint
from moeviz.methods import PlanConfig, make_plan, method_names
from moeviz.plan import PlanError, PruningPlan, select
from moeviz.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens).logits


def _stats(model, tmp_path=None, **kw):
    config = CalibConfig(**{**dict(data="random", num_samples=8, seq_len=32, probe_tokens=64), **kw})
    return calibrate(model, config, use_cache=False)[0]


def _plan(model, pruned, mode="remove", **kw):
    info = model_info(model)
    return PruningPlan("manual", 0.0, "layer", mode, info, pruned=pruned, **kw)


def _masked_router(layer, pruned, norm_topk):
    """Reference: the router's logits of `pruned` experts set to −inf (softmax-then-top-k routers)."""
    def hook(module, args, output):
        logits = output[0].clone()
        logits[:, pruned] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, layer.top_k, dim=-1)
        if norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights.to(output[1].dtype), index
    return layer.router.register_forward_hook(hook)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_ratio_zero_changes_nothing(model_type):
    model = tiny_model(model_type)
    stats = _stats(model)
    for method in ("frequency", "mone"):
        plan = make_plan(stats, PlanConfig(method, ratio=0.0))
        assert plan.num_pruned == 0
        before = _logits(model)
        torch.testing.assert_close(_logits(apply_plan(model, plan, stats)), before)


@pytest.mark.parametrize("model_type", ["mixtral", "olmoe", "qwen2_moe"])
def test_removal_equals_masking_router_logits(model_type):
    model = tiny_model(model_type)
    pruned = {i: [1, 6] for i in get_adapter(model).layer_indices}
    removed = apply_plan(tiny_model(model_type), _plan(model, pruned))  # in place, on a second copy
    assert get_adapter(removed).num_experts == [6] * len(pruned)
    norm = getattr(model.config, "norm_topk_prob", True)
    hooks = [_masked_router(layer, [1, 6], norm) for layer in get_adapter(model).layers]
    reference = _logits(model)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(_logits(removed), reference, atol=1e-5, rtol=1e-4)


def test_deepseek_v3_removal_equals_masking_with_its_bias_and_groups():
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    pruned = {i: [2, 5] for i in adapter.layer_indices}  # one from each of the 2 groups
    removed = apply_plan(tiny_model("deepseek_v3"), _plan(model, pruned))
    for layer in adapter.layers:  # −inf on the choice score keeps them out; weights unchanged
        layer.router.e_score_correction_bias[[2, 5]] = float("-inf")
    torch.testing.assert_close(_logits(removed), _logits(model), atol=1e-5, rtol=1e-4)
    with pytest.raises(PlanError, match="groups must each lose the same number"):
        apply_plan(model, _plan(model, {adapter.layer_indices[0]: [0, 1]}))


def test_novice_output_is_kept_experts_plus_gate_times_mean():
    model = tiny_model("qwen2_moe")
    stats = _stats(model)
    layer0 = get_adapter(model).layers[0]
    plan = _plan(model, {layer0.layer_idx: [0, 3, 4]}, mode="novice")
    pruned = apply_plan(tiny_model("qwen2_moe"), plan, stats)
    hidden = torch.randn(1, 40, layer0.hidden_size)
    with torch.no_grad():
        routing = layer0.route(hidden[0])
        expected = torch.zeros(40, layer0.hidden_size)
        for t in range(40):
            for k in range(layer0.top_k):
                e, g = routing.top_k_index[t, k].item(), routing.top_k_weights[t, k]
                if e in (0, 3, 4):
                    expected[t] += g * stats["out_mean"][0, e].float()
                else:
                    expected[t] += g * layer0.expert_forward(e, hidden[0, t:t + 1])[1][0]
        shared = layer0.shared[0](hidden[0]) * torch.sigmoid(layer0.block.shared_expert_gate(hidden[0]))
        got = pruned.model.layers[layer0.layer_idx].mlp(hidden)[0]
    assert (routing.top_k_index[..., None] == torch.tensor([0, 3, 4])).any(), "some token uses a novice"
    torch.testing.assert_close(got, expected + shared, atol=1e-5, rtol=1e-4)
    drop = apply_plan(tiny_model("qwen2_moe"), _plan(model, {layer0.layer_idx: [0, 3, 4]}, mode="drop"), stats)
    assert not torch.allclose(_logits(drop), _logits(pruned))


def test_moe_pruner_zeros_the_asked_fraction_of_every_row_and_nothing_else():
    model = tiny_model("qwen2_moe")
    stats = _stats(model)
    plan = make_plan(stats, PlanConfig("moe_pruner", ratio=0.5))
    pruned = apply_plan(tiny_model("qwen2_moe"), plan, stats)
    for layer in get_adapter(pruned).layers:
        for e in range(layer.num_experts):
            w = layer.expert_weights(e)
            for weight in (w.gate, w.up, w.down):
                zeros = (weight == 0).sum(dim=1)
                assert torch.all(zeros == weight.shape[1] // 2)
    before, after = dict(model.named_parameters()), dict(pruned.named_parameters())
    for name, p in after.items():
        if ".experts." not in name:
            assert torch.equal(p, before[name]), name  # attention, routers, shared experts
    nm = apply_plan(tiny_model("qwen2_moe"), make_plan(stats, PlanConfig("moe_pruner", nm=(2, 4))), stats)
    w = get_adapter(nm).layers[0].expert_weights(0).up
    assert torch.all((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2)


def test_planted_twins_share_a_cluster_and_the_zero_expert_goes_first():
    model = tiny_model("mixtral")
    for layer in get_adapter(model).layers:
        with torch.no_grad():
            layer.experts.gate_up_proj[2] = layer.experts.gate_up_proj[1]
            layer.experts.down_proj[2] = layer.experts.down_proj[1]
            layer.experts.down_proj[5] = 0  # an expert whose output is always zero
            layer.router.weight[5] = layer.router.weight[5] * 3  # and is used often
    stats = _stats(model)
    for linkage in ("average", "ward"):
        cprune = make_plan(stats, PlanConfig("cprune", ratio=1 / 8, linkage=linkage))
        for layer_idx, merges in cprune.merge_into.items():
            assert merges in ({1: 2}, {2: 1}), "the twins are the closest pair"
            assert cprune.pruned[layer_idx] == sorted(merges)
    mone = make_plan(stats, PlanConfig("mone", ratio=1 / 8))
    assert all(experts == [5] for experts in mone.pruned.values())
    assert make_plan(stats, PlanConfig("frequency", ratio=1 / 8)).pruned != mone.pruned


@pytest.mark.parametrize("linkage", ["average", "ward"])
def test_cprune_merges_at_the_heights_scipy_finds(linkage):
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import pdist

    from moeviz.methods.cprune import _Layer
    from moeviz.stats import cosine_matrix

    feats = torch.randn(12, 6, generator=torch.Generator().manual_seed(1))
    dist = 1 - cosine_matrix(feats.numpy())
    np.fill_diagonal(dist, 0)
    layer = _Layer(dist, np.arange(12.0), linkage)
    for _ in range(11):
        layer.merge_closest()
    unit = torch.nn.functional.normalize(feats, dim=1).double().numpy()
    if linkage == "ward":  # SciPy's Ward heights are Euclidean; ours are half their square
        expected = scipy_linkage(unit, "ward")[:, 2] ** 2 / 2
    else:
        expected = scipy_linkage(pdist(unit, "cosine"), "average")[:, 2]
    np.testing.assert_allclose(layer.heights, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_merging_a_permuted_copy_gives_back_the_same_expert(model_type):
    from moeviz.apply import _merged_tensors

    model = tiny_model(model_type)
    layer = get_adapter(model).layers[0]
    one, copy = layer.expert_weights(1), layer.expert_weights(3)
    perm = torch.randperm(layer.intermediate_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for src, dst in ((one.gate, copy.gate), (one.up, copy.up), (one.gate_bias, copy.gate_bias),
                         (one.up_bias, copy.up_bias)):
            if src is not None:
                dst.copy_(src[perm])
        copy.down.copy_(one.down[:, perm])
        if one.down_bias is not None:
            copy.down_bias.copy_(one.down_bias)
    x = torch.randn(5, layer.hidden_size)
    with torch.no_grad():
        before = layer.expert_forward(1, x)[1]
        torch.testing.assert_close(layer.expert_forward(3, x)[1], before)  # the same function
        frequency = torch.tensor([0.0, 1.0, 0.0, 3.0] + [1.0] * (layer.num_experts - 4))
        for view, merged in _merged_tensors(layer, {3: 1}, frequency):
            view.copy_(merged)
        torch.testing.assert_close(layer.expert_forward(1, x)[1], before, atol=1e-5, rtol=1e-4)


def test_cprune_keeps_the_most_used_member_or_the_medoid():
    from moeviz.methods.cprune import _Layer

    dist = np.abs(np.subtract.outer(np.arange(4.0), np.arange(4.0)))  # experts on a line
    dist[3, :3] = dist[:3, 3] = 50.0  # expert 3 far from the rest
    for representative, kept in (("frequency", 0), ("medoid", 1)):
        layer = _Layer(dist, np.array([0.5, 0.2, 0.1, 0.2]), "average", representative)
        layer.merge_closest()
        layer.merge_closest()  # {0, 1, 2} is one cluster now
        assert layer.merged_into == {e: kept for e in (0, 1, 2) if e != kept}
        assert sorted(np.flatnonzero(layer.alive)) == sorted([kept, 3])


def test_cprune_merge_mode_folds_into_the_survivor():
    model = tiny_model("olmoe")
    stats = _stats(model)
    plan = make_plan(stats, PlanConfig("cprune", ratio=0.25, mode="merge"))
    merged = apply_plan(tiny_model("olmoe"), plan, stats)
    assert get_adapter(merged).num_experts == [6, 6]
    assert torch.isfinite(_logits(merged)).all()


def test_bad_plans_are_refused():
    model = tiny_model("mixtral")
    layers = get_adapter(model).layer_indices
    with pytest.raises(PlanError, match="fewer than top-k"):
        apply_plan(model, _plan(model, {layers[0]: list(range(7))}))
    with pytest.raises(PlanError, match="out of range"):
        apply_plan(model, _plan(model, {layers[0]: [8]}))
    with pytest.raises(PlanError, match="not a MoE layer"):
        apply_plan(model, _plan(model, {9: [0]}))
    other = _plan(model, {layers[0]: [0]})
    other.model["model_fingerprint"] = "not-this-model"
    with pytest.raises(PlanError, match="another model"):
        apply_plan(model, other)
    stats = _stats(model)
    with pytest.raises(PlanError, match="would leave 1 expert in layer 0, fewer than top-k"):
        make_plan(stats, PlanConfig("frequency", ratio=0.9))
    with pytest.raises(KeyError, match="methods: cprune"):
        make_plan(stats, PlanConfig("magic"))
    with pytest.raises(PlanError, match="needs its ExpertStats"):
        apply_plan(model, _plan(model, {layers[0]: [0]}, mode="novice"))


def test_plan_json_round_trip(tmp_path):
    model = tiny_model("mixtral")
    stats = _stats(model)
    for name in method_names():
        plan = make_plan(stats, PlanConfig(name, ratio=0.25))
        again = PruningPlan.load(plan.save(tmp_path / f"{name}.json"))
        assert again == plan


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model, tokenizer = load_model("demo", device="cpu")
    config = CalibConfig(data="demo", num_samples=32, seq_len=128, cache_dir=tmp_path_factory.mktemp("cache"))
    return model, tokenizer, calibrate(model, config, tokenizer)[0]


DEMO_TOKENS = torch.randint(4, 54, (2, 24), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("name", method_names())
def test_every_method_at_25_percent_on_the_demo_model_gives_a_valid_plan(demo, name):
    from moeviz.analysis import weight_features

    model, _, stats = demo
    adapter = get_adapter(model)
    plans = [make_plan(stats, PlanConfig(name, ratio=0.25))]
    if name == "cprune":  # also on the (permutation-invariant) weights
        weights = torch.stack([weight_features(layer) for layer in adapter.layers])
        plans.append(make_plan(stats, PlanConfig(name, ratio=0.25, features="weights"), weights=weights))
    for plan in plans:
        plan.validate(model_info(model, fingerprint=model_fingerprint(model)))
        if name == "moe_pruner":  # no expert goes; a quarter of every expert row's weights
            assert not plan.pruned and plan.sparsity == 0.25
        else:  # 4 of 16 experts in each of the 4 layers, none twice
            assert sorted(plan.pruned) == adapter.layer_indices
            assert all(len(set(e)) == len(e) == 4 for e in plan.pruned.values())
        with applied(model, plan, stats):  # in place: the fixture's model is put back
            logits = _logits(model, DEMO_TOKENS)
        assert torch.isfinite(logits).all()
        assert not torch.equal(logits, _logits(model, DEMO_TOKENS))


def test_cprune_keeps_group_limited_routing_valid():
    model = tiny_model("deepseek_v3")  # two routing groups of 4 experts
    stats = _stats(model)
    for seed in range(3):
        stats = calibrate(model, CalibConfig(data="random", num_samples=8, seq_len=32, probe_tokens=64, seed=seed),
                          use_cache=False)[0]
        plan = make_plan(stats, PlanConfig("cprune", ratio=0.25, mode="merge"))
        for layer_idx, experts in plan.pruned.items():
            assert [e // 4 for e in experts] == [0, 1]  # one from each group
            assert all(src // 4 == dst // 4 for src, dst in plan.merge_into[layer_idx].items())
    with pytest.raises(PlanError, match="Global scope is not available"):
        make_plan(stats, PlanConfig("cprune", ratio=0.25, scope="global"))


def test_global_scope_can_keep_equal_counts_or_multiples_of_n(tmp_path):
    """For a standard export (equal counts) or expert parallelism (multiples of N kept)."""
    scores = np.random.default_rng(3).random((4, 16)) * np.arange(1, 5)[:, None]  # later layers score higher
    info = dict(layer_indices=[0, 1, 2, 3], num_experts=[16] * 4, top_k=2, group_count=1)
    free = select(scores, 0.375, "global", info)
    assert len({len(v) for v in free.values()}) > 1  # the threshold takes more from the first layers
    equal = select(scores, 0.375, "global", info, counts="equal")
    assert [len(v) for v in equal.values()] == [6] * 4
    for row, experts in enumerate(equal.values()):
        assert set(experts) == set(np.argsort(scores[row], kind="stable")[:6].tolist())
    fours = select(scores, 0.375, "global", info, counts="4")
    assert all((16 - len(v)) % 4 == 0 and 16 - len(v) >= 4 for v in fours.values())
    assert abs(sum(map(len, fours.values())) - sum(map(len, free.values()))) <= 2 * len(info["layer_indices"])
    for row, experts in enumerate(fours.values()):  # each layer drops its lowest scores
        assert set(experts) == set(np.argsort(scores[row], kind="stable")[:len(experts)].tolist())
    with pytest.raises(PlanError, match="counts must be"):
        select(scores, 0.375, "global", info, counts="many")
