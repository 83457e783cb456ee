"""What pruning cost: perplexity, task accuracy, fidelity to the original, size and speed.

`evaluate(model, EvalConfig, tokenizer, plan=…, stats=…)` returns a flat dict of metrics (a
report) for the model under a plan applied in place, compared batch by batch with the same
weights without it; `evaluate(model, …, reference=…)` does the same for a separate model (a
reloaded export against its original).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from .adapters import execution_device
from .data import parse_sources, sample_sequences

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass(frozen=True)
class EvalConfig:
    data: str = "demo"  # held-out text for perplexity and fidelity (the `heldout` split)
    num_samples: int = 128  # sequences (fewer make a noisy perplexity: 12–19 on the demo model at 16–32)
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8
    seed: int = 1234  # differs from calibration's default, so evaluation text is other text
    demo_tasks: bool = False  # the demo tasks' accuracies (for the demo model and its pruned copies)
    task_examples: int = 200  # per demo domain
    lm_eval_tasks: tuple[str, ...] = ()  # lm-evaluation-harness task names (needs moeviz[eval])
    throughput: bool = False  # tokens per second of a standalone model (noisy on a shared CPU)


@torch.inference_mode()
def _logits(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int):
    """Yield (batch tokens, logits in the model's dtype) on the model's device."""
    device = execution_device(model)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        yield batch, model(input_ids=batch, use_cache=False).logits


def _rows_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sequence (B,), in float32, one sequence at a time: a
    (B, L, V) float32 copy of a large vocabulary's logits is not made."""
    return torch.stack([F.cross_entropy(row[:-1].float(), ids[1:]) for row, ids in zip(logits, batch)]).cpu()


def sequence_nll(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sequence of (N, L): (N,) nats."""
    return torch.cat([_rows_nll(logits, batch) for batch, logits in _logits(model, tokens, batch_size)])


def perplexity(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of (N, L)."""
    return math.exp(sequence_nll(model, tokens, batch_size).mean().item())


def _perplexity_report(nll: torch.Tensor) -> dict:
    """Perplexity and its standard error over sequences (delta method on the mean NLL)."""
    ppl = math.exp(nll.mean().item())
    se = nll.std().item() / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    return dict(perplexity=ppl, perplexity_se=ppl * se)


def _kl_agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (B,): Σ KL(ref ‖ logits) over its tokens and its count of equal top-1s, (B, L, V)
    one sequence at a time."""
    kl = []
    for row, ref_row in zip(logits, ref):
        logp, ref_logp = F.log_softmax(row.float(), -1), F.log_softmax(ref_row.float(), -1)
        kl.append(F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item())
    return torch.tensor(kl, dtype=torch.float64), (logits.argmax(-1) == ref.argmax(-1)).sum(-1).cpu()


@torch.inference_mode()
def _rows(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int, reference: PreTrainedModel | None = None,
          handle=None) -> dict[str, torch.Tensor]:
    """Per sequence of (N, L): mean next-token NLL, and against a reference (another model, or
    the weights without the plan of `applied`'s `handle`) Σ KL and top-1 matches. One batch at a
    time: no stored logits."""
    device = execution_device(model)
    rows = dict(nll=[], kl=[], agree=[])
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        rows["nll"].append(_rows_nll(logits, batch))
        ref = None
        if handle is not None:
            with handle.original():
                ref = model(input_ids=batch, use_cache=False).logits
        elif reference is not None:
            ref = reference(input_ids=batch.to(execution_device(reference)), use_cache=False).logits.to(logits.device)
        if ref is not None:
            kl, agree = _kl_agreement(logits, ref)
            rows["kl"].append(kl)
            rows["agree"].append(agree)
    return {k: torch.cat(v) for k, v in rows.items() if v}


def _summary(rows: dict[str, torch.Tensor], seq_len: int, perplexity: bool = True) -> dict:
    """Perplexity (with its standard error), mean KL per token and top-1 agreement of some rows."""
    report = _perplexity_report(rows["nll"]) if perplexity else {}
    if "kl" in rows:
        n = len(rows["nll"]) * seq_len
        report.update(kl=max(rows["kl"].sum().item() / n, 0.0), top1_agreement=rows["agree"].sum().item() / n)
    return report


def fidelity(model: PreTrainedModel, reference: PreTrainedModel, tokens: torch.Tensor,
             batch_size: int = 8, perplexity: bool = False) -> dict[str, float]:
    """Mean KL(reference ‖ model) of next-token distributions, and top-1 agreement (and the
    model's perplexity on the same tokens, with `perplexity`)."""
    return _summary(_rows(model, tokens, batch_size, reference), tokens.shape[1], perplexity=perplexity)


def plan_fidelity(handle, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity, KL and top-1 agreement of a plan applied in place (`applied`'s handle),
    against the same weights without it, batch by batch: no second model, no stored logits."""
    return _summary(_rows(handle.model, tokens, batch_size, handle=handle), tokens.shape[1])


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Parameters and bytes: total, routed experts, novices (H numbers each), nonzero routed."""
    counts = dict(params=0, bytes=0, routed_params=0, routed_nonzero=0, novice_params=0)
    for name, p in model.named_parameters():
        counts["params"] += p.numel()
        counts["bytes"] += p.numel() * p.element_size()
        if name.endswith("novices"):
            counts["novice_params"] += p.numel()
        elif ".experts." in name and "shared" not in name:
            counts["routed_params"] += p.numel()
            counts["routed_nonzero"] += int(torch.count_nonzero(p))
    return counts


@torch.no_grad()
def plan_counts(handle) -> dict[str, int]:
    """`parameter_counts` of the model the plan would export, read off the applied model
    (the plan in place): pruned experts and, for removal, their router rows subtracted,
    novices added, nonzero weights counted in the kept experts."""
    plan = handle.plan
    with handle.original():
        counts = parameter_counts(handle.model)
    counts["routed_nonzero"] = 0
    for layer in handle.adapter.layers:
        gone = set(plan.pruned.get(layer.layer_idx, ()))
        for e in range(layer.num_experts):
            tensors = [t for t in vars(layer.expert_weights(e)).values() if t is not None]
            if e in gone:
                _subtract(counts, tensors)
            else:
                counts["routed_nonzero"] += sum(int(torch.count_nonzero(t)) for t in tensors)
        if not gone:
            continue
        rows = [layer.router_weight[e] for e in gone]
        if plan.mode in ("remove", "merge"):
            bias = layer.router_bias
            _subtract(counts, rows + ([bias[list(gone)]] if bias is not None else []), routed=False)
        else:  # novices of H numbers, in the experts' dtype
            novice = len(gone) * layer.hidden_size
            size = layer.expert_weights(0).down.element_size()
            counts.update(params=counts["params"] + novice, bytes=counts["bytes"] + novice * size,
                          novice_params=counts["novice_params"] + novice)
    return counts


def _subtract(counts: dict, tensors: list[torch.Tensor], routed: bool = True) -> None:
    for t in tensors:
        counts["params"] -= t.numel()
        counts["bytes"] -= t.numel() * t.element_size()
        if routed:
            counts["routed_params"] -= t.numel()


@torch.inference_mode()
def throughput(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8, repeats: int = 2) -> float:
    """Tokens per second of forward passes over `tokens` (best of `repeats`, after a warm-up)."""
    device = execution_device(model)
    batch = tokens[:batch_size].to(device)
    model(input_ids=batch, use_cache=False)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in _logits(model, tokens, batch_size):
            pass
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return tokens.numel() / best


def evaluate(model: PreTrainedModel, config: EvalConfig = EvalConfig(), tokenizer=None,
             reference: PreTrainedModel | None = None, progress: Progress | None = None,
             plan=None, stats=None, fingerprint: str | None = None) -> dict:
    """Every metric of `config` for `model`, or for `model` under `plan` (applied in place:
    fidelity and savings against the same weights without it); or against a separate
    `reference` model (an exported checkpoint against its original).

    Standard errors (over sequences for perplexity, binomial for task accuracies) are in
    `report["se"]`. Throughput is measured for a standalone model only: a plan applied in
    place still holds every expert, so its speed says nothing about the pruned model's.
    """
    step = progress or (lambda name, done, total: None)
    sources = parse_sources(config.data)  # several: each reported on its own too
    parts = [sample_sequences(source, config.num_samples, config.seq_len, tokenizer, config.seed, split="heldout",
                              vocab_size=model.config.vocab_size) for _, source in sources]
    tokens = torch.cat(parts)
    if plan is None:
        return _evaluate_model(model, config, tokenizer, tokens, reference, step, sources, parts)
    from .apply import applied

    base = parameter_counts(model)
    with applied(model, plan, stats, fingerprint) as handle:
        step("perplexity and fidelity", 0, 1)
        rows = _rows(model, tokens, config.batch_size, handle=handle)
        report = dict(eval=asdict(config), **_summary(rows, config.seq_len))
        report.update(plan_counts(handle))
        report["params_saved"] = 1 - report["params"] / base["params"]
        report["bytes_saved"] = 1 - report["bytes"] / base["bytes"]
        report.update(_tasks(model, config, tokenizer, step))
    return _per_source(report, rows, sources, parts, config.seq_len)


def _evaluate_model(model, config, tokenizer, tokens, reference, step, sources, parts) -> dict:
    report = dict(eval=asdict(config))
    step("perplexity" if reference is None else "perplexity and fidelity", 0, 1)
    rows = _rows(model, tokens, config.batch_size, reference)
    report.update(_summary(rows, config.seq_len))
    report.update(parameter_counts(model))
    if reference is not None:
        ref_counts = parameter_counts(reference)
        report["params_saved"] = 1 - report["params"] / ref_counts["params"]
        report["bytes_saved"] = 1 - report["bytes"] / ref_counts["bytes"]
    report.update(_tasks(model, config, tokenizer, step))
    if config.throughput:
        step("throughput", 0, 1)
        report["tokens_per_s"] = throughput(model, tokens, config.batch_size)
    return _per_source(report, rows, sources, parts, config.seq_len)


def _per_source(report: dict, rows: dict, sources: list[tuple[str, str]], parts: list, seq_len: int) -> dict:
    """With several held-out sources, each one's perplexity (± SE), KL and top-1 under
    report["sources"][name], and its demo task's accuracy (± SE) where it is one demo domain."""
    if len(sources) < 2:
        return report
    report["sources"], start = {}, 0
    for (name, source), part in zip(sources, parts):
        piece = {k: v[start:start + len(part)] for k, v in rows.items()}
        start += len(part)
        entry = _summary(piece, seq_len)
        domain = source.removeprefix("demo:") if source.startswith("demo:") else None
        if domain and f"task_{domain}" in report:
            entry.update(task=report[f"task_{domain}"], task_se=report.get("se", {}).get(f"task_{domain}"))
        report["sources"][name] = entry
    return report


def _tasks(model, config: EvalConfig, tokenizer, step) -> dict:
    report, se = {}, {}
    if config.demo_tasks:
        from .demo.tasks import task_accuracies

        step("demo tasks", 0, 1)
        accuracies = task_accuracies(model, tokenizer, n=config.task_examples)
        report.update({f"task_{d}": acc for d, acc in accuracies.items()})
        report["task_mean"] = sum(accuracies.values()) / len(accuracies)
        se = {f"task_{d}": math.sqrt(acc * (1 - acc) / config.task_examples) for d, acc in accuracies.items()}
        se["task_mean"] = math.sqrt(sum(v ** 2 for v in se.values())) / len(accuracies)
    if config.lm_eval_tasks:
        from .harness import run_lm_eval

        step("lm-eval", 0, 1)
        report.update(run_lm_eval(model, tokenizer, config.lm_eval_tasks))
    if se:
        report["se"] = se
    return report


def ratio_curve(model: PreTrainedModel, tokenizer, stats, methods: list[str], ratios: list[float],
                mode: str | None = None, scope: str = "layer", data: str = "demo", num_samples: int = 8,
                seq_len: int = 128, fingerprint: str | None = None, progress: Progress | None = None) -> dict:
    """Quality against pruning ratio, quickly: for each method and ratio, the plan from cached
    stats applied in place and compared with the original on a small held-out batch.

    Returns {method: [{"ratio", "kl", "top1_agreement", "perplexity"}]}; ratios a method
    cannot reach (fewer than top-k experts left) are left out.
    """
    from .apply import applied
    from .methods import PlanConfig, make_plan
    from .plan import PlanError

    tokens = sample_sequences(data, num_samples, seq_len, tokenizer, 4321, split="heldout",
                              vocab_size=model.config.vocab_size)
    out, done, total = {}, 0, len(methods) * len(ratios)
    for method in methods:
        out[method] = []
        for ratio in ratios:
            try:
                plan = make_plan(stats, PlanConfig(method, ratio=ratio, scope=scope, mode=mode))
            except PlanError:
                plan = None
            if plan is not None:
                with applied(model, plan, stats, fingerprint) as handle:
                    row = plan_fidelity(handle, tokens, batch_size=num_samples)
                out[method].append(dict(ratio=ratio, kl=row["kl"], top1_agreement=row["top1_agreement"],
                                        perplexity=row["perplexity"]))
            done += 1
            if progress is not None:
                progress(f"{method} at {ratio:.0%}", done, total)
    return out


def mix_tradeoff(model: PreTrainedModel, tokenizer, sources: dict[str, object], config, shares: list[float],
                 data: dict[str, str], num_samples: int = 8, seq_len: int = 128, tasks: bool = False,
                 task_examples: int = 50, fingerprint: str | None = None, progress: Progress | None = None) -> list[dict]:
    """Each source's held-out quality as the calibration mix moves from all-A to all-B.

    `sources` is {"A": stats, "B": stats} (two calibrations, or one against the mix of the
    rest); `config` the `PlanConfig`; at each share s of A (B gets 1 - s) the plan of the mix
    is applied in place and each held-out source in `data` ({name: source}) is compared with
    the original: KL and top-1 (cheap) and, with `tasks`, the demo tasks' accuracies.
    Returns one row per share: {"share", "pruned", "sources": {name: {"kl", "top1_agreement",
    "perplexity"[, "task"]}}[, "tasks": {domain: accuracy}]}.
    """
    from .apply import applied
    from .methods import make_plan
    from .stats import ExpertStats

    (name_a, a), (name_b, b) = sources.items()
    held = {name: sample_sequences(src, num_samples, seq_len, tokenizer, 4321, split="heldout",
                                   vocab_size=model.config.vocab_size) for name, src in data.items()}
    rows = []
    for i, share in enumerate(shares):
        stats = ExpertStats.mix([(a, share), (b, 1 - share)])
        plan = make_plan(stats, config)
        row = dict(share=share, pruned={str(k): v for k, v in plan.pruned.items()}, sources={})
        with applied(model, plan, stats, fingerprint) as handle:
            for name, tokens in held.items():
                row["sources"][name] = plan_fidelity(handle, tokens, batch_size=num_samples)
            if tasks:
                from .demo.tasks import task_accuracies

                row["tasks"] = task_accuracies(model, tokenizer, n=task_examples)
                for name, src in data.items():
                    domain = src.removeprefix("demo:")
                    if domain in row["tasks"]:
                        row["sources"][name]["task"] = row["tasks"][domain]
        rows.append(row)
        if progress is not None:
            progress(f"{name_a} {share:.0%} / {name_b} {1 - share:.0%}", i + 1, len(shares))
    return rows
