"""The model card of an export: `README.md` with the Hub's YAML front matter, saying what was
pruned and how, from which calibration, what kind of checkpoint it is and how to load it, and
how the plan evaluated against the original (from the runs store, when it holds that run)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from .plan import MOEVIZ_ONLY, STANDARD, PruningPlan

MODES = {
    "remove": "removed: each pruned expert and its router row are gone",
    "novice": "novice (MoNE): each pruned expert answers with a constant, its mean output on the calibration text; "
              "the router still routes to it",
    "drop": "dropped: each pruned expert answers with zeros; the router still routes to it",
    "merge": "merged: each pruned expert is folded into a kept one (frequency-weighted, neurons aligned)",
}
_VERBS = {"remove": "removed", "novice": "replaced by novices", "drop": "dropped", "merge": "merged into kept ones"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def model_card(plan: PruningPlan, kind, stats, parent: str, src: Path, adapter, fingerprint: str, runs=None,
               mtp: str | None = None) -> str:
    """The card's text. `parent` is how the original was named (a hub id, a path or a demo name),
    `src` its directory, `runs` a `RunStore` (or its path) that may hold this plan's evaluation,
    `mtp` what the export did with the checkpoint's multi-token-prediction layers."""
    front = dict(library_name="transformers" if kind.name == STANDARD else "moeviz",  # what can load it
                 tags=["moe", "pruned", "moeviz", hub_tag(plan.method)])
    if _HUB_ID.match(parent) and not Path(parent).exists():
        front["base_model"] = parent
    front.update(_license(src))
    name = Path(parent).name if Path(parent).exists() else parent
    sections = [
        f"# {name}, pruned by moeviz ({_summary(plan)})",
        f"`{parent}` with {_what(plan, adapter)}, by moeviz (method `{plan.method}`). The original's "
        f"fingerprint is `{fingerprint}`; `moeviz_lineage.json` holds the whole plan.",
        "## What was pruned\n\n" + _table([("method", plan.method), ("ratio", _ratio(plan)),
                                            ("mode", MODES.get(plan.mode, plan.mode) if plan.num_pruned else "—"),
                                            ("scope", "global (one threshold across layers)" if plan.scope == "global"
                                             else "per layer"),
                                            ("weight sparsity", _sparsity(plan)),
                                            ("experts kept per layer", _kept(plan, adapter)),
                                            *([("multi-token prediction", mtp)] if mtp else [])]),
        "## Calibration\n\n" + _calibration(plan, stats),
        f"## How to load it\n\nKind: **{kind.name}** ({kind.reason}). It loads with {kind.loaders}.\n\n"
        + _loading(kind),
        "## Evaluation\n\n" + _evaluation(plan, fingerprint, runs),
        "## Verification\n\n" + NOT_VERIFIED,
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n\n".join(sections) + "\n"


NOT_VERIFIED = ("Not verified yet. `moeviz verify <this directory>` checks the files against the checksums in "
                "`moeviz_lineage.json`, then serves the model in the engine that serves its kind (stock transformers, "
                "vLLM or moeviz) and compares its outputs with the plan's.")


def with_verification(card: str, lines: list[str]) -> str:
    """The card with its Verification section replaced by `lines` (or by "not verified yet" for
    none), where it stands; appended when the card has none."""
    head, _, rest = card.partition("\n## Verification\n")
    tail = rest[rest.find("\n## "):] if "\n## " in rest else "\n"
    body = "\n".join(f"- {line}" for line in lines) if lines else NOT_VERIFIED
    return head.rstrip("\n") + "\n\n## Verification\n\n" + body + "\n" + tail


def hub_tag(text: str) -> str:
    """A valid Hub tag: lower case, letters, digits and single hyphens (`mone (edited)` → `mone-edited`)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "plan"


def _license(src: Path) -> dict:
    """The original's license fields, from its own card's front matter."""
    card = src / "README.md"
    if not card.is_file():
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", card.read_text(errors="replace"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta, dict) and k in meta}


def _summary(plan: PruningPlan) -> str:
    if not plan.num_pruned:
        return f"{plan.method}, weight sparsity {_sparsity(plan)}"
    return f"{plan.method} {plan.mode} {_ratio(plan)}" + (" global" if plan.scope == "global" else "")


def _what(plan: PruningPlan, adapter) -> str:
    total = sum(adapter.num_experts)
    parts = []
    if plan.num_pruned:
        parts.append(f"{plan.num_pruned} of its {total} routed experts {_VERBS[plan.mode]}")
    if plan.sparsity or plan.nm:
        parts.append(f"{_sparsity(plan)} of every kept expert's weights zeroed (MoE-Pruner)")
    return " and ".join(parts) or "nothing pruned"


def _ratio(plan: PruningPlan) -> str:
    return f"{plan.ratio * 100:g} %"


def _sparsity(plan: PruningPlan) -> str:
    if plan.nm:
        return f"{plan.nm[0]}:{plan.nm[1]} semi-structured"
    return f"{plan.sparsity * 100:g} %" if plan.sparsity else "—"


def _kept(plan: PruningPlan, adapter) -> str:
    kept = [layer.num_experts - len(plan.pruned.get(layer.layer_idx, ())) for layer in adapter.layers]
    totals = adapter.num_experts
    if len(set(kept)) == 1 and len(set(totals)) == 1:
        return f"{kept[0]} of {totals[0]} in every MoE layer"
    return ", ".join(f"layer {layer.layer_idx}: {k}/{n}" for layer, k, n in zip(adapter.layers, kept, totals))


def _calibration(plan: PruningPlan, stats) -> str:
    if stats is None:
        return "None was needed: the experts to prune were chosen without calibration statistics."
    meta = stats.meta
    calib = meta.get("calibration") or {}
    rows = calib if isinstance(calib, list) else [calib]
    shares = [m["share"] for m in meta.get("mix") or [] if m["share"] > 0] or [None] * len(rows)
    lines = [f"- `{c.get('data', '?')}`: {c.get('num_samples', '?')} sequences × {c.get('seq_len', '?')} tokens "
             f"(seed {c.get('seed', 0)})" + (f", {share:.0%} of the mix" if share is not None and len(rows) > 1 else "")
             for c, share in zip(rows, shares)]
    return "\n".join(lines) + f"\n\n{meta.get('tokens', '?')} tokens in all; statistics in `{plan.calibration or '?'}`."


def _loading(kind) -> str:
    moeviz = "```python\nfrom moeviz import load_model\nmodel, tokenizer = load_model(\"PATH\")\n```"
    if kind.name == STANDARD:
        return ("```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained"
                "(\"PATH\")\n```\n\nor `vllm serve PATH`.")
    if kind.name == MOEVIZ_ONLY:
        return ("Its layers keep different numbers of experts, which no architecture's config can say: its model type "
                "is `moeviz_pruned`, so transformers and serving engines refuse it by name rather than load it "
                "wrongly. The original architecture is recorded under `moeviz` in `config.json`.\n\n" + moeviz)
    serve = ("Serve it with vLLM 0.33.0 or later (`vllm serve PATH`; 0.32.0 refuses it, and with substitution vLLM "
             "refuses quantized experts, expert parallelism, data parallelism, EPLB and LoRA), or load it with moeviz"
             if "vLLM from 0.33.0" in kind.loaders else "Load it with moeviz (vLLM's expert substitution refuses "
                                                         "quantized experts)")
    return ("`config.json` keeps the original architecture and adds "
            "`compression_config.transform_config.expert_substitution` (version 1): per MoE layer, the router's "
            "logical experts, the retained experts' weights (stored under their original ids) and one constant "
            f"vector per substituted expert (`…expert_replacements.<id>.value`). {serve}:\n\n" + moeviz
            + "\n\nStock transformers does not read the block and refuses the checkpoint (5.19 and 5.25: a size "
              "mismatch between the stored experts and the config's count).")


def _evaluation(plan: PruningPlan, fingerprint: str, runs) -> str:
    found = _find_run(plan, fingerprint, runs) if runs is not None else None
    if found is None:
        return ("Not evaluated yet. `moeviz evaluate --model ORIGINAL --plan plan.json --stats STATS --runs "
                "cache/runs.sqlite` evaluates the plan in place against the original; exporting again then "
                "writes the figures here.")
    run, base = found
    setting = run.metrics.get("eval") or {}
    rows = [("", "original", "this plan")]
    for key, label in (("perplexity", "perplexity"), ("task_mean", "demo tasks, mean accuracy"),
                       ("kl", "KL to the original (nats/token)"), ("top1_agreement", "top-1 agreement")):
        if key in run.metrics:
            rows.append((label, _value(base.metrics, key) if base else "—", _value(run.metrics, key)))
    tasks = sorted(k for k in run.metrics if k.startswith("task_") and k != "task_mean")
    rows += [(k.removeprefix("task_"), _value(base.metrics, k) if base else "—", _value(run.metrics, k)) for k in tasks]
    head = (f"Evaluated in place on the original's weights (run {run.id} of the runs store): "
            f"`{setting.get('data', '?')}`, {setting.get('num_samples', '?')} held-out sequences × "
            f"{setting.get('seq_len', '?')} tokens; ± one standard error.")
    return head + "\n\n" + _table(rows[1:], header=rows[0])


def _find_run(plan: PruningPlan, fingerprint: str, runs):
    """The plan's own run (not a recovery) and the original evaluated the same way, or None."""
    from .runs import RunStore, baseline_of, plan_digest

    store = runs if isinstance(runs, RunStore) else RunStore(runs)
    digest = plan_digest(plan)
    matches = [r for r in store.list(fingerprint=fingerprint, method=plan.method)
               if r.metrics.get("plan_digest") == digest and not r.metrics.get("recovery")]
    if not matches:
        return None
    run = matches[-1]
    return run, baseline_of(run, store.list(fingerprint=fingerprint, method="original"))


def _value(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "—"
    se = (metrics.get("se") or {}).get(key, metrics.get(f"{key}_se"))
    return f"{value:.4g}" + (f" ± {se:.2g}" if se else "")


def _table(rows, header=("", "")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
