"""Analyses of expert weights and calibration statistics. Reads; never runs the model.

Similarity spaces (each an E × E matrix per layer, symmetric, ones on the diagonal):
- `weights`: cosine of the experts' flattened gate/up/down weights. Sensitive to the order of
  intermediate neurons, which is arbitrary: two equal experts with permuted neurons look unlike.
- `weights_invariant`: cosine of the products down·gate + down·up through a fixed random projection
  (`weight_features`), unchanged by any permutation of intermediate
  neurons. The default weight space for clustering; why: see the line above.
- `outputs`: the probes' mean cosine of two experts' outputs on the same tokens.
- `router`: cosine of the experts' router rows.
- `coactivation`: tokens that select both, over √(count_e · count_e').
"""

from __future__ import annotations

import numpy as np
import torch

from .adapters import Adapter
from .stats import ExpertStats, cosine_matrix, gram_to_cosine

SPACES = ("weights", "weights_invariant", "outputs", "router", "coactivation")


def router_norms(adapter: Adapter, checkpoint=None) -> np.ndarray:
    """‖w_e‖₂ of every expert's router row: (L, E), from the weights alone: the model's, or
    for a skeleton on the meta device, the `checkpoint`'s files (one router at a time)."""
    rows = []
    for layer in adapter.layers:
        weight = layer.router_weight
        if weight.is_meta:
            if checkpoint is None:
                raise ValueError("This model has no weights in memory: pass its checkpoint to read the routers.")
            weight = checkpoint.router_weight(layer.layer_idx, layer.num_experts)
        rows.append(weight[:layer.num_experts].detach().float().norm(dim=-1).cpu().numpy())  # routed experts' rows
    return np.stack(rows)


# ---- similarity -------------------------------------------------------------------------
@torch.no_grad()
def expert_features(adapter: Adapter, space: str) -> list[np.ndarray]:
    """Per layer, one feature row per expert (E, D), for the router and invariant weight spaces."""
    if space == "router":
        return [layer.router_weight[:layer.num_experts].detach().float().cpu().numpy() for layer in adapter.layers]
    if space == "weights_invariant":
        return [weight_features(layer).numpy() for layer in adapter.layers]
    raise ValueError(f"{space!r} has no feature rows; spaces: {', '.join(SPACES)}")


@torch.no_grad()
def weight_features(layer, rank: int = 64, seed: int = 0) -> torch.Tensor:
    """Permutation-invariant features of a layer's experts: down·(up ⊙ …)·R, (E, H·rank).

    Intermediate neurons can be permuted freely without changing an expert, so flattened
    weights of two equal experts may look unrelated; down @ diag(1) @ up (H × H) does not
    change under such permutations. A fixed random projection R (H, rank) keeps it small.
    """
    gen = torch.Generator().manual_seed(seed)
    R = torch.randn(layer.hidden_size, rank, generator=gen) / rank ** 0.5
    feats = []
    for e in range(layer.num_experts):
        w = layer.expert_weights(e)
        up = w.up.float().cpu() if w.gate is None else torch.cat([w.gate, w.up], 0).float().cpu()
        down = w.down.float().cpu() if w.gate is None else torch.cat([w.down, w.down], 1).float().cpu()
        feats.append((down @ (up @ R)).reshape(-1))
    return torch.stack(feats)


@torch.no_grad()
def weight_gram(layer, block: int = 2**20) -> np.ndarray:
    """Σ over an expert's weight matrices of ⟨W_e, W_e'⟩ for every pair: (E, E), float64.

    The cosine of the experts' flattened weights follows from it, without a flattened copy
    of the layer: fused weights are read as (E, n) views, `block` columns at a time.
    """
    E = layer.num_experts
    if layer.fused:
        exp = layer.experts
        stacks = [(exp.gate_up_proj if exp.has_gate else exp.up_proj).reshape(E, -1), exp.down_proj.reshape(E, -1)]
    else:
        weights = [layer.expert_weights(e) for e in range(E)]
        stacks = [torch.stack([getattr(w, name).reshape(-1) for w in weights])
                  for name in ("gate", "up", "down") if getattr(weights[0], name) is not None]
    gram = torch.zeros(E, E, dtype=torch.float64)
    for stack in stacks:
        for part in stack.split(block, dim=1):
            part = part.float()
            gram += (part @ part.T).double().cpu()
    return gram.numpy()


def similarity(stats: ExpertStats | None, space: str, adapter: Adapter | None = None) -> np.ndarray:
    """Expert × expert similarity of every MoE layer in one space: (L, E, E)."""
    if space == "outputs":
        if stats is None or not stats.has_probes:
            raise ValueError("The 'outputs' space needs stats calibrated with probes.")
        sim = stats.probe_similarity.numpy().copy()
        idx = np.arange(sim.shape[1])
        sim[:, idx, idx] = 1.0
        return (sim + sim.transpose(0, 2, 1)) / 2
    if space == "coactivation":
        co = stats["coactivation"].numpy()
        count = np.maximum(stats["count"].numpy(), 1)
        sim = co / np.sqrt(count[:, :, None] * count[:, None, :])
        idx = np.arange(sim.shape[1])
        sim[:, idx, idx] = 1.0
        return sim
    if adapter is None:
        raise ValueError(f"The {space!r} space needs the model's weights (an adapter).")
    if space == "weights":
        return np.stack([gram_to_cosine(weight_gram(layer)) for layer in adapter.layers])
    return np.stack([cosine_matrix(f) for f in expert_features(adapter, space)])



