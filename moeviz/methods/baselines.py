"""Baselines: rank experts by one usage statistic and prune the lowest.

random (seeded); frequency (count); gate_frequency (router-weighted, Σg); soft_usage (SEER's
Σp over all tokens); EAN (mean ‖f_e‖ over routed tokens); REAP (mean g_e·‖f_e‖, ICLR 2026).
"""

import numpy as np

from . import register


@register("random")
def random_scores(stats, config):
    """Random ranking (seeded)."""
    return np.random.default_rng(config.seed).random((stats.num_layers, stats.num_experts))


@register("frequency")
def frequency(stats, config):
    """Share of tokens routed to each expert."""
    return stats.frequency.numpy()


@register("gate_frequency")
def gate_frequency(stats, config):
    """Router-weighted frequency: Σ g_e(x) / tokens."""
    return stats.gate_frequency.numpy()


@register("soft_usage")
def soft_usage(stats, config):
    """Mean router probability over all tokens (SEER)."""
    return stats.soft_usage.numpy()


@register("ean")
def ean(stats, config):
    """EAN: mean output norm over routed tokens."""
    return stats.ean.numpy()


@register("reap")
def reap(stats, config):
    """REAP: mean g_e(x)·‖f_e(x)‖ over routed tokens."""
    return stats.reap.numpy()
