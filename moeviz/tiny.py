"""Tiny random MoE models built from transformers configs: no download, seconds on a CPU.

Used by the tests and benchmarks, and by anyone who wants to try moeviz on a family
without its weights. Any MoE family transformers ships gets one: its default config, shrunk
(`shrink`) to 4 layers, a hidden size of 32 and 8 experts of which 2 are chosen, with a few
per-family keys (`FAMILY_KEYS`) where a default does not build a small MoE.
"""

from __future__ import annotations

import re

import torch
from transformers import AutoConfig, PreTrainedModel

from .adapters import FAMILIES

_BASE = dict(
    vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False,
)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8)

# The families the suite has used longest: these exact small configs (from _BASE).
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

# Keys that a family's default config needs besides shrinking, to be a small MoE that runs.
FAMILY_KEYS: dict[str, dict] = {
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, clip_qkv=8.0, kv_n_heads=2),
                 ffn_config=dict(moe_num_experts=8, moe_top_k=2, ffn_hidden_size=24), d_model=32, n_heads=4,
                 n_layers=2, max_seq_len=128),
    "gemma4": dict(text_config=dict(enable_moe_block=True, global_head_dim=8)),
    "gemma4_text": dict(enable_moe_block=True, global_head_dim=8),
    "nemotron_h": dict(mamba_num_heads=8, mamba_head_dim=8, n_groups=2, expand=2),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=8, mamba_expand=2, mamba_n_groups=1,
                             layer_types=["mamba", "attention", "mamba", "attention"]),
    "kolibri1_1": dict(layer_types=["indexed_attention", "sliding_attention"] * 2, index_layers=[0, 2],
                       kv_source_layers=[0, 1, 2, 3], head_dim=16),
    "laguna": dict(num_attention_heads_per_layer=[4] * 4),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),
    "dots3_note": dict(text_config=dict(head_dim=16)),
    "dots3_note_text": dict(head_dim=16),
    "mistral4": dict(head_dim=16),  # the rotary part is head_dim · partial_rotary_factor = qk_rope_head_dim
    "qwen4_exp": dict(text_config=dict(indexer_budget=16, indexer_compress_ratio=4, indexer_kv_heads=1)),
    "qwen4_exp_text": dict(indexer_budget=16, indexer_compress_ratio=4, indexer_kv_heads=1),
}

_SMALL = dict(
    vocab_size=128, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    num_hidden_layers=4, max_position_embeddings=256, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16, n_group=2, topk_group=1,
    num_expert_group=2, first_k_dense_replace=1, num_dense_layers=1, num_nextn_predict_layers=0,
)
_RULES = (  # (key pattern, small value): the first that matches a key wins
    (r"per_tok|per_token|top_?k$|top_k_experts|^moe_k$|moe_top_?k", 2),
    (r"(num|n)_shared_experts|shared_experts?_num", 1),
    (r"experts$|^moe_num_experts$|expert_num$", 8),
    (r"intermediate_size|ffn_hidden_size|ffn_size|router_hidden_size", 24),
    (r"head_dim|d_head", 8),
    (r"(num|n)_(key_)?(value_)?heads|num_heads|kv_heads|_n_heads$", 2),
    (r"lora_rank|lowrank|_rank$", 16),
    (r"sliding_window|window_size|chunk_size|block_size|pool_size", 16),
    (r"state_size|index_topk|ple_embed_dim|hidden_size_per_layer_input|rotary_dim|dt_rank", 8),
    (r"vocab", 128),
)


def _small(key: str, value):
    if key in _SMALL:
        return _SMALL[key]
    if isinstance(value, bool) or not isinstance(value, (int, type(None))):
        return None
    for pattern, small in _RULES:
        if re.search(pattern, key):
            return small if value is None or small < value or small == 8 else None  # 8 experts, always
    return None


