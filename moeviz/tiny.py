"""Tiny random MoE models built from transformers configs: no download, seconds on a CPU.

Used by the tests and benchmarks, and by anyone who wants to try moeviz on a family
without its weights.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)

# Per family: the config keys that make a small MoE with 8 experts.
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=8),
    "olmoe": dict(num_experts=8),
    "qwen2_moe": dict(num_experts=8, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=8),
    "deepseek_v2": dict(_MLA, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        num_hidden_layers=3, q_lora_rank=None, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy"),
    "deepseek_v3": dict(_MLA, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                        num_hidden_layers=3, q_lora_rank=16, n_group=2, topk_group=1,
                        rope_scaling=None),
    "gpt_oss": dict(num_local_experts=8),
    "phimoe": dict(num_local_experts=8),
    "granitemoe": dict(num_local_experts=8),
    "glm4_moe": dict(n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1,
                     num_hidden_layers=3, n_group=2, topk_group=1),
    "minimax": dict(num_local_experts=8),
    "jamba": dict(num_experts=8, attn_layer_period=1, attn_layer_offset=0,
                  expert_layer_period=1, expert_layer_offset=0),
    "ernie4_5_moe": dict(moe_num_experts=8, moe_num_shared_experts=1, moe_layer_start_index=1,
                         num_hidden_layers=3),
}


def tiny_config(model_type: str, **overrides):
    if model_type not in TINY_CONFIGS:
        raise ValueError(f"No tiny config for {model_type!r}; known: {', '.join(sorted(TINY_CONFIGS))}")
    return AutoConfig.for_model(model_type, **{**_BASE, **TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised model of `model_type`, in eval mode, on the CPU."""
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _spread_router_biases(model)
    return model.eval()


def _spread_router_biases(model: PreTrainedModel) -> None:
    """Random score-correction biases, so that tests exercise them (they start at zero)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)
