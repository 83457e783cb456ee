"""What pruning cost: perplexity, task accuracy, fidelity to the original, size and speed.

`evaluate(model, EvalConfig, tokenizer, reference=…)` returns a flat dict of metrics (a
report), the same for any model: the original, a pruned copy, or a reloaded export.
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
    throughput: bool = True


@torch.inference_mode()
def _logits(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int):
    """Yield (batch tokens, float32 logits) on the model's device."""
    device = execution_device(model)
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)
        yield batch, model(input_ids=batch, use_cache=False).logits.float()


def perplexity(model: PreTrainedModel, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every predicted token of (N, L)."""
    nll, count = 0.0, 0
    for batch, logits in _logits(model, tokens, batch_size):
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def fidelity(model: PreTrainedModel, reference: PreTrainedModel, tokens: torch.Tensor,
             batch_size: int = 8) -> dict[str, float]:
    """Mean KL(reference ‖ model) of next-token distributions, and top-1 agreement."""
    kl, agree, count = 0.0, 0, 0
    for (batch, logits), (_, ref) in zip(_logits(model, tokens, batch_size), _logits(reference, tokens, batch_size)):
        logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
        count += batch.numel()
    return dict(kl=max(kl / count, 0.0), top1_agreement=agree / count)


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
             reference: PreTrainedModel | None = None, progress: Progress | None = None) -> dict:
    """Every metric of `config` for `model`; fidelity, and size and speed ratios, against `reference`."""
    step = progress or (lambda name, done, total: None)
    tokens = sample_sequences(config.data, config.num_samples, config.seq_len, tokenizer, config.seed,
                              split="heldout", vocab_size=model.config.vocab_size)
    report = dict(eval=asdict(config))
    step("perplexity", 0, 1)
    report["perplexity"] = perplexity(model, tokens, config.batch_size)
    report.update(parameter_counts(model))
    if reference is not None:
        step("fidelity", 0, 1)
        report.update(fidelity(model, reference, tokens, config.batch_size))
        ref_counts = parameter_counts(reference)
        report["params_saved"] = 1 - report["params"] / ref_counts["params"]
        report["bytes_saved"] = 1 - report["bytes"] / ref_counts["bytes"]
    if config.demo_tasks:
        from .demo.tasks import task_accuracies

        step("demo tasks", 0, 1)
        accuracies = task_accuracies(model, tokenizer, n=config.task_examples)
        report.update({f"task_{d}": acc for d, acc in accuracies.items()})
        report["task_mean"] = sum(accuracies.values()) / len(accuracies)
    if config.lm_eval_tasks:
        from .harness import run_lm_eval

        step("lm-eval", 0, 1)
        report.update(run_lm_eval(model, tokenizer, config.lm_eval_tasks))
    if config.throughput:
        step("throughput", 0, 1)
        report["tokens_per_s"] = throughput(model, tokens, config.batch_size)
        if reference is not None:
            report["speedup"] = report["tokens_per_s"] / throughput(reference, tokens, config.batch_size)
    return report

