"""MoNE — Mixture of Novices and Experts (arXiv 2507.00390).

Redundancy of expert e: low router-weighted usage and a stable output. As the authors' code
ranks them: score_e = RS_e · ‖σ_e‖₂, with RS_e = Σ g_e(x) / tokens and σ_e the per-dimension
standard deviation of f_e over its routed tokens. The lowest are pruned and, by default,
replaced by novices: the constant μ_e = mean f_e (mode `novice`; `drop` uses zeros).
"""

from . import register


@register("mone", default_mode="novice")
def mone(stats, config):
    """MoNE: router-weighted frequency × ‖output std‖ (novices by default)."""
    return (stats.gate_frequency * stats.output_std.norm(dim=-1)).numpy()
