"""Train a shipped demo model: ``python -m moeviz.demo.train [--shape coarse|fine] [--out DIR] [--steps N] [--seed S]``.

A small MoE of a transformers family with a character tokenizer, trained on the synthetic
corpus of ``moeviz.demo.corpus`` with the load-balancing loss, then scored on each domain's
held-out task and on how differently the domains are routed. Two shapes (``SHAPES``):
``coarse`` makes ``demo`` (``MixtralForCausalLM``, 16 experts, top-2) and ``fine`` makes
``demo-fine`` (``Qwen2MoeForCausalLM``, 64 small experts, top-4, one shared expert).
Writes a Hugging Face checkpoint plus ``metrics.json`` to ``--out`` (default: the shape's
shipped checkpoint directory).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from moeviz.demo import DEMO_MODELS
from moeviz.demo.corpus import ALPHABET, DOMAINS, documents
from moeviz.demo.tasks import expert_frequencies, routing_divergence, task_accuracies

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
Batch = tuple[torch.Tensor, torch.Tensor]  # (input_ids, attention_mask), each (B, T)


@dataclass(frozen=True)
class TrainConfig:
    family: str = "mixtral"  # transformers model_type: mixtral or qwen2_moe (see build_model)
    seed: int = 0  # seeds the corpus, the initial weights and the batch order
    steps: int = 3000  # optimizer steps; each sees fresh documents
    batch_size: int = 40  # documents per step, an equal share from each domain
    lr: float = 3e-3  # peak AdamW learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay
    min_lr_ratio: float = 0.05  # final learning rate as a share of the peak
    weight_decay: float = 0.01  # AdamW, on matrices only
    aux_loss_coef: float = 0.01  # weight of the per-layer load-balancing loss (Switch Transformer)
    hidden_size: int = 128  # model width
    intermediate_size: int = 64  # each expert's MLP width
    num_layers: int = 4  # decoder layers, each with a MoE block
    num_heads: int = 4  # attention heads (head_dim = hidden_size / num_heads)
    num_experts: int = 16  # routed experts per layer
    top_k: int = 2  # experts per token
    shared_expert_size: int = 0  # qwen2_moe: the always-on shared expert's MLP width
    norm_topk_prob: bool = False  # qwen2_moe: rescale the top-k gate weights to sum to 1
    eval_examples: int = 200  # held-out task items per domain in metrics.json
    eval_seed: int = 0  # seed of those task items
    routing_docs: int = 64  # held-out documents per domain for the routing report


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of the corpus alphabet; prepends ``<s>`` like Llama."""
    vocab = {token: idx for idx, token in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


# The shipped shapes: `--shape` → (demo model name, its training configuration).
SHAPES = {
    "coarse": TrainConfig(),
    # Fine-grained experts as in Qwen1.5-MoE (60 experts, top-4, a shared expert four experts
    # wide), each half the coarse expert's width. Top-k weights renormalised as Qwen3-MoE
    # and DeepSeek-V3 do. Top-4 and 30 documents a step: what lets 3000 steps (as many as `demo`'s)
    # fit the 20-minute budget on two cores (~0.35 s a step; top-8 × 40 documents was ~0.57 s).
    # At 3e-3 the agreement task was not learnt in 3000 steps; at 2e-3 it is by step 2500.
    "fine": TrainConfig(family="qwen2_moe", steps=3000, batch_size=30, lr=2e-3, intermediate_size=32,
                        num_experts=64, top_k=4, shared_expert_size=128, norm_topk_prob=True),
}
SHAPE_MODELS = {demo.shape: name for name, demo in DEMO_MODELS.items()}  # "fine" → "demo-fine"


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised model of ``cfg.family`` (seeded by ``cfg.seed``)."""
    if cfg.family not in _BUILDERS:
        raise ValueError(f"Unknown family {cfg.family!r}; known: {', '.join(_BUILDERS)}")
    torch.manual_seed(cfg.seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=256,
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.aux_loss_coef,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return _BUILDERS[cfg.family](cfg, common)


def _mixtral(cfg: TrainConfig, common: dict) -> MixtralForCausalLM:
    config = MixtralConfig(intermediate_size=cfg.intermediate_size, num_local_experts=cfg.num_experts, **common)
    return MixtralForCausalLM(config)


def _qwen2_moe(cfg: TrainConfig, common: dict) -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(
        moe_intermediate_size=cfg.intermediate_size,
        num_experts=cfg.num_experts,
        shared_expert_intermediate_size=cfg.shared_expert_size,
        intermediate_size=cfg.shared_expert_size,  # dense MLP width: unused, every layer is MoE
        norm_topk_prob=cfg.norm_topk_prob,
        **common,
    )
    return Qwen2MoeForCausalLM(config)


_BUILDERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe}


def training_batches(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> Iterator[Batch]:
    """``cfg.steps`` batches of fresh train documents: (input_ids, attention_mask), each (B, T)."""
    per_domain = cfg.batch_size // len(DOMAINS)
    docs = [documents(domain, "train", per_domain * cfg.steps, cfg.seed) for domain in DOMAINS]
    rng = random.Random(cfg.seed)
    for step in range(cfg.steps):
        start, stop = step * per_domain, (step + 1) * per_domain
        batch = [text for domain_docs in docs for text in domain_docs[start:stop]]
        rng.shuffle(batch)
        yield encode_documents(tokenizer, batch)


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> Batch:
    """``<s> text </s>``, right-padded: (input_ids, attention_mask), each (B, T)."""
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(texts)).input_ids]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return ids, mask


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch Transformer's balance loss ``E * sum_e f_e * P_e`` per layer, averaged over layers.

    Per layer, not pooled over layers as transformers' ``load_balancing_loss_func`` does,
    so that no layer can leave an expert dead.
    """
    mask = attention_mask.reshape(-1, 1).float()  # (B*T, 1)
    losses = []
    for logits in router_logits:  # (B*T, E)
        probs = logits.float().softmax(-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1)  # (B*T, E)
        share_routed = (chosen * mask).sum(0) / (mask.sum() * top_k)  # f_e, (E,)
        mean_prob = (probs * mask).sum(0) / mask.sum()  # P_e, (E,)
        losses.append(probs.shape[-1] * (share_routed * mean_prob).sum())
    return torch.stack(losses).mean()


def language_model_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Next-token cross-entropy over real tokens; logits (B, T, V), ids and mask (B, T)."""
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def build_optimizer(model: PreTrainedModel, cfg: TrainConfig) -> tuple[torch.optim.AdamW, LambdaLR]:
    """AdamW (no decay on norms) with linear warm-up and cosine decay."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, LambdaLR(optimizer, schedule)


def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> None:
    """The training loop; progress (loss, balance loss) on a tqdm bar."""
    optimizer, scheduler = build_optimizer(model, cfg)
    model.train()
    bar = tqdm(training_batches(cfg, tokenizer), total=cfg.steps, desc="train", mininterval=2.0)
    for input_ids, attention_mask in bar:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
        lm_loss = language_model_loss(out.logits, input_ids, attention_mask)
        aux_loss = load_balancing_loss(out.router_logits, attention_mask, cfg.top_k)
        (lm_loss + cfg.aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{lm_loss.item():.3f}", aux=f"{aux_loss.item():.3f}", refresh=False)
    model.eval()


def routing_report(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> dict:
    """Per layer: mean pairwise JS divergence (bits) of the domains' expert usage, the rarest
    expert's share, and each domain's three most used experts."""
    texts = {domain: documents(domain, "heldout", cfg.routing_docs, cfg.eval_seed) for domain in DOMAINS}
    frequencies = expert_frequencies(model, tokenizer, texts)  # per layer: (domains, experts)
    overall = [layer.mean(0) for layer in frequencies]  # domains weighted equally, (experts,)
    return {
        "routing_js_bits": [round(x, 4) for x in routing_divergence(frequencies)],
        "min_expert_share": [round(float(usage.min()), 4) for usage in overall],
        "top_experts": [
            {domain: np.argsort(-row)[:3].tolist() for domain, row in zip(DOMAINS, layer)}
            for layer in frequencies
        ],
    }


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, cfg: TrainConfig) -> dict:
    accuracy = task_accuracies(model, tokenizer, DOMAINS, cfg.eval_examples, cfg.eval_seed)
    return {
        "accuracy": {domain: round(acc, 4) for domain, acc in accuracy.items()},
        "mean_accuracy": round(float(np.mean(list(accuracy.values()))), 4),
        "task_examples_per_domain": cfg.eval_examples,
        "eval_seed": cfg.eval_seed,
        **routing_report(model, tokenizer, cfg),
    }


def print_metrics(metrics: dict) -> None:
    for domain, acc in metrics["accuracy"].items():
        print(f"  {domain:<11} accuracy {acc:.3f}")
    print(f"  mean        accuracy {metrics['mean_accuracy']:.3f}")
    for layer_idx, (js, share) in enumerate(zip(metrics["routing_js_bits"], metrics["min_expert_share"])):
        tops = "  ".join(f"{d}:{e}" for d, e in metrics["top_experts"][layer_idx].items())
        print(f"  layer {layer_idx}: routing JS {js:.3f} bits, rarest expert {share:.3f}  top {tops}")


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, metrics: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train one of moeviz's demo MoE models and write its checkpoint.")
    parser.add_argument("--shape", choices=SHAPES, default="coarse",
                        help="coarse: demo (Mixtral, 16 experts, top-2); fine: demo-fine (Qwen2-MoE, "
                             "64 experts, top-4, a shared expert)")
    parser.add_argument("--out", type=Path, help="checkpoint directory to write (default: the shape's shipped one)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the shape's)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="corpus, init and batch-order seed")
    args = parser.parse_args(argv)
    cfg = replace(SHAPES[args.shape], steps=args.steps or SHAPES[args.shape].steps, seed=args.seed)
    out = args.out or DEMO_MODELS[SHAPE_MODELS[args.shape]].path

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    train(model, tokenizer, cfg)
    train_time = time.perf_counter() - start
    metrics = {"shape": args.shape, "seed": cfg.seed, "steps": cfg.steps, "train_time_s": round(train_time, 1)}
    metrics |= evaluate(model, tokenizer, cfg)
    metrics["wall_time_s"] = round(time.perf_counter() - start, 1)
    metrics["config"] = asdict(cfg)
    save(model, tokenizer, metrics, out)
    print_metrics(metrics)
    print(f"wrote {out}; wall time {metrics['wall_time_s']:.0f} s (training {train_time:.0f} s)")
    return metrics


if __name__ == "__main__":
    main()
