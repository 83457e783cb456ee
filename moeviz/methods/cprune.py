"""C-Prune — cluster-driven expert pruning (arXiv 2504.07807).

Stage 1 groups functionally similar experts inside each layer by hierarchical clustering;
stage 2 pools the layers, so that the more homogeneous layers (whose experts sit closer
together) give up more experts, and stops before any layer falls below top-k.

moeviz runs both stages as one agglomerative procedure on a shared distance scale: in every
layer, experts start as singleton clusters; the closest pair of clusters is merged (average linkage
on cosine distances by default; `linkage="ward"`, the authors' choice, treats the cosine
distance as half the squared distance between unit vectors), and the merged cluster keeps one
representative, its most used member (or, with `representative="medoid"`, the member nearest
the others: the paper's "nearest the centroid"); the others are pruned and, in `merge` mode,
folded into the representative. With `scope="layer"` each layer merges until `ratio` of it is pruned;
with `scope="global"` the next merge is always the globally closest pair across all layers,
which is C-Prune's global cluster pruning. Feature spaces: `outputs` (the probes' mean cosine
similarity of expert outputs on the same tokens, as the authors' code) or `weights`
(permutation-invariant: the experts' down·up products through a fixed random projection).
"""

import numpy as np
import torch

from ..plan import PlanError, PruningPlan
from ..stats import cosine_matrix
from . import register


@register("cprune", makes_plan=True)
def cprune(stats, config, info, weights=None):
    """C-Prune: merge the closest experts per layer (or globally), keep one per cluster."""
    distances = expert_distances(stats, config.features, weights)  # (L, E, E)
    frequency = stats.frequency.numpy()
    floor = max(info["top_k"], info.get("group_count") or 1)
    if config.linkage not in LINKAGES:
        raise PlanError(f"Unknown linkage {config.linkage!r}; use one of {', '.join(LINKAGES)}.")
    if config.representative not in REPRESENTATIVES:
        raise PlanError(f"Unknown representative {config.representative!r}; use one of {', '.join(REPRESENTATIVES)}.")
    groups = info.get("group_count") or 1
    E = stats.num_experts
    if groups > 1:  # group-limited routing (DeepSeek): clusters stay inside a group, every group loses as many
        return _grouped(stats, config, info, distances, frequency, groups, floor)
    layers = [_Layer(d, f, config.linkage, config.representative) for d, f in zip(distances, frequency)]
    if config.scope == "layer":
        n = int(round(config.ratio * E))
        if E - n < floor:
            raise PlanError(f"Ratio {config.ratio} would leave {E - n} experts per layer, fewer than top-k.")
        for layer in layers:
            for _ in range(n):
                layer.merge_closest()
    else:
        for _ in range(int(round(config.ratio * E * len(layers)))):
            open_layers = [lay for lay in layers if lay.num_kept > floor]
            if not open_layers:
                break
            min(open_layers, key=lambda lay: lay.closest()[0]).merge_closest()
    pruned = {i: sorted(lay.merged_into) for i, lay in zip(info["layer_indices"], layers)}
    merge_into = {i: dict(lay.merged_into) for i, lay in zip(info["layer_indices"], layers)}
    return PruningPlan("cprune", config.ratio, config.scope, "remove", info, pruned=pruned, merge_into=merge_into)


