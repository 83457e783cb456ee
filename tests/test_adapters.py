import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moeviz.adapters import get_adapter
from moeviz.tiny import supported_architectures
from moeviz.analysis import weight_gram
from moeviz.loading import load_model
from moeviz.tiny import TINY_CONFIGS, tiny_model


def _capture(model, adapter, tokens):
    """The input of every MoE block and the (index, weights, output) its experts saw."""
    seen, hooks = {}, []
    for layer in adapter.layers:
        i = layer.layer_idx
        hooks.append(layer.block.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("in", i), a[0])))
        hooks.append(layer.experts.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("experts", i), (a, out))))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_adapter_matches_the_models_own_forward(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    assert adapter.layers and all(layer.num_experts == 8 and layer.top_k == 2 for layer in adapter.layers)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = _capture(model, adapter, tokens)
    for layer in adapter.layers:
        hidden = seen[("in", layer.layer_idx)].reshape(-1, layer.hidden_size)
        (x, index, weights), out = seen[("experts", layer.layer_idx)]
        with torch.no_grad():
            routing = layer.route(hidden)
            assert torch.equal(routing.top_k_index, index)
            assert torch.allclose(routing.top_k_weights, weights)
            assert routing.probs.shape == (hidden.shape[0], layer.num_experts)
            # Σ_k g_k · f_{e_k}(x) from the adapter's expert function equals the experts' output
            mine = torch.zeros_like(out)
            for k in range(layer.top_k):
                for e in index[:, k].unique().tolist():
                    rows = (index[:, k] == e).nonzero().squeeze(1)
                    _, f = layer.expert_forward(e, x[rows])
                    mine[rows] += weights[rows, k, None] * f
        torch.testing.assert_close(mine, out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_expert_weights_give_the_expert_function(model_type):
    layer = get_adapter(tiny_model(model_type)).layers[-1]
    x = torch.randn(5, layer.hidden_size)
    for e in (0, layer.num_experts - 1):
        w = layer.expert_weights(e)
        assert w.gate.shape == w.up.shape == (layer.intermediate_size, layer.hidden_size)
        assert w.down.shape == (layer.hidden_size, layer.intermediate_size)
        with torch.no_grad():
            expected = F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)
            torch.testing.assert_close(layer.expert_forward(e, x)[1], expected)


def test_gpt_oss_transposed_interleaved_weights():
    layer = get_adapter(tiny_model("gpt_oss")).layers[0]
    exp, w = layer.experts, layer.expert_weights(3)
    assert exp.gate_up_proj.shape[1:] == (layer.hidden_size, 2 * layer.intermediate_size)
    torch.testing.assert_close(w.gate, exp.gate_up_proj[3][:, 0::2].T)
    torch.testing.assert_close(w.up_bias, exp.gate_up_proj_bias[3][1::2])
    assert w.down.shape == (layer.hidden_size, layer.intermediate_size)


def test_dense_first_layers_are_skipped_and_shared_experts_found():
    adapter = get_adapter(tiny_model("deepseek_v3"))
    assert adapter.layer_indices == [1, 2]
    assert all(len(layer.shared) == 1 for layer in adapter.layers)
    assert adapter.layers[0].router_bias is not None  # the score-correction bias
    assert adapter.layers[0].group_count == 2
    with pytest.raises(KeyError, match="not a MoE layer"):
        adapter.layer(0)


class _LegacyExpert(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _LegacyBlock(nn.Module):
    """Mixtral's block as transformers 4 wrote it: a Linear router and a ModuleList of experts."""

    def __init__(self, h, i, num_experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(h, num_experts, bias=False)
        self.experts = nn.ModuleList(_LegacyExpert(h, i) for _ in range(num_experts))

    def forward(self, hidden):
        b, t, h = hidden.shape
        x = hidden.view(-1, h)
        w = F.softmax(self.gate(x), dim=1, dtype=torch.float)
        w, idx = torch.topk(w, self.top_k, dim=-1)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, k = torch.where(idx == e)
            out.index_add_(0, tok, expert(x[tok]) * w[tok, k, None])
        return out.view(b, t, h)


def test_module_list_layout():
    model = tiny_model("mixtral")
    cfg = model.config
    for decoder_layer in model.model.layers:
        decoder_layer.mlp = _LegacyBlock(cfg.hidden_size, cfg.intermediate_size, 8, 2)
    adapter = get_adapter(model)
    layer = adapter.layers[0]
    assert not layer.fused and layer.num_experts == 8 and layer.intermediate_size == cfg.intermediate_size
    x = torch.randn(1, 6, cfg.hidden_size)
    with torch.no_grad():
        routing = layer.route(x.view(-1, cfg.hidden_size))
        out = torch.zeros(6, cfg.hidden_size)
        for k in range(2):
            for t in range(6):
                e = routing.top_k_index[t, k].item()
                out[t] += routing.top_k_weights[t, k] * layer.expert_forward(e, x[0, t:t + 1])[1][0]
        torch.testing.assert_close(out, layer.block(x)[0])
    flat = torch.stack([torch.cat([w.gate.reshape(-1), w.up.reshape(-1), w.down.reshape(-1)])
                        for w in map(layer.expert_weights, range(8))]).detach().double()
    np.testing.assert_allclose(weight_gram(layer), (flat @ flat.T).numpy(), rtol=1e-5, atol=1e-6)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unsupported architecture: LlamaForCausalLM .* no sparse MoE block"):
        load_model(tmp_path)  # refused from the config's modules, before any weight is read
    assert {"mixtral", "deepseek_v3", "gpt_oss", "qwen3_5_moe_text", "mistral4"} <= set(supported_architectures())
    assert len(supported_architectures()) >= 50


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No such model directory"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_local_checkpoint_round_trip(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path, device="cpu")
    assert tokenizer is None  # a random model has none; the random text source still works
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "gpt_oss"])
def test_bf16_sorted_forward_on_cpu_pads_groups_and_returns_each_tokens_rows(model_type):
    # bf16 on the CPU pads each expert's group (few matrix shapes for oneDNN's caches);
    # every real token's rows must still be its own expert's output
    layer = get_adapter(tiny_model(model_type).to(torch.bfloat16)).layers[0]
    counts = torch.tensor([0, 1, 17, 40, 0, 3, 70, 2])
    expert_ids = torch.repeat_interleave(torch.arange(8), counts)
    x = torch.randn(int(counts.sum()), layer.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        mid, out = layer.experts_forward_sorted(x, expert_ids, counts)
        assert mid.shape == (len(x), layer.intermediate_size) and out.shape == x.shape
        for e in counts.nonzero().squeeze(1).tolist():
            rows = (expert_ids == e).nonzero().squeeze(1)
            want_mid, want_out = layer.expert_forward(e, x[rows])
            torch.testing.assert_close(mid[rows], want_mid, atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(out[rows], want_out, atol=2e-2, rtol=2e-2)