# ---- clustering -------------------------------------------------------------------------
def cluster_layer(sim: np.ndarray, n_clusters: int | None = None, threshold: float | None = None,
                  method: str = "average") -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical clustering of one layer from its similarity (E, E).

    Returns (labels (E,) from 1, the SciPy linkage (E-1, 4)). Cut by `n_clusters`, or by a
    distance `threshold` on 1 − similarity. Ward linkage treats √(2(1 − cos)) as a Euclidean
    distance between unit vectors, which it is.
    """
    from scipy.cluster.hierarchy import fcluster, linkage  # scipy loads when clustering, not at import
    from scipy.spatial.distance import squareform

    dist = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    if method == "ward":
        dist = np.sqrt(2.0 * dist)
    link = linkage(squareform(dist, checks=False), method=method)
    if n_clusters is not None:
        labels = fcluster(link, t=n_clusters, criterion="maxclust")
    else:
        labels = fcluster(link, t=threshold if threshold is not None else 0.5, criterion="distance")
    return labels, link


def silhouette_by_count(sim: np.ndarray, counts, method: str = "average") -> dict[int, float]:
    """Mean silhouette of each cut of one layer: a higher value suggests that cluster count."""
    from sklearn.metrics import silhouette_score

    dist = np.clip(1.0 - sim, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    scores = {}
    for k in counts:
        labels, _ = cluster_layer(sim, n_clusters=k, method=method)
        if 1 < len(set(labels)) < len(labels):
            scores[k] = float(silhouette_score(dist, labels, metric="precomputed"))
    return scores


def cluster_all_layers(features: np.ndarray, n_clusters: int, method: str = "ward") -> np.ndarray:
    """One clustering of every expert of every layer (C-Prune's global stage): labels (L, E)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    L, E = features.shape[:2]
    flat = np.asarray(features, dtype=np.float64).reshape(L * E, -1)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    # Euclidean distances between unit vectors through one matrix product (BLAS), not pdist
    dist = np.sqrt(np.clip(2.0 - 2.0 * (flat @ flat.T), 0.0, None))
    np.fill_diagonal(dist, 0.0)
    labels = fcluster(linkage(squareform(dist, checks=False), method=method), t=n_clusters, criterion="maxclust")
    return labels.reshape(L, E)


# ---- embeddings -------------------------------------------------------------------------
def embed_experts(features: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """A 2-D map of every expert of every layer: features (L, E, D) → (L, E, 2).

    `umap` (umap-learn, imported lazily; its first use in a process compiles for ~10–30 s)
    or `pca`, the fast fallback. Rows are L2-normalised first, so cosine geometry is what is
    kept; for UMAP they are then reduced to 50 principal components (Euclidean distances
    between unit vectors order pairs as cosine distances do), as UMAP's authors advise for
    wide features, and laid out in 200 epochs.
    """
    L, E = features.shape[:2]
    flat = np.asarray(features, dtype=np.float32).reshape(L * E, -1)
    flat = flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(flat)
    elif method == "umap":
        import umap

        from sklearn.decomposition import PCA

        if min(flat.shape) > 50:
            flat = PCA(n_components=50, random_state=seed).fit_transform(flat)
        n_neighbors = int(min(15, max(2, L * E - 1)))
        xy = umap.UMAP(n_components=2, n_neighbors=n_neighbors, n_epochs=200, random_state=seed,
                       n_jobs=1).fit_transform(flat)
    else:
        raise ValueError(f"Unknown embedding {method!r}; use 'umap' or 'pca'.")
    return np.asarray(xy).reshape(L, E, 2)


# ---- homogeneity ------------------------------------------------------------------------
def homogeneity(stats: ExpertStats, sim: np.ndarray) -> dict[str, np.ndarray]:
    """Per MoE layer: mean pairwise expert similarity, usage entropy (bits, of the frequency
    distribution, max log2 E) and the smallest fraction of experts carrying half the routed mass."""
    L, E = sim.shape[:2]
    off = ~np.eye(E, dtype=bool)
    freq = stats.frequency.numpy()
    p = freq / np.maximum(freq.sum(1, keepdims=True), 1e-12)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(1)
    sorted_p = -np.sort(-p, axis=1)
    half = (np.cumsum(sorted_p, axis=1) < 0.5).sum(1) + 1
    return dict(mean_similarity=np.array([s[off].mean() for s in sim]),
                usage_entropy=entropy, half_mass_fraction=half / E)


def layer_similarity(stats: ExpertStats) -> np.ndarray:
    """Layer × layer cosine similarity of the layers' mean expert outputs: (L, L).

    Expert e of one layer has nothing to do with expert e of another, so each layer is
    summarised by the frequency-weighted mean of its experts' mean outputs (H,)."""
    freq = stats.frequency.numpy()[:, :, None]
    mean_out = (stats["out_mean"].numpy() * freq).sum(1) / np.maximum(freq.sum(1), 1e-12)
    return cosine_matrix(mean_out)


# ---- specialisation ---------------------------------------------------------------------
def specialisation(stats_by_source: dict[str, ExpertStats]) -> tuple[list[str], np.ndarray]:
    """Each expert's share of routed tokens per source, normalised over sources: (S, L, E).

    With one stats per source (each demo domain, or C4 against code), entry [s, l, e] is the
    fraction of expert e's usage (frequency, so sources of different sizes compare) due to s.
    """
    names = list(stats_by_source)
    freq = np.stack([stats_by_source[n].frequency.numpy() for n in names])  # (S, L, E)
    return names, freq / np.maximum(freq.sum(0, keepdims=True), 1e-12)


def specialisation_index(shares: np.ndarray) -> np.ndarray:
    """Per layer, how much its experts specialise by source, from `specialisation`'s (S, L, E):
    the mean over experts of (max share − 1/S) / (1 − 1/S). 0: every expert serves every
    source alike; 1: every expert serves one source only."""
    S = shares.shape[0]
    if S < 2:
        raise ValueError("Specialisation needs stats of two or more sources.")
    return ((shares.max(0) - 1 / S) / (1 - 1 / S)).mean(1)


# ---- stability --------------------------------------------------------------------------
def pruned_overlap(a: dict[int, list[int]], b: dict[int, list[int]]) -> float:
    """|A ∩ B| / |A| over all layers (1 when both prune the same experts)."""
    pairs_a = {(layer, e) for layer, es in a.items() for e in es}
    pairs_b = {(layer, e) for layer, es in b.items() for e in es}
    return len(pairs_a & pairs_b) / max(len(pairs_a), 1)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over layers of Spearman's ρ between two (L, E) score arrays."""
    from scipy.stats import spearmanr

    rhos = []
    for x, y in zip(np.asarray(a), np.asarray(b)):
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            rhos.append(1.0 if np.array_equal(x, y) else 0.0)
        else:
            rhos.append(float(spearmanr(x, y).statistic))
    return float(np.mean(rhos))


def stability(chunks: list[ExpertStats], plan_config, sizes=None, bootstrap: int = 0,
              seed: int = 0) -> list[dict]:
    """How the decision of a method settles with calibration size.

    `chunks` are stats of disjoint calibration chunks (same model). For each size n, the
    first n chunks are merged, planned and compared with the plan from all chunks: overlap
    of the pruned sets and rank correlation of the scores; with `bootstrap` > 0, as many
    resamples of n chunks with replacement are averaged too.
    """
    from .methods import make_plan, method_scores

    full = _merge(chunks)
    full_plan, full_scores = make_plan(full, plan_config), _scores(full, plan_config, method_scores)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes or range(1, len(chunks) + 1):
        draws = [list(range(n))] + [list(rng.integers(0, len(chunks), n)) for _ in range(bootstrap)]
        overlaps, rhos = [], []
        for draw in draws:
            part = _merge([chunks[i] for i in draw])
            overlaps.append(pruned_overlap(make_plan(part, plan_config).pruned, full_plan.pruned))
            scores = _scores(part, plan_config, method_scores)
            rhos.append(rank_correlation(scores, full_scores) if scores is not None else np.nan)
        rows.append(dict(chunks=n, tokens=int(_merge([chunks[i] for i in draws[0]]).meta["tokens"]),
                         overlap=overlaps[0], rank_correlation=rhos[0],
                         overlap_bootstrap=float(np.mean(overlaps[1:])) if bootstrap else None,
                         rank_correlation_bootstrap=float(np.nanmean(rhos[1:])) if bootstrap else None))
    return rows


def source_agreement(stats_by_source: dict[str, ExpertStats], plan_config) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Do calibrations on different text agree on what to prune? For every pair of sources:
    the overlap of their plans' pruned sets and the rank correlation of their scores, (S, S)
    each (NaN correlations for methods without one score)."""
    from .methods import make_plan, method_scores

    names = list(stats_by_source)
    plans = [make_plan(stats_by_source[n], plan_config).pruned for n in names]
    scores = [_scores(stats_by_source[n], plan_config, method_scores) for n in names]
    S = len(names)
    overlap, rho = np.ones((S, S)), np.ones((S, S))
    for i in range(S):
        for j in range(S):
            if i != j:
                overlap[i, j] = pruned_overlap(plans[i], plans[j])
                rho[i, j] = rank_correlation(scores[i], scores[j]) if scores[i] is not None else np.nan
    return names, overlap, rho


def _scores(stats, plan_config, method_scores):
    from .plan import PlanError

    try:
        return method_scores(stats, plan_config)
    except PlanError:
        return None  # methods that do not rank (cprune, moe_pruner)


def _merge(chunks: list[ExpertStats]) -> ExpertStats:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total.merge(chunk)
    return total