def _grouped(stats, config, info, distances, frequency, groups: int, floor: int) -> PruningPlan:
    """C-Prune within each routing group: each group's experts cluster among themselves and
    every group gives up the same number, as a group-limited router needs."""
    if config.scope != "layer":
        raise PlanError("Global scope is not available for group-limited routers: every group must "
                        "lose the same number of experts. Use scope='layer'.")
    E = stats.num_experts
    n = int(round(config.ratio * E))
    n -= n % groups
    if E - n < floor:
        raise PlanError(f"Ratio {config.ratio} would leave {E - n} experts per layer, fewer than top-k.")
    size = E // groups
    pruned, merge_into = {}, {}
    for layer_idx, dist, freq in zip(info["layer_indices"], distances, frequency):
        merge_into[layer_idx] = {}
        for g in range(groups):
            idx = np.arange(g * size, (g + 1) * size)
            part = _Layer(dist[np.ix_(idx, idx)], freq[idx], config.linkage, config.representative)
            for _ in range(n // groups):
                part.merge_closest()
            merge_into[layer_idx].update({int(idx[a]): int(idx[b]) for a, b in part.merged_into.items()})
        pruned[layer_idx] = sorted(merge_into[layer_idx])
    return PruningPlan("cprune", config.ratio, config.scope, "remove", info, pruned=pruned, merge_into=merge_into)


def expert_distances(stats, features: str, weights=None) -> np.ndarray:
    """Cosine distances between the experts of each layer: (L, E, E), zero diagonal."""
    if features == "outputs":
        if not stats.has_probes:
            raise PlanError("cprune with features='outputs' needs stats calibrated with probes.")
        sim = stats.probe_similarity.numpy()
    elif features == "weights":
        if weights is None:
            raise PlanError("cprune with features='weights' needs the model's expert weights.")
        sim = np.stack([cosine_matrix(f) for f in torch.as_tensor(weights).float().numpy()])
    else:
        raise PlanError(f"Unknown feature space {features!r}; use 'outputs' or 'weights'.")
    dist = np.clip(1.0 - sim, 0.0, 2.0)
    dist[:, np.arange(dist.shape[1]), np.arange(dist.shape[1])] = 0.0
    return dist


LINKAGES = ("average", "ward")
REPRESENTATIVES = ("frequency", "medoid")


class _Layer:
    """Agglomeration of one layer's experts, tracking who merged into whom.

    Every cluster is stored under its representative's index: its most used member
    (`representative="frequency"`), or the member nearest the others (`"medoid"`, the
    paper's "nearest the centroid").
    """

    def __init__(self, dist: np.ndarray, frequency: np.ndarray, linkage: str = "average",
                 representative: str = "frequency"):
        E = len(frequency)
        self.linkage, self.representative = linkage, representative
        self.heights: list[float] = []  # the distance of every merge, in order
        self.dist = dist.astype(float)  # expert × expert, for medoids
        self.D = dist.astype(float) + np.diag(np.full(E, np.inf))  # cluster × cluster distances
        self.size = np.ones(E)
        self.alive = np.ones(E, dtype=bool)  # index = the cluster's representative
        self.members = {e: [e] for e in range(E)}
        self.frequency = frequency
        self.merged_into: dict[int, int] = {}
        self._best = None

    @property
    def num_kept(self) -> int:
        return int(self.alive.sum())

    def closest(self) -> tuple[float, int, int]:
        if self._best is None:
            flat = int(np.argmin(self.D))
            a, b = divmod(flat, len(self.D))
            self._best = (float(self.D[a, b]), a, b)
        return self._best

    def merge_closest(self) -> None:
        height, a, b = self.closest()
        self.heights.append(height)
        n_a, n_b, n = self.size[a], self.size[b], self.size
        # Lance–Williams updates of the distances to the merged cluster
        if self.linkage == "ward":  # on squared distances
            merged = ((n_a + n) * self.D[a] + (n_b + n) * self.D[b] - n * height) / (n_a + n_b + n)
        else:
            merged = (n_a * self.D[a] + n_b * self.D[b]) / (n_a + n_b)
        members = self.members.pop(a) + self.members.pop(b)
        if self.representative == "medoid":
            rep = members[int(np.argmin(self.dist[np.ix_(members, members)].sum(1)))]
        else:
            rep = members[int(np.argmax(self.frequency[members]))]
        for old in (a, b):
            self.D[old, :] = np.inf
            self.D[:, old] = np.inf
            self.alive[old] = False
        self.D[rep, :] = merged
        self.D[:, rep] = merged
        self.D[rep, rep] = self.D[rep, a] = self.D[rep, b] = self.D[a, rep] = self.D[b, rep] = np.inf
        self.alive[rep], self.size[rep], self.members[rep] = True, n_a + n_b, members
        for m in members:
            self.merged_into.pop(m, None)
            if m != rep:
                self.merged_into[m] = rep
        self._best = None
