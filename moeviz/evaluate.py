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

from .loading import execution_device
from .data import sample_sequences

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


def _kl_agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, int]:
    """Σ KL(ref ‖ logits) over tokens and the count of equal top-1s, (B, L, V) one sequence at a time."""
    kl = 0.0
    for row, ref_row in zip(logits, ref):
        logp, ref_logp = F.log_softmax(row.float(), -1), F.log_softmax(ref_row.float(), -1)
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
    return kl, int((logits.argmax(-1) == ref.argmax(-1)).sum())


def fidelity(model: PreTrainedModel, reference: PreTrainedModel, tokens: torch.Tensor,
             batch_size: int = 8) -> dict[str, float]:
    """Mean KL(reference ‖ model) of next-token distributions, and top-1 agreement."""
    kl, agree = 0.0, 0
    for (batch, logits), (_, ref) in zip(_logits(model, tokens, batch_size), _logits(reference, tokens, batch_size)):
        k, a = _kl_agreement(logits, ref)
        kl, agree = kl + k, agree + a
    return dict(kl=max(kl / tokens.numel(), 0.0), top1_agreement=agree / tokens.numel())


@torch.inference_mode()
def plan_fidelity(handle, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """Perplexity, KL and top-1 agreement of a plan applied in place (`applied`'s handle),
    against the same weights without it, batch by batch: no second model, no stored logits."""
    model = handle.model
    device = execution_device(model)
    nll, kl, agree = [], 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        with handle.original():
            ref = model(input_ids=batch, use_cache=False).logits
        nll.append(_rows_nll(logits, batch))
        k, a = _kl_agreement(logits, ref)
        kl, agree = kl + k, agree + a
    return dict(_perplexity_report(torch.cat(nll)), kl=max(kl / tokens.numel(), 0.0),
                top1_agreement=agree / tokens.numel())


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
    tokens = sample_sequences(config.data, config.num_samples, config.seq_len, tokenizer, config.seed,
                              split="heldout", vocab_size=model.config.vocab_size)
    if plan is None:
        return _evaluate_model(model, config, tokenizer, tokens, reference, step)
    from .apply import applied

    base = parameter_counts(model)
    with applied(model, plan, stats, fingerprint) as handle:
        step("perplexity and fidelity", 0, 1)
        report = dict(eval=asdict(config), **plan_fidelity(handle, tokens, config.batch_size))
        report.update(plan_counts(handle))
        report["params_saved"] = 1 - report["params"] / base["params"]
        report["bytes_saved"] = 1 - report["bytes"] / base["bytes"]
        report.update(_tasks(model, config, tokenizer, step))
    return report


def _evaluate_model(model, config, tokenizer, tokens, reference, step) -> dict:
    report = dict(eval=asdict(config))
    step("perplexity", 0, 1)
    report.update(_perplexity_report(sequence_nll(model, tokens, config.batch_size)))
    report.update(parameter_counts(model))
    if reference is not None:
        step("fidelity", 0, 1)
        report.update(fidelity(model, reference, tokens, config.batch_size))
        ref_counts = parameter_counts(reference)
        report["params_saved"] = 1 - report["params"] / ref_counts["params"]
        report["bytes_saved"] = 1 - report["bytes"] / ref_counts["bytes"]
    report.update(_tasks(model, config, tokenizer, step))
    if config.throughput:
        step("throughput", 0, 1)
        report["tokens_per_s"] = throughput(model, tokens, config.batch_size)
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
