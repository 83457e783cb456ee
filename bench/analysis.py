"""Analysis speed at a large real model's scale: synthetic stats of 48 layers × 128 experts,
hidden 2048 (Qwen3-30B-A3B's shape).

    python bench/analysis.py [--no-umap]

Targets on a 2-core CPU: every per-layer similarity and clustering of all layers under 5 s
together; the UMAP of 6,144 experts under 30 s (then cached); any single figure under 200 ms.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch

from moeviz import analysis, analysis_plots, plots
from moeviz.adapters import get_adapter
from moeviz.stats import ExpertStats
from moeviz.tiny import tiny_model

L, E, H, I, K = 48, 128, 2048, 768, 8


def synthetic_stats(seed: int = 0) -> ExpertStats:
    """Random but well-formed stats: expert outputs share a per-layer direction, as real ones do."""
    gen = torch.Generator().manual_seed(seed)
    count = torch.rand(L, E, generator=gen, dtype=torch.float64) * 1000
    base = torch.randn(L, 1, H, generator=gen, dtype=torch.float64)
    probe = base + torch.randn(L, E, H, generator=gen, dtype=torch.float64)
    unit = torch.nn.functional.normalize(probe, dim=-1)
    tensors = dict(
        count=count, gate_sum=count * 0.3, prob_sum=count * 0.2, ean_sum=count, reap_sum=count * 0.3,
        out_mean=probe, out_var=torch.rand(L, E, H, generator=gen, dtype=torch.float64),
        in_sqnorm=torch.rand(L, E, H, generator=gen, dtype=torch.float64),
        mid_sqnorm=torch.rand(L, E, I, generator=gen, dtype=torch.float64),
        coactivation=torch.rand(L, E, E, generator=gen, dtype=torch.float64) * 100,
        tokens=torch.full((L,), count.sum(1).max().item() / K, dtype=torch.float64),
        probe_out_sum=probe * 256, probe_sim_sum=(unit @ unit.transpose(1, 2)) * 256,
        probe_tokens=torch.full((L,), 256.0, dtype=torch.float64),
    )
    meta = dict(layer_indices=list(range(L)), num_experts=[E] * L, top_k=K, tokens=int(tensors["tokens"][0]))
    return ExpertStats(tensors, meta)


def timed(label: str, fn, target: float | None = None):
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    verdict = "" if target is None else (" ok" if seconds <= target else f" over the {target:g} s target")
    print(f"| {label} | {seconds * 1000:.0f} ms |{verdict} |")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-umap", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    stats = synthetic_stats()
    print(f"{L} layers × {E} experts, hidden {H}\n\n| step | time | |\n|---|---|---|")

    def per_layer():
        sim = analysis.similarity(stats, "outputs")
        co = analysis.similarity(stats, "coactivation")
        clusters = [analysis.cluster_layer(s, n_clusters=E // 4) for s in sim]
        return sim, co, clusters

    start = time.perf_counter()
    sim, co, clusters = timed("similarity (outputs, coactivation) + clustering, all layers", per_layer, 5.0)
    h = timed("homogeneity + layer × layer similarity", lambda: (analysis.homogeneity(stats, sim),
                                                              analysis.layer_similarity(stats)))
    timed("silhouette for 8 cuts of one layer", lambda: analysis.silhouette_by_count(sim[0], range(8, 72, 8)))
    feats = stats.probe_mean.numpy()
    timed("global clustering of 6,144 experts", lambda: analysis.cluster_all_layers(feats, n_clusters=512))
    xy = timed("PCA map of 6,144 experts", lambda: analysis.embed_experts(feats, "pca"))
    if not args.no_umap:
        warm = np.random.default_rng(1).standard_normal((40, 128, 64)).astype(np.float32)
        timed("UMAP's first use in a process (import, numba compiles; 5,120 random points)",
              lambda: analysis.embed_experts(warm, "umap"))
        xy = timed("UMAP map of 6,144 experts", lambda: analysis.embed_experts(feats, "umap"), 30.0)
    print(f"| analysis total | {(time.perf_counter() - start):.1f} s | |")

    # The weight spaces read every expert's weights: one full-size layer (604 M parameters).
    layer = get_adapter(tiny_model("qwen3_moe", num_hidden_layers=1, hidden_size=H, moe_intermediate_size=I,
                                   num_experts=E, num_experts_per_tok=K, vocab_size=256)).layers
    for space in ("router", "weights", "weights_invariant"):
        timed(f"{space} similarity of one layer (× {L} for the model)",
              lambda: analysis.similarity(None, space, SimpleNamespace(layers=layer)))

    print("\n| figure | build + serialise | |\n|---|---|---|")
    labels, link = clusters[0]
    figures = {
        "layer × expert heatmap (48 × 128)": lambda: plots.layer_expert_heatmap(
            stats.view("frequency"), stats.layer_indices, "frequency", "frequency"),
        "similarity matrix (128 × 128)": lambda: analysis_plots.similarity_heatmap(
            sim[0], labels, "layer 0", "outputs"),
        "dendrogram (128 leaves)": lambda: analysis_plots.dendrogram(link),
        "expert map (6,144 points)": lambda: analysis_plots.embedding_scatter(xy, stats.layer_indices),
        "homogeneity curves": lambda: analysis_plots.depth_curves(stats.layer_indices, h[0]),
        "plan heatmap": lambda: plots.plan_heatmap({i: list(range(32)) for i in range(L)}, stats.layer_indices, E),
    }
    for name, build in figures.items():
        timed(name, lambda: build().to_json(), 0.2)  # to_json: what Streamlit sends


if __name__ == "__main__":
    main()
