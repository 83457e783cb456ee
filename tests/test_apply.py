"""Plans applied in place and reversibly (`applied`): the same outputs as the pruned model, and
the model put back bit for bit, also when the body raises."""

import pytest
import torch

from moeviz.adapters import get_adapter
from moeviz.apply import applied, apply_plan, model_info
from moeviz.calibrate import CalibConfig, calibrate
from moeviz.methods import PlanConfig, make_plan
from moeviz.plan import PlanError, PruningPlan
from moeviz.tiny import tiny_model

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "deepseek_v3", "gpt_oss"]
MODES = ["remove", "novice", "drop", "sparsity", "merge", "uneven"]


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _plan(model, stats, mode):
    layers = get_adapter(model).layer_indices
    info = model_info(model)
    if mode == "sparsity":
        return make_plan(stats, PlanConfig("moe_pruner", ratio=0.5))
    if mode == "merge":
        return make_plan(stats, PlanConfig("cprune", ratio=0.25, mode="merge"))
    if mode == "uneven":  # one layer loses two experts, the others none
        return PruningPlan("manual", 0.1, mode="remove", model=info, pruned={layers[-1]: [1, 6]})
    return PruningPlan("manual", 0.25, mode=mode, model=info, pruned={i: [2, 5] for i in layers})


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    stats = calibrate(model, CalibConfig(data="random", num_samples=8, seq_len=32, probe_tokens=64), use_cache=False)[0]
    return request.param, model, stats


@pytest.mark.parametrize("mode", MODES)
def test_applied_equals_the_pruned_model_and_restores_exactly(family, mode):
    name, model, stats = family
    plan = _plan(model, stats, mode)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = _logits(model)
    with applied(model, plan, stats) as handle:
        under_plan = _logits(model)
        with handle.original():
            assert torch.equal(_logits(model), original)  # lent back exactly
        assert torch.equal(_logits(model), under_plan)  # and the plan again
    reference = _logits(apply_plan(tiny_model(name), plan, stats))  # a fresh model, pruned for good
    torch.testing.assert_close(under_plan, reference, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(under_plan, original, atol=1e-4)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(_logits(model), original)
    assert not any(m._forward_hooks for m in model.modules())  # router masks removed


def test_the_model_is_restored_when_the_body_raises(family):
    name, model, stats = family
    original = _logits(model)
    for mode in ("sparsity", "novice", "merge"):
        with pytest.raises(RuntimeError, match="boom"):
            with applied(model, _plan(model, stats, mode), stats):
                raise RuntimeError("boom")
        assert torch.equal(_logits(model), original)


def test_a_plan_for_another_model_is_refused_before_any_change():
    model, other = tiny_model("mixtral"), tiny_model("mixtral", seed=1)
    stats = calibrate(other, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0), use_cache=False)[0]
    plan = make_plan(stats, PlanConfig("frequency", ratio=0.25))
    original = _logits(model)
    with pytest.raises(PlanError, match="another model"):
        with applied(model, plan, stats):
            pass
    assert torch.equal(_logits(model), original)


def test_sparsity_keeps_only_a_bitmask_and_the_zeroed_values():
    from moeviz.apply import AppliedPlan

    model = tiny_model("qwen3_moe", hidden_size=64, moe_intermediate_size=64)
    stats = calibrate(model, CalibConfig(data="random", num_samples=4, seq_len=16, probe_tokens=0), use_cache=False)[0]
    handle = AppliedPlan(model, make_plan(stats, PlanConfig("moe_pruner", ratio=0.25)), stats)
    routed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    kept = sum(e.bits.numel() + e.values.numel() * e.values.element_size() for e in handle.edits)
    assert kept <= routed * (0.25 + 1 / 32 + 0.01)  # zeroed values + one bit per weight
    handle.close()


def test_hash_routing_tables_renumbered_to_surviving_experts():
    """DeepSeek-V4's hash routing sends each token id to k fixed experts (`tid2eid`): removal keeps
    every kept expert's tokens on it (renumbered) and sends a removed expert's tokens to the kept
    expert with the closest router row that the token does not use already (or its merge survivor)."""
    from moeviz.surgery import renumber_ids

    router = torch.eye(6)
    router[5] = torch.tensor([0.1, 0.0, 0.0, 0.9, 0.5, 0.0])  # closest to expert 3, then 4
    table = torch.tensor([[0, 5], [3, 5], [1, 2], [3, 4]])
    keep = [0, 1, 3, 4]  # 2 and 5 removed
    out = renumber_ids(table, keep, router)
    assert out[0].tolist() == [0, 2]  # 5 → 3 (new id 2)
    assert out[1].tolist() == [2, 3]  # 5 → 4: 3 is in the row already
    assert out[3].tolist() == [2, 3]
    assert all(len(set(row.tolist())) == 2 for row in out) and int(out.max()) < len(keep)
    merged = renumber_ids(table, keep, router, merge_into={5: 1, 2: 1})
    assert merged[0].tolist() == [0, 1] and merged[1].tolist() == [2, 1]
