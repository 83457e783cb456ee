import json

import pytest
import torch
from transformers import AutoTokenizer

from moeviz.data import load_texts, parse_source, sample_sequences
from moeviz.demo import CHECKPOINT_DIR
from moeviz.demo.corpus import DOMAINS


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT_DIR)


@pytest.mark.parametrize("source", ["demo", "demo:arithmetic", f"demo:{DOMAINS[1]},{DOMAINS[2]}", "random"])
def test_sources_give_the_asked_shape_and_are_seeded(source, tokenizer):
    a = sample_sequences(source, 5, 24, tokenizer, seed=3)
    assert a.shape == (5, 24) and a.dtype == torch.long
    assert 0 <= int(a.min()) and int(a.max()) < len(tokenizer)
    assert torch.equal(a, sample_sequences(source, 5, 24, tokenizer, seed=3))
    assert not torch.equal(a, sample_sequences(source, 5, 24, tokenizer, seed=4))


def test_demo_subset_and_splits():
    texts = load_texts("demo:arithmetic", 20, seed=0)
    assert len(texts) == 20
    assert set(texts).isdisjoint(load_texts("demo:arithmetic", 20, seed=0, split="heldout"))
    mixed = load_texts("demo", 50, seed=0)
    assert len(mixed) == 50 and len(set(mixed)) > 40
    with pytest.raises(ValueError, match="Unknown demo domain"):
        parse_source("demo:poetry")


def test_local_files(tmp_path, tokenizer):
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(f"document number {i} is here" for i in range(30)))
    assert load_texts(txt, 3) == ["document number 0 is here", "document number 1 is here",
                                  "document number 2 is here"]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(50)))
    seqs = sample_sequences(str(jsonl), 4, 16, tokenizer)
    assert seqs.shape == (4, 16)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_texts(bad, 10)
    with pytest.raises(FileNotFoundError):
        parse_source(str(tmp_path / "missing.txt"))


def test_too_little_text_is_a_clear_error(tmp_path, tokenizer):
    small = tmp_path / "small.txt"
    small.write_text("tiny")
    with pytest.raises(ValueError, match="fewer than"):
        sample_sequences(str(small), 10, 64, tokenizer)


def test_random_needs_a_vocabulary():
    assert sample_sequences("random", 2, 8, vocab_size=7).max() < 7
    with pytest.raises(ValueError, match="vocab_size"):
        sample_sequences("random", 2, 8)


def test_datasets_by_name(monkeypatch, tokenizer):
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": ""}] + [{"text": f"a web page about topic {i}"} for i in range(200)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    seqs = sample_sequences("c4", 3, 16, tokenizer)
    assert seqs.shape == (3, 16)
    assert calls[0] == ("allenai/c4", "en", "validation", True)
    load_texts("wikitext:wikitext-103-raw-v1", 2, split="heldout")
    assert calls[-1] == ("wikitext", "wikitext-103-raw-v1", "validation", True)


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(OSError, match="Could not load the dataset 'allenai/c4'.*offline, use 'demo'"):
        load_texts("c4", 5)
