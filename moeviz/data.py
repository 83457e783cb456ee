"""Text sources for calibration and evaluation, packed into fixed-length token sequences.

A source is named by one string, the same in the library, the CLI and the app:
- `demo` or `demo:arithmetic,code`: the demo corpus, all domains or a subset;
- a path to a `.txt` file (one document per blank-line-separated block) or a `.jsonl` file
  (one JSON object per line with a `text` field);
- `random`: uniform random token ids (data-free calibration; needs no tokenizer);
- anything else: a `datasets` dataset, `name` or `name:config` (`c4`, `wikitext2` and
  `zyda2` are shortcuts), streamed so that nothing larger than needed is downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

# Shortcuts for the calibration sets the papers use: (dataset, config, split).
DATASET_ALIASES = {
    "c4": ("allenai/c4", "en", "validation"),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", None),
    "zyda2": ("Zyda/Zyda-2", "sample-100BT", "train"),
}
_DOCS_PER_SEQUENCE = 4  # how many documents to draw per requested sequence before packing


@dataclass(frozen=True)
class TextSource:
    kind: str  # "demo", "file", "random" or "dataset"
    name: str  # the domains, the path or the dataset name
    config: str | None = None  # dataset config

    def __str__(self) -> str:
        if self.kind == "random":
            return "random"
        if self.kind == "demo":
            return "demo" if not self.name else f"demo:{self.name}"
        return self.name if self.config is None else f"{self.name}:{self.config}"


def parse_source(spec: str | TextSource) -> TextSource:
    """Parse a source string (see the module docstring)."""
    if isinstance(spec, TextSource):
        return spec
    spec = str(spec).strip()
    if not spec:
        raise ValueError("Empty text source; try 'demo', 'random', a .txt/.jsonl path or a dataset name.")
    if spec == "random":
        return TextSource("random", "")
    if spec == "demo" or spec.startswith("demo:"):
        from .demo.corpus import DOMAINS

        domains = [d for d in spec[5:].split(",") if d]
        unknown = sorted(set(domains) - set(DOMAINS))
        if unknown:
            raise ValueError(f"Unknown demo domain(s) {unknown}; domains: {', '.join(DOMAINS)}")
        return TextSource("demo", ",".join(domains))
    if Path(spec).expanduser().suffix in (".txt", ".jsonl", ".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"No such text file: {path}")
        return TextSource("file", str(path))
    name, _, config = spec.partition(":")
    return TextSource("dataset", name, config or None)


def parse_sources(spec: str) -> list[tuple[str, str]]:
    """Several calibration sources in one string, as (name, source) pairs:
    `NAME=SOURCE,NAME=SOURCE` (a part without `=` continues the source before it, so
    `a=demo:arithmetic,code` is one source of two domains), `demo:each` (one source per demo
    domain), or one plain source (named by itself). Every source is parsed (checked) here."""
    spec = str(spec).strip()
    if spec == "demo:each":
        from .demo.corpus import DOMAINS

        pairs = [(d, f"demo:{d}") for d in DOMAINS]
    elif "=" in spec:
        pairs = []
        for part in spec.split(","):
            if "=" in part:
                name, _, source = part.partition("=")
                pairs.append((name.strip(), source.strip()))
            elif pairs:
                pairs[-1] = (pairs[-1][0], f"{pairs[-1][1]},{part.strip()}")
            else:
                raise ValueError(f"{spec!r}: a source list reads NAME=SOURCE,NAME=SOURCE,…")
    else:
        pairs = [(spec, spec)]
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{spec!r}: every source needs its own non-empty name.")
    for _, source in pairs:
        parse_source(source)
    return pairs


def mix_sources(mix: list[dict]) -> str:
    """The held-out sources of a mix (a plan's or a stats' `mix`), as one NAME=SOURCE,… string:
    each named by its demo domain, or by its position."""
    names, parts = set(), []
    for i, entry in enumerate(mix):
        source = (entry.get("calibration") or {}).get("data", "demo")
        name = source.removeprefix("demo:") if source.startswith("demo:") and "," not in source else f"source{i + 1}"
        name = name if name not in names else f"{name}{i + 1}"
        names.add(name)
        parts.append(f"{name}={source}")
    return ",".join(parts)


def load_texts(source: str | TextSource, n: int, seed: int = 0, split: str = "train") -> list[str]:
    """Up to `n` documents of a source. `split` is `train` or `heldout` (`validation` for datasets)."""
    src = parse_source(source)
    if src.kind == "demo":
        return _demo_texts(src, n, seed, split)
    if src.kind == "file":
        return _file_texts(Path(src.name), n, seed)
    if src.kind == "dataset":
        return _dataset_texts(src, n, split)
    raise ValueError("The random source has no texts; use sample_sequences.")


def sample_sequences(
    source: str | TextSource,
    num_samples: int,
    seq_len: int,
    tokenizer=None,
    seed: int = 0,
    split: str = "train",
    vocab_size: int | None = None,
) -> torch.Tensor:
    """`num_samples` token sequences of exactly `seq_len` tokens: (N, L) int64.

    Texts are tokenized, joined with the EOS token and cut into consecutive chunks, as the
    papers pack calibration data. The same arguments give the same tensor.
    """
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"Need num_samples >= 1 and seq_len >= 2, got {num_samples} and {seq_len}.")
    src = parse_source(source)
    if src.kind == "random":
        if vocab_size is None:
            vocab_size = len(tokenizer) if tokenizer is not None else None
        if not vocab_size:
            raise ValueError("The random source needs a vocab_size (or a tokenizer).")
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_samples, seq_len), generator=gen)
    if tokenizer is None:
        raise ValueError(f"The text source {src} needs a tokenizer; this model has none (use 'random').")
    needed = num_samples * seq_len
    n_docs = max(8, num_samples * _DOCS_PER_SEQUENCE)
    while True:
        texts = load_texts(src, n_docs, seed, split)
        stream = _pack(texts, tokenizer)
        if len(stream) >= needed or len(texts) < n_docs:
            break
        n_docs *= 4  # documents were shorter than guessed: draw more
    if len(stream) < needed:
        raise ValueError(
            f"{src} has {len(stream)} tokens, fewer than {num_samples} × {seq_len} = {needed}."
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(num_samples, seq_len)


def sample_mixed(spec: str, num_samples: int, seq_len: int, tokenizer=None, seed: int = 0, split: str = "train",
                 vocab_size: int | None = None, shares: list[float] | None = None) -> torch.Tensor:
    """`num_samples` sequences of one source or of several (`parse_sources`: a mix's
    NAME=SOURCE,… list), each source giving its share of them (`shares`, or even), shuffled
    together: (N, L) int64. The same arguments give the same tensor."""
    sources = parse_sources(spec)
    if len(sources) == 1:
        return sample_sequences(sources[0][1], num_samples, seq_len, tokenizer, seed, split, vocab_size)
    weights = shares if shares is not None and len(shares) == len(sources) else [1.0] * len(sources)
    total = sum(weights)
    counts = [round(num_samples * w / total) for w in weights]
    counts[max(range(len(counts)), key=weights.__getitem__)] += num_samples - sum(counts)  # exactly num_samples
    parts = [sample_sequences(source, n, seq_len, tokenizer, seed, split, vocab_size)
             for n, (_, source) in zip(counts, sources) if n > 0]
    tokens = torch.cat(parts)
    return tokens[torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))]


def _pack(texts: list[str], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def _demo_texts(src: TextSource, n: int, seed: int, split: str) -> list[str]:
    from .demo.corpus import DOMAINS, documents

    domains = src.name.split(",") if src.name else list(DOMAINS)
    per_domain = -(-n // len(domains))
    texts = [t for d in domains for t in documents(d, split, per_domain, seed)]
    random.Random(seed).shuffle(texts)  # interleave domains
    return texts[:n]


def _file_texts(path: Path, n: int, seed: int) -> list[str]:
    if path.suffix == ".txt":
        raw = path.read_text(encoding="utf-8")
        texts = [block.strip() for block in raw.split("\n\n") if block.strip()]
    else:
        texts = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'text' field") from err
    if not texts:
        raise ValueError(f"{path} holds no text.")
    return texts[:n]


def _dataset_texts(src: TextSource, n: int, split: str) -> list[str]:
    import datasets

    name, config, default_split = DATASET_ALIASES.get(src.name, (src.name, src.config, None))
    config = src.config or config
    hf_split = {"train": default_split or "train", "heldout": "validation"}.get(split, split)
    try:
        stream = datasets.load_dataset(name, config, split=hf_split, streaming=True)
    except Exception as err:  # datasets raises many types (connection, not found, gated)
        raise OSError(
            f"Could not load the dataset {name!r} (config {config!r}, split {hf_split!r}): {err}. "
            "Datasets need a connection to the Hugging Face Hub; offline, use 'demo' or a local file."
        ) from err
    texts = []
    for row in stream:
        text = row.get("text") or row.get("content") or ""
        if text.strip():
            texts.append(text)
        if len(texts) >= n:
            break
    return texts
