"""`PruningPlan`: which experts go, and how; made from cached stats, checked against a model.

A plan is JSON:
    {"method", "ratio", "scope", "mode", "model": {...}, "calibration", "pruned": {"<decoder
     layer>": [expert indices]}, "merge_into": {"<layer>": {"<pruned>": survivor}},
     "sparsity", "nm"}
`mode` is `remove` (experts and their router rows go), `novice` (MoNE: a pruned expert is
replaced by its mean output; the router still routes to it), `drop` (a novice of zeros) or
`merge` (folded into a named survivor). `sparsity`/`nm` prune weights inside kept experts.
`export_kind` says which of three kinds of checkpoint a plan exports as (standard, expert
substitution, moeviz-only): it follows from the plan alone (and the checkpoint's quantization).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MODES = ("remove", "novice", "drop", "merge")
PLAN_FILE = "moeviz_plan.json"  # beside a pruned export that reloads through moeviz
LINEAGE_FILE = "moeviz_lineage.json"  # beside every export and recovered checkpoint: its parent and plan
SCOPES = ("layer", "global")


def read_lineage(path) -> dict | None:
    """The lineage beside an export or a recovered checkpoint (None when there is none or it
    cannot be read: a cut copy)."""
    file = Path(path) / LINEAGE_FILE
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except ValueError:
        return None


class PlanError(ValueError):
    """A plan that cannot be applied to this model."""


@dataclass
class PruningPlan:
    method: str
    ratio: float
    scope: str = "layer"
    mode: str = "remove"
    model: dict = field(default_factory=dict)  # fingerprint, architecture, layer_indices, num_experts, top_k, group_count
    calibration: str | None = None  # the stats directory the plan was made from (or a mix's, comma-separated)
    pruned: dict[int, list[int]] = field(default_factory=dict)  # decoder layer → experts
    merge_into: dict[int, dict[int, int]] = field(default_factory=dict)  # layer → {pruned: survivor}
    sparsity: float = 0.0  # fraction of weights zeroed in every row of every kept expert
    nm: tuple[int, int] | None = None  # n:m semi-structured sparsity instead, e.g. (2, 4)
    mix: list[dict] | None = None  # a mix of calibrations: [{"path", "share", "calibration", "tokens"}, …]

    def __post_init__(self):
        self.pruned = {int(k): sorted(int(e) for e in v) for k, v in self.pruned.items()}
        self.merge_into = {int(k): {int(a): int(b) for a, b in v.items()} for k, v in self.merge_into.items()}
        if self.nm is not None:
            self.nm = tuple(self.nm)

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())

    def kept(self, layer_idx: int, num_experts: int) -> list[int]:
        gone = set(self.pruned.get(layer_idx, ()))
        return [e for e in range(num_experts) if e not in gone]

    def is_uniform(self) -> bool:
        """The same number of experts removed from every MoE layer (a plain checkpoint can hold it)."""
        counts = {len(self.pruned.get(i, ())) for i in self.model.get("layer_indices", self.pruned)}
        return len(counts) <= 1

    # ---- checks ------------------------------------------------------------------------
    def validate(self, model_info: dict | None = None) -> None:
        """Refuse what cannot be applied: bad mode, indices out of range, too few experts left,
        group counts broken, or a plan made for another model (`model_info` of the target)."""
        if self.mode not in MODES:
            raise PlanError(f"Unknown mode {self.mode!r}; modes: {', '.join(MODES)}")
        info = self.model
        if model_info is not None:
            for key in ("model_fingerprint", "layer_indices", "num_experts"):
                ours, theirs = info.get(key), model_info.get(key)
                if ours is not None and theirs is not None and ours != theirs:
                    raise PlanError(f"This plan was made for another model ({key} differs: plan "
                                    f"{ours!r}, model {theirs!r}).")
            info = model_info
        layers = list(info["layer_indices"])
        for layer_idx, experts in self.pruned.items():
            if layer_idx not in layers:
                raise PlanError(f"Layer {layer_idx} is not a MoE layer of this model (MoE layers: {layers}).")
            _check_layer(layer_idx, experts, info["num_experts"][layers.index(layer_idx)],
                         info["top_k"], info.get("group_count", 1))
        for layer_idx, pairs in self.merge_into.items():
            for src, dst in pairs.items():
                if src not in self.pruned.get(layer_idx, ()) or dst in self.pruned.get(layer_idx, ()):
                    raise PlanError(f"Layer {layer_idx}: can only merge a pruned expert into a kept one ({src}→{dst}).")
        if not 0.0 <= self.sparsity < 1.0:
            raise PlanError(f"Weight sparsity must be in [0, 1), got {self.sparsity}.")
        if self.nm is not None and not 0 < self.nm[0] < self.nm[1]:
            raise PlanError(f"n:m sparsity needs 0 < n < m, got {self.nm[0]}:{self.nm[1]}.")

    # ---- disk --------------------------------------------------------------------------
    def to_json(self) -> str:
        d = asdict(self)
        d["pruned"] = {str(k): v for k, v in self.pruned.items()}
        d["merge_into"] = {str(k): {str(a): b for a, b in v.items()} for k, v in self.merge_into.items()}
        return json.dumps(d, indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except FileNotFoundError:
            raise FileNotFoundError(f"No such plan file: {path}") from None
        except (json.JSONDecodeError, TypeError) as err:
            raise PlanError(f"{path} is not a moeviz plan: {err}") from err


def _check_layer(layer_idx: int, experts: list[int], num_experts: int, top_k: int, group_count: int) -> None:
    bad = [e for e in experts if not 0 <= e < num_experts]
    if bad:
        raise PlanError(f"Layer {layer_idx}: expert indices {bad} out of range 0..{num_experts - 1}.")
    if len(set(experts)) != len(experts):
        raise PlanError(f"Layer {layer_idx}: an expert is listed twice.")
    kept = num_experts - len(experts)
    if kept < top_k:
        raise PlanError(f"Layer {layer_idx}: {kept} experts would be left, fewer than top-k = {top_k}.")
    if group_count > 1:
        # Group-limited routers view the experts as `group_count` consecutive blocks: each block
        # must lose the same number, or experts would change groups after removal.
        per_group = np.bincount(np.asarray(experts, dtype=int) // (num_experts // group_count),
                                minlength=group_count)
        if len(set(per_group.tolist())) > 1:
            raise PlanError(f"Layer {layer_idx}: the router's {group_count} expert groups must each lose "
                            f"the same number of experts (they would lose {per_group.tolist()}).")


# ---- the export kind: which checkpoint a plan becomes ------------------------------------
@dataclass(frozen=True)
class ExportKind:
    name: str  # "standard", "expert substitution", "moeviz-only"
    reason: str  # why this plan exports as this kind
    loaders: str  # what loads it

    def __str__(self) -> str:
        return f"{self.name} ({self.reason}); loads with {self.loaders}"


STANDARD = "standard"
SUBSTITUTION = "expert substitution"
MOEVIZ_ONLY = "moeviz-only"
LOADERS = {
    STANDARD: "stock transformers (AutoModelForCausalLM.from_pretrained), vLLM, SGLang and any engine that "
              "reads the architecture; moeviz.load_model",
    SUBSTITUTION: "vLLM from 0.33.0 (0.32.0 refuses it: \"no module or parameter named …expert_replacements\"; with substitution vLLM refuses quantized experts, expert parallelism, data parallelism, EPLB and LoRA) and moeviz.load_model; "
                  "stock transformers refuses it (5.19 and 5.25: a size mismatch, the checkpoint's [K, …] expert tensors against the model's [E, …])",
    MOEVIZ_ONLY: "moeviz.load_model only; stock loaders refuse it by name (its model type is moeviz_pruned)",
}


def export_kind(plan: PruningPlan, quantization: dict | None = None) -> ExportKind:
    """Which kind of checkpoint `plan` exports as, and why (see `moeviz.export`'s docstring); for a
    checkpoint with this `quantization_config`, when given."""
    if not plan.num_pruned:
        why = "weight sparsity inside every expert" if plan.sparsity or plan.nm else "nothing pruned"
        return ExportKind(STANDARD, why, LOADERS[STANDARD])
    if plan.mode in ("novice", "drop"):
        what = "novices" if plan.mode == "novice" else "drops"
        loaders = LOADERS[SUBSTITUTION]
        if quantization:
            method = (quantization.get("quant_method") if isinstance(quantization, dict)
                      else getattr(quantization, "quant_method", None)) or "quantized"
            loaders = (f"moeviz.load_model; vLLM's expert substitution (0.33.0) refuses {method} experts; "
                       "stock transformers refuses it (5.19 and 5.25: a size mismatch, the checkpoint's [K, …] expert tensors against the model's [E, …])")
        return ExportKind(SUBSTITUTION, f"{what}: the router keeps every expert, pruned ones answer with a "
                                        "constant vector", loaders)
    if plan.is_uniform():
        return ExportKind(STANDARD, f"{plan.mode}: every MoE layer keeps the same number of experts", LOADERS[STANDARD])
    kept = sorted({n - len(plan.pruned.get(i, ())) for i, n in zip(plan.model["layer_indices"], plan.model["num_experts"])})
    return ExportKind(MOEVIZ_ONLY, f"{plan.mode} with {kept[0]}–{kept[-1]} experts kept per layer: one config "
                                   "holds one expert count", LOADERS[MOEVIZ_ONLY])


# ---- selection: the one place where scores become pruned sets ---------------------------
def select(scores: np.ndarray, ratio: float, scope: str, info: dict, counts: str = "free") -> dict[int, list[int]]:
    """Prune the lowest `scores` (L, E): `ratio` of each layer (`layer`) or of all experts (`global`).

    Global scope uses one threshold across layers, skipping a layer once it is down to top-k.
    `counts` shapes what global scope leaves per layer: "free" (as the threshold falls), "equal"
    (the same number in every layer, so that the export is a standard checkpoint) or "N" (every
    layer keeps a multiple of N experts, for expert parallelism over N devices; the total moves
    to the nearest such counts). Group-limited routers (DeepSeek) lose the same number of experts
    from every group.
    """
    if scope not in SCOPES:
        raise PlanError(f"Unknown scope {scope!r}; scopes: {', '.join(SCOPES)}")
    if not 0.0 <= ratio < 1.0:
        raise PlanError(f"The ratio must be in [0, 1), got {ratio}.")
    scores = np.asarray(scores, dtype=float)
    layers, top_k, groups = info["layer_indices"], info["top_k"], info.get("group_count", 1)
    if scope == "layer":
        pruned = {}
        for row, layer_idx in enumerate(layers):
            n = _layer_count(scores.shape[1], ratio, top_k, groups, layer_idx)
            pruned[layer_idx] = _lowest_per_group(scores[row], n, groups)
        return pruned
    if groups > 1:
        raise PlanError("Global scope is not available for group-limited routers: every group must "
                        "lose the same number of experts. Use scope='layer'.")
    pruned = _global(scores, ratio, layers, top_k)
    if counts == "free":
        return pruned
    if counts == "equal":
        n = int(round(sum(len(v) for v in pruned.values()) / len(layers)))
        return {i: sorted(np.argsort(scores[row], kind="stable")[:n].tolist()) for row, i in enumerate(layers)}
    multiple = int(counts) if str(counts).isdigit() and int(counts) > 0 else None
    if multiple is None:
        raise PlanError(f"counts must be 'free', 'equal' or a positive number of experts, got {counts!r}.")
    E = scores.shape[1]
    floor, ceiling = -(-top_k // multiple) * multiple, E // multiple * multiple  # kept counts that can be
    if floor > ceiling:
        raise PlanError(f"No layer can keep a multiple of {multiple} experts with at least top-k = {top_k} of {E}.")
    keep = {i: min(ceiling, max(floor, int(round((E - len(v)) / multiple)) * multiple)) for i, v in pruned.items()}
    return {i: sorted(np.argsort(scores[row], kind="stable")[:E - keep[i]].tolist()) for row, i in enumerate(layers)}


def _global(scores: np.ndarray, ratio: float, layers: list[int], top_k: int) -> dict[int, list[int]]:
    """One threshold across layers, skipping a layer once it is down to top-k."""
    total = int(round(ratio * scores.size))
    floor = top_k
    left = {i: scores.shape[1] for i in layers}
    pruned = {i: [] for i in layers}
    for flat in np.argsort(scores, axis=None, kind="stable"):
        if sum(len(v) for v in pruned.values()) >= total:
            break
        row, e = divmod(int(flat), scores.shape[1])
        if left[layers[row]] > floor:
            pruned[layers[row]].append(e)
            left[layers[row]] -= 1
    return {i: sorted(v) for i, v in pruned.items()}


def _lowest_per_group(scores: np.ndarray, n: int, groups: int) -> list[int]:
    """The n lowest scores, n / groups from each block of consecutive experts."""
    size = len(scores) // groups
    picked = []
    for g in range(groups):
        block = scores[g * size:(g + 1) * size]
        picked += (g * size + np.argsort(block, kind="stable")[:n // groups]).tolist()
    return sorted(picked)


def _layer_count(num_experts: int, ratio: float, top_k: int, groups: int, layer_idx: int) -> int:
    n = int(round(ratio * num_experts))
    n -= n % groups  # every group loses the same number
    if num_experts - n < top_k:
        left = num_experts - n
        raise PlanError(f"Ratio {ratio} would leave {left} expert{'s' * (left != 1)} in layer {layer_idx}, "
                        f"fewer than top-k = {top_k}.")
    return n
