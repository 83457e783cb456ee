"""Calibration adds a fixed number of operators per MoE layer, whatever the number of experts,
and no host synchronisation beyond the plain forward's (bench/opcount.py, torch.profiler on
the CPU: what a GPU would run as kernels and wait for)."""

import sys
from pathlib import Path

import pytest
import torch

from moeviz.tiny import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from opcount import per_layer  # noqa: E402


@pytest.mark.parametrize("family, experts_key", [("olmoe", "num_experts"), ("deepseek_v3", "n_routed_experts")])
def test_calibration_adds_operators_independent_of_experts_and_no_host_sync(family, experts_key):
    results = {}
    for E in (4, 16):
        model = tiny_model(family, **{experts_key: E})
        tokens = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        results[E] = per_layer(model, tokens)
    for r in results.values():
        assert r["calibrate"]["syncs"] <= r["plain"]["syncs"], r["calibrate"]["sync_ops"]
        # the observer's sums, and p(x) under three candidate scorings (softmax, sigmoid, identity) until the
        # end shows which the gates are made of: a constant count, not a loop over experts
        assert 0 < r["extra_ops"] < 250
        assert r["plain"]["grouped_mm"] > 0  # like with like: transformers' grouped experts, not its eager loop
    assert results[4]["extra_ops"] == results[16]["extra_ops"]
    assert results[4]["calibrate"]["ops"] == results[16]["calibrate"]["ops"]
