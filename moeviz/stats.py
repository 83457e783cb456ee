"""`ExpertStats`: the one hand-off between calibration and everything after it.

On disk a directory: `stats.safetensors` (the tensors below, float64, stacked over MoE
layers) and `meta.json` (the model, its fingerprint and layout, the calibration spec, a
checksum of the tensors file). No pickle. Written atomically; a corrupted, truncated or
mismatched directory raises `StatsError` and is never used.

Tensors, L MoE layers × E experts (H hidden, I intermediate):
  count, gate_sum, prob_sum, ean_sum, reap_sum (L, E); out_mean, out_var, in_sqnorm (L, E, H);
  mid_sqnorm (L, E, I); coactivation (L, E, E); tokens (L,);
  with probes: probe_out_sum (L, E, H), probe_sim_sum (L, E, E), probe_tokens (L,).

`cosine_matrix` and `gram_to_cosine` turn feature rows (or their inner products) into the
E × E cosine similarities that `moeviz.analysis` and C-Prune both read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import readable

STATS_VERSION = 1
ADDITIVE = ("count", "gate_sum", "prob_sum", "in_sqnorm", "mid_sqnorm", "ean_sum", "reap_sum",
            "coactivation", "tokens", "probe_out_sum", "probe_sim_sum", "probe_tokens")
LAYOUT_KEYS = ("model_fingerprint", "architecture", "layer_indices", "num_experts", "top_k",
               "hidden_size", "intermediate_size")


class StatsError(ValueError):
    """A statistics directory that cannot be used: corrupted, truncated, or for another model."""


@dataclass(eq=False)  # compared and hashed by identity: a mix takes {stats: weight}
class ExpertStats:
    tensors: dict[str, torch.Tensor]  # see the module docstring; float64 on the CPU
    meta: dict = field(default_factory=dict)
    path: str | None = None  # the directory it was loaded from

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_sums(cls, sums: dict[str, torch.Tensor], meta: dict) -> ExpertStats:
        """From an observer's raw sums: turns Σf and Σf² into mean and variance."""
        tensors = {k: v.to(torch.float64) for k, v in sums.items() if k not in ("out_sum", "out_sqsum")}
        n = sums["count"].to(torch.float64).clamp(min=1)[..., None]
        mean = sums["out_sum"] / n
        tensors["out_mean"] = mean
        tensors["out_var"] = (sums["out_sqsum"] / n - mean.square()).clamp(min=0)
        meta = dict(meta, tokens=int(sums["tokens"][0].item()), stats_version=STATS_VERSION)
        return cls(tensors, meta)

    # ---- shape -------------------------------------------------------------------------
    @property
    def layer_indices(self) -> list[int]:
        return list(self.meta["layer_indices"])

    @property
    def num_layers(self) -> int:
        return self.tensors["count"].shape[0]

    @property
    def num_experts(self) -> int:
        return self.tensors["count"].shape[1]

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def calibration_data(self) -> str | None:
        """The text source the statistics were calibrated on (a mix's first source)."""
        calibration = self.meta.get("calibration") or {}
        return ((calibration[0] if calibration else {}) if isinstance(calibration, list) else calibration).get("data")

    @property
    def has_probes(self) -> bool:
        return "probe_out_sum" in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    # ---- derived views (L, E) unless said ---------------------------------------------
    @property
    def tokens(self) -> torch.Tensor:
        return self.tensors["tokens"][:, None]  # (L, 1)

    @property
    def frequency(self) -> torch.Tensor:
        """Share of tokens routed to e: count / tokens."""
        return self["count"] / self.tokens

    @property
    def gate_frequency(self) -> torch.Tensor:
        """Router-weighted frequency (MoNE's RS): gate_sum / tokens."""
        return self["gate_sum"] / self.tokens

    @property
    def soft_usage(self) -> torch.Tensor:
        return self["prob_sum"] / self.tokens

    @property
    def output_std(self) -> torch.Tensor:
        """σ per dimension of f_e over routed tokens: (L, E, H)."""
        return self["out_var"].sqrt()

    @property
    def ean(self) -> torch.Tensor:
        """Mean ‖f_e‖ over routed tokens."""
        return self["ean_sum"] / self["count"].clamp(min=1)

    @property
    def reap(self) -> torch.Tensor:
        """Mean g_e · ‖f_e‖ over routed tokens."""
        return self["reap_sum"] / self["count"].clamp(min=1)

    @property
    def probe_mean(self) -> torch.Tensor:
        """Each expert's mean output on the probe tokens: (L, E, H)."""
        return self["probe_out_sum"] / self["probe_tokens"].clamp(min=1)[:, None, None]

    @property
    def probe_similarity(self) -> torch.Tensor:
        """Mean cosine similarity of two experts' outputs on the same tokens: (L, E, E)."""
        return self["probe_sim_sum"] / self["probe_tokens"].clamp(min=1)[:, None, None]

    def view(self, name: str):
        """A named per-expert statistic as a numpy array (L, E); names in `VIEWS`."""
        if name not in VIEWS:
            raise KeyError(f"Unknown statistic {name!r}; known: {', '.join(VIEWS)}")
        return VIEWS[name][1](self).numpy()

    # ---- merging -----------------------------------------------------------------------
    def merge(self, other: ExpertStats) -> ExpertStats:
        """The stats of one run over both runs' tokens (Chan's update for mean and variance)."""
        for key in LAYOUT_KEYS:
            if self.meta.get(key) != other.meta.get(key):
                raise StatsError(f"Cannot merge stats of different models or layouts ({key} differs).")
        tensors = {k: self[k] + other[k] for k in ADDITIVE if k in self.tensors and k in other.tensors}
        n1, n2 = self["count"][..., None], other["count"][..., None]
        n = (n1 + n2).clamp(min=1)
        delta = other["out_mean"] - self["out_mean"]
        tensors["out_mean"] = self["out_mean"] + delta * n2 / n
        tensors["out_var"] = (n1 * self["out_var"] + n2 * other["out_var"] + delta.square() * n1 * n2 / n) / n
        calibration = [*_as_list(self.meta.get("calibration")), *_as_list(other.meta.get("calibration"))]
        meta = dict(self.meta, tokens=self.meta["tokens"] + other.meta["tokens"], calibration=calibration)
        return ExpertStats(tensors, meta)

    @staticmethod
    def mix(sources: dict[ExpertStats, float] | list[tuple[ExpertStats, float]]) -> ExpertStats:
        """The stats of a calibration in which each source gives the share (weight, normalised) of
        the tokens: every sum of source i scaled by s_i = w_i · T / T_i, with T = min T_i / w_i
        over the weighted sources, the largest token count at which no source's token weighs more
        than once. Exact for every statistic (means and variances pooled as `merge` pools them);
        the probes, a fixed sample of each calibration's tokens, are mixed the same way over their
        own counts P_i (the sample of the mix holds w_i of source i's probe tokens).

        One source at weight 1 gives its own stats; shares proportional to the token counts give
        `merge` of them all. Sources of different models or layouts are refused."""
        pairs = list(sources.items()) if isinstance(sources, dict) else list(sources)
        if not pairs:
            raise StatsError("A mix needs at least one source.")
        weights = [float(w) for _, w in pairs]
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise StatsError(f"Mix weights must be non-negative and not all zero, got {weights}.")
        first = pairs[0][0]
        for stats, _ in pairs[1:]:
            for key in (*LAYOUT_KEYS, "stats_version"):
                if first.meta.get(key) != stats.meta.get(key):
                    raise StatsError(f"Cannot mix stats of different models or layouts ({key} differs: "
                                     f"{first.meta.get(key)!r} and {stats.meta.get(key)!r}).")
            if set(first.tensors) != set(stats.tensors):
                raise StatsError("Cannot mix stats calibrated with and without probes: recalibrate one of them.")
        shares = [w / sum(weights) for w in weights]
        used = [(stats, w) for (stats, _), w in zip(pairs, shares) if w > 0]
        total = torch.stack([stats["tokens"] / w for stats, w in used]).amin(0)  # (L,)
        scaled = [(stats, w * total / stats["tokens"]) for stats, w in used]  # (stats, s_i (L,))
        tensors = {}
        for key in ADDITIVE:
            if key in first.tensors and not key.startswith("probe_"):
                tensors[key] = sum(stats[key] * _expand(scale, stats[key]) for stats, scale in scaled)
        if first.has_probes:  # a fixed sample of tokens per calibration: the shares apply to the samples
            probes = torch.stack([stats["probe_tokens"].clamp(min=1e-300) / w for stats, w in used]).amin(0)
            for key in ("probe_out_sum", "probe_sim_sum", "probe_tokens"):
                tensors[key] = sum(stats[key] * _expand(w * probes / stats["probe_tokens"].clamp(min=1e-300), stats[key])
                                   for stats, w in used)
        counts = [stats["count"] * scale[:, None] for stats, scale in scaled]  # weighted tokens per expert
        n = sum(counts).clamp(min=1e-300)[..., None]
        mean = sum(c[..., None] * stats["out_mean"] for c, (stats, _) in zip(counts, scaled)) / n
        tensors["out_mean"] = mean
        tensors["out_var"] = sum(c[..., None] * (stats["out_var"] + (stats["out_mean"] - mean).square())
                                 for c, (stats, _) in zip(counts, scaled)) / n
        mixed = [dict(calibration=stats.meta.get("calibration"), path=stats.path, share=w,
                      tokens=stats.meta.get("tokens")) for (stats, _), w in zip(pairs, shares)]
        meta = dict(first.meta, tokens=int(round(float(total[0]))), mix=mixed,
                    calibration=[m["calibration"] for m in mixed if m["share"] > 0])
        meta.pop("stats_sha256", None)
        return ExpertStats(tensors, meta)

    # ---- disk --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: a temporary directory beside `path`, renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            tensors = {k: v.contiguous().cpu() for k, v in self.tensors.items()}
            save_file(tensors, tmp / "stats.safetensors")
            meta = dict(self.meta, stats_sha256=_sha256(tmp / "stats.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
            if path.exists():
                raise FileExistsError(f"{path} exists already; not overwritten.")
            readable(tmp)  # mkdtemp made it private, safetensors its file
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: dict | None = None) -> ExpertStats:
        """Read and check a stats directory. `expect`: meta entries that must match (e.g. the model)."""
        path = Path(path)
        meta = _read_meta(path)
        tensors_file = path / "stats.safetensors"
        if not tensors_file.is_file():
            raise StatsError(f"{path} has no stats.safetensors.")
        if meta.get("stats_sha256") != _sha256(tensors_file):
            raise StatsError(f"{tensors_file} is corrupted or truncated (checksum mismatch); "
                             "recalibrate into a new directory.")
        try:
            tensors = load_file(tensors_file)
        except (SafetensorError, OSError) as err:
            raise StatsError(f"{tensors_file} cannot be read: {err}") from err
        for key, value in (expect or {}).items():
            if meta.get(key) != value:
                raise StatsError(f"{path} does not match: its {key} is {meta.get(key)!r}, expected {value!r} "
                                 f"(stats made for model {meta.get('model')!r}).")
        return cls(tensors, meta, str(path))


def load_stats(paths: str | list[str], mix: str | list[float] | None = None) -> ExpertStats:
    """One stats directory, or a mix of several (`"A,B"`) at the shares `mix` (`"3,1"`; even
    shares when not given): the `--stats`/`--mix` of the command line. A share count that does
    not match the sources, or a share that is not a number, is refused in one line."""
    paths = [p.strip() for p in paths.split(",") if p.strip()] if isinstance(paths, str) else list(paths)
    if isinstance(mix, str):
        try:
            mix = [float(w) for w in mix.split(",") if w.strip()]
        except ValueError:
            raise StatsError(f"--mix takes numbers separated by commas (one share per source), got {mix!r}.") from None
    if mix is not None and len(mix) != len(paths):
        raise StatsError(f"--mix gives {len(mix)} shares for {len(paths)} stats directories: give one share per source.")
    if len(paths) == 1 and mix is None:
        return ExpertStats.load(paths[0])
    return load_mix(list(zip(paths, mix or [1.0] * len(paths))))


def load_mix(spec) -> ExpertStats | None:
    """A stats directory (a string), or the mix of directories at shares [[directory, share], …]
    (as jobs, plans and runs record them); None for None."""
    if spec is None or isinstance(spec, str):
        return None if spec is None else ExpertStats.load(spec)
    return ExpertStats.mix([(ExpertStats.load(path), share) for path, share in spec])


def mix_label(spec: str | list | None) -> str | None:
    """How runs and plans name a calibration: its directory, or a mix's directories and shares
    (`DIR@0.5,DIR@0.5`) for a mix given as [[directory, share], …]."""
    if spec is None or isinstance(spec, str):
        return spec
    return ",".join(f"{path}@{share:.4g}" for path, share in spec)


def plan_stats(plan) -> ExpertStats | None:
    """The statistics a plan was made from, from what it records: its mix of calibrations at its
    shares, or its one calibration directory; None when it records neither."""
    if plan.mix:
        return load_mix([(m["path"], m["share"]) for m in plan.mix])
    if plan.calibration and Path(plan.calibration).is_dir():
        return ExpertStats.load(plan.calibration)
    return None


# name → (what it is, how to compute it as (L, E)); the app and the CLI show these.
VIEWS = {
    "frequency": ("share of tokens routed to the expert (count / tokens)", lambda s: s.frequency),
    "gate_frequency": ("router-weighted frequency, MoNE's RS (Σ g / tokens)", lambda s: s.gate_frequency),
    "soft_usage": ("mean router probability over all tokens (Σ p / tokens)", lambda s: s.soft_usage),
    "output_std": ("‖σ_e‖₂: spread of the expert's output over its tokens", lambda s: s.output_std.norm(dim=-1)),
    "output_mean_norm": ("‖μ_e‖₂: length of the expert's mean output (its novice)", lambda s: s["out_mean"].norm(dim=-1)),
    "ean": ("EAN: mean ‖f_e(x)‖ over routed tokens", lambda s: s.ean),
    "reap": ("REAP: mean g_e(x)·‖f_e(x)‖ over routed tokens", lambda s: s.reap),
    "mone": ("MoNE score RS × ‖σ_e‖₂ (low: a novice can replace it)", lambda s: s.gate_frequency * s.output_std.norm(dim=-1)),
}


# ---- similarity of experts: cosines of feature rows (analysis and C-Prune read these) ----
def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows: (E, D) → (E, E), exactly 1 on the diagonal."""
    f = np.asarray(features, dtype=np.float64)
    return gram_to_cosine(f @ f.T)


def gram_to_cosine(gram: np.ndarray) -> np.ndarray:
    """Inner products (E, E) → cosines, symmetric, exactly 1 on the diagonal."""
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-24))
    sim = np.clip(gram / np.outer(norms, norms), -1.0, 1.0)
    np.fill_diagonal(sim, 1.0)
    return (sim + sim.T) / 2


def list_stats(cache_dir: str | os.PathLike, fingerprint: str | None = None) -> list[tuple[Path, dict]]:
    """The readable stats directories under `cache_dir`, newest first, optionally for one model."""
    found = []
    for meta_file in Path(cache_dir).glob("*/meta.json"):
        if meta_file.parent.name.startswith("."):
            continue  # a write in progress
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if fingerprint is None or meta.get("model_fingerprint") == fingerprint:
            found.append((meta_file.parent, meta))
    return sorted(found, key=lambda item: item[0].stat().st_mtime, reverse=True)


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise StatsError(f"{path} is not a stats directory (no meta.json).") from None
    except json.JSONDecodeError as err:
        raise StatsError(f"{path / 'meta.json'} is corrupted: {err}") from err
    version = meta.get("stats_version")
    if version != STATS_VERSION:
        raise StatsError(f"{path} has stats version {version}; this moeviz reads version {STATS_VERSION}. "
                         "Recalibrate.")
    return meta


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _expand(scale: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """A per-layer factor (L,) shaped to multiply `tensor` (L, …)."""
    return scale.reshape(-1, *([1] * (tensor.dim() - 1)))


def _as_list(spec) -> list:
    if spec is None:
        return []
    return spec if isinstance(spec, list) else [spec]
