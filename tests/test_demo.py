"""The demo corpus, its task scoring and the shipped checkpoint (no downloads, a few seconds)."""

import copy
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeviz.demo import (
    CHECKPOINT_DIR,
    DOMAINS,
    documents,
    expert_frequencies,
    routing_divergence,
    task_accuracies,
    task_accuracy,
    task_examples,
)
from moeviz.demo.corpus import ALPHABET, SEP, split_of


def _examples(texts):
    return {example for text in texts for example in text.split(SEP) if example}


# --- corpus -------------------------------------------------------------------------------


def test_at_least_five_domains_each_yield_texts_in_the_alphabet():
    assert len(DOMAINS) >= 5
    for domain in DOMAINS:
        for split in ("train", "heldout"):
            texts = documents(domain, split, 20)
            assert len(texts) == 20 and all(text.endswith(SEP) for text in texts)
            assert set("".join(texts)) <= set(ALPHABET)


def test_documents_are_deterministic_and_depend_on_the_seed():
    for domain in DOMAINS:
        assert documents(domain, "train", 10, seed=3) == documents(domain, "train", 10, seed=3)
        assert documents(domain, "train", 10, seed=3) != documents(domain, "train", 10, seed=4)


def test_heldout_examples_and_tasks_never_occur_in_training_text():
    for domain in DOMAINS:
        train = _examples(documents(domain, "train", 500))
        heldout = _examples(documents(domain, "heldout", 100))
        tasks = {item.prompt + item.answer for item in task_examples(domain, 200)}
        assert {split_of(text) for text in train} == {"train"}
        assert {split_of(text) for text in heldout | tasks} == {"heldout"}
        assert not train & (heldout | tasks)


def test_task_examples_are_distinct_deterministic_and_prefix_stable():
    for domain in DOMAINS:
        items = task_examples(domain, 200, seed=0)
        assert len(set(items)) == 200 and all(item.domain == domain and item.answer for item in items)
        assert task_examples(domain, 50, seed=0) == items[:50]
        assert task_examples(domain, 50, seed=1) != items[:50]


def test_unknown_domain_or_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="arithmetic"):
        documents("poetry", "train", 1)
    with pytest.raises(ValueError, match="heldout"):
        documents("prose", "test", 1)
    with pytest.raises(ValueError, match="dates"):
        task_examples("poetry", 1)


# --- the shipped checkpoint ----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT_DIR)
    metrics = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())
    return model.eval(), tokenizer, metrics


def test_checkpoint_is_a_small_top2_mixtral_with_16_experts(demo):
    model, tokenizer, _ = demo
    config = model.config
    assert type(model).__name__ == "MixtralForCausalLM" and config.architectures == ["MixtralForCausalLM"]
    assert config.num_hidden_layers >= 4
    assert config.num_local_experts == 16 and config.num_experts_per_tok == 2
    assert len(tokenizer) == config.vocab_size <= 512
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    assert sum(f.stat().st_size for f in CHECKPOINT_DIR.iterdir()) < 20e6


def test_tokenizer_round_trips_every_domain(demo):
    _, tokenizer, _ = demo
    for domain in DOMAINS:
        text = documents(domain, "heldout", 1)[0]
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_task_accuracies_reproduce_metrics_json(demo):
    model, tokenizer, metrics = demo
    n, seed = metrics["task_examples_per_domain"], metrics["eval_seed"]
    accuracy = task_accuracies(model, tokenizer, n=n, seed=seed)
    assert list(accuracy) == list(DOMAINS)
    for domain in DOMAINS:
        assert accuracy[domain] == pytest.approx(metrics["accuracy"][domain], abs=0.01)
    assert np.mean(list(accuracy.values())) >= 0.8


def test_teacher_forced_scoring_equals_greedy_generation(demo):
    model, tokenizer, _ = demo
    damaged = copy.deepcopy(model)  # silence half of layer 1's experts so that some answers go wrong
    with torch.no_grad():
        damaged.model.layers[1].mlp.experts.down_proj[:8] = 0
    n, all_hits = 20, []
    for domain in DOMAINS:
        hits = []
        for item in task_examples(domain, n, seed=0):
            target = item.answer + SEP
            prompt = tokenizer(item.prompt, return_tensors="pt")
            with torch.no_grad():
                out = damaged.generate(**prompt, do_sample=False, max_new_tokens=len(target))
            hits.append(tokenizer.decode(out[0, prompt.input_ids.shape[1] :]) == target)
        assert task_accuracy(damaged, tokenizer, domain, n=n, seed=0, batch_size=7) == sum(hits) / n
        all_hits += hits
    assert 0 < sum(all_hits) < len(all_hits)


def test_routing_differs_by_domain_and_uses_every_expert(demo):
    model, tokenizer, metrics = demo
    texts = {domain: documents(domain, "heldout", 64, seed=metrics["eval_seed"]) for domain in DOMAINS}
    frequencies = expert_frequencies(model, tokenizer, texts)
    assert len(frequencies) == model.config.num_hidden_layers
    for layer in frequencies:
        assert layer.shape == (len(DOMAINS), 16)
        np.testing.assert_allclose(layer.sum(1), 1.0)
        assert (layer.sum(0) > 0).all()  # no dead expert
    divergence = routing_divergence(frequencies)
    np.testing.assert_allclose(divergence, metrics["routing_js_bits"], atol=2e-3)
    assert max(divergence) > 0.2  # bits; identical usage would give 0