def shrink(fields: dict) -> dict:
    """A config's fields made small: sizes, heads and experts cut, per-layer lists cut to the first
    layers (keeping one layer of every kind they name), layer indices and overrides past them dropped."""
    out = dict(fields)
    old_layers, layers = fields.get("num_hidden_layers"), _SMALL["num_hidden_layers"]
    for key, value in fields.items():
        small = _small(key, value)
        if small is not None and not (key == "q_lora_rank" and value is None):
            out[key] = small
        if key.endswith("token_id") and isinstance(value, int) and value >= _SMALL["vocab_size"]:
            out[key] = 1
        if isinstance(value, list) and old_layers and value:
            if len(value) == old_layers and all(isinstance(v, (str, bool)) or v in (0, 1) for v in value):
                kept = value[:layers]  # a pattern per layer: keep every kind it has, at the end
                for i, kind in enumerate(k for k in dict.fromkeys(value) if k not in kept):
                    if i < layers - 1:
                        kept[-1 - i] = kind
                out[key] = kept
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                out[key] = [v for v in value if v < layers]  # layer indices
        if key == "per_layer_config" and isinstance(value, dict):
            out[key] = {i: shrink(v) for i, v in value.items() if not str(i).isdigit() or int(i) < layers}
    if out.get("kv_lora_rank") and "num_attention_heads" in out:  # latent attention: a K/V head per query head
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def tiny_config(model_type: str, **overrides):
    """A small config of any MoE family transformers ships."""
    if model_type in TINY_CONFIGS:
        return AutoConfig.for_model(model_type, **{**_BASE, **TINY_CONFIGS[model_type], **overrides})
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"No tiny config for {model_type!r}: transformers has no such model type.")
    fields = CONFIG_MAPPING[model_type]().to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    fields = shrink(fields)
    if isinstance(fields.get("text_config"), dict):
        fields["text_config"] = shrink(fields["text_config"])
    for key, value in {**FAMILY_KEYS.get(model_type, {}), **overrides}.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A randomly initialised model of `model_type`, in eval mode, on the CPU."""
    config = tiny_config(model_type, **overrides)
    from .building import build_causal_lm

    torch.manual_seed(seed)
    model = build_causal_lm(config)
    _spread_router_biases(model)
    return model.eval()


def _spread_router_biases(model: PreTrainedModel) -> None:
    """Random score-correction biases and hash tables (DeepSeek-V4's token → experts `tid2eid`,
    k distinct experts a token), so that tests exercise them (they start at zero)."""
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn_like(buf) * 0.05)
        if name.endswith("tid2eid"):
            experts = model.config.get_text_config().num_local_experts
            buf.copy_(torch.rand(buf.shape[0], experts).argsort(dim=1)[:, :buf.shape[1]])


_CAUSAL_LM_WITHOUT_MAPPING = ("mistral4",)  # a causal-LM class, but no entry in transformers' auto mapping


def moe_families() -> list[str]:
    """Every causal-LM MoE family of the installed transformers, one model type each: a model
    directory whose modeling code holds routed experts and that has a causal-LM class (the text
    model's type where a composite image-text model has one of its own)."""
    from pathlib import Path

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    by_dir: dict[str, list[str]] = {}
    for model_type in [*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *_CAUSAL_LM_WITHOUT_MAPPING]:
        if model_type in CONFIG_MAPPING_NAMES:
            by_dir.setdefault(model_type_to_module_name(model_type), []).append(model_type)
    families = []
    for directory, types in sorted(by_dir.items()):
        code = "".join(f.read_text() for f in (root / directory).glob("modeling_*.py"))
        if re.search(r"use_experts_implementation|self\.experts\b", code):
            families.append(next((t for t in types if t.endswith("_text")), sorted(types)[0]))
    return families


def supported_architectures() -> list[str]:
    """The MoE families moeviz was checked on: every causal-LM MoE family of the installed
    transformers that it does not refuse (`moe_families`)."""
    return sorted(set(moe_families()) - {f.model_type for f in FAMILIES.values() if f.refused})
