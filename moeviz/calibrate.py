"""Calibration: one pass over the data with the observer attached, cached on disk."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from .adapters import Adapter, execution_device, get_adapter
from .data import parse_source, sample_sequences
from .loading import model_fingerprint
from .observe import Observer, distributed
from .stats import STATS_VERSION, ExpertStats, StatsError

DEFAULT_CACHE_DIR = Path("cache")
Progress = Callable[[int, int], None]  # (done, total) in sequences


@dataclass(frozen=True)
class CalibConfig:
    data: str = "demo"  # a text source (see moeviz.data): demo, demo:code, a file, a dataset, random
    num_samples: int = 64  # calibration sequences
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8  # sequences per forward pass; halved on a CUDA out-of-memory error
    seed: int = 0  # sampling of texts and of probe tokens
    probe_tokens: int = 256  # per layer, tokens on which every expert runs; 0 turns probes off
    layer_by_layer: bool = False  # read one decoder layer at a time from the files (a skeleton model); same stats
    sequential_sparsity: float = 0.0  # MoE-Pruner sequential: prune each layer (this row sparsity) before the next
    sequential_nm: tuple[int, int] | None = None  # … or n:m sparsity
    device: str = "auto"  # where layer-by-layer calibration computes
    cache_dir: Path = DEFAULT_CACHE_DIR

    def key_fields(self) -> dict:
        """What the statistics depend on (batch size and cache location do not count)."""
        src = parse_source(self.data)
        fields = dict(data=str(src), num_samples=self.num_samples, seq_len=self.seq_len,
                      seed=self.seed, probe_tokens=self.probe_tokens)
        if self.sequential_sparsity or self.sequential_nm:  # other statistics: each layer sees pruned layers before it
            fields["sequential"] = dict(sparsity=self.sequential_sparsity, nm=self.sequential_nm)
        if src.kind == "file":  # an edited file is other data
            fields["data_sha256"] = hashlib.sha256(Path(src.name).read_bytes()).hexdigest()[:16]
        return fields


def cache_key(fingerprint: str, config: CalibConfig) -> str:
    blob = json.dumps(dict(config.key_fields(), model=fingerprint, version=STATS_VERSION), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(model: PreTrainedModel, config: CalibConfig, fingerprint: str | None = None) -> Path:
    fingerprint = fingerprint or model_fingerprint(model)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(getattr(model, "name_or_path", "") or "model")).strip("_")
    return Path(config.cache_dir) / f"{name[-48:]}-{cache_key(fingerprint, config)}"


def model_meta(model: PreTrainedModel, adapter: Adapter, fingerprint: str) -> dict:
    """What a stats directory records about its model (checked again on load)."""
    first = adapter.layers[0]
    return dict(
        model=str(getattr(model, "name_or_path", "")), model_fingerprint=fingerprint,
        architecture=model.config.model_type, layer_indices=adapter.layer_indices,
        num_experts=adapter.num_experts, top_k=adapter.top_k, group_count=first.group_count,
        hidden_size=first.hidden_size, intermediate_size=first.intermediate_size,
    )


def calibrate(
    model: PreTrainedModel,
    config: CalibConfig = CalibConfig(),
    tokenizer=None,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> tuple[ExpertStats, Path | None]:
    """Collect ExpertStats over `config.num_samples` sequences, or load them from the cache.

    Returns the stats and their directory (None when `use_cache` is off). A cached
    directory that is corrupted or made for another model raises `StatsError`.

    Data-parallel under `torch.distributed` (e.g. `torchrun --nproc-per-node N -m moeviz.cli
    calibrate …`): every rank holds the model and observes every N-th sequence; the sums are
    added across ranks, so every rank gets the stats of all the data; rank 0 writes the cache.
    """
    fingerprint = model_fingerprint(model)
    adapter = get_adapter(model)
    meta = model_meta(model, adapter, fingerprint)
    path = cache_path(model, config, fingerprint) if use_cache else None
    world = distributed()
    cached = path is not None and path.exists()
    if world is not None:  # every rank follows rank 0's view of the cache
        flag = [cached]
        world.broadcast_object_list(flag, src=0)
        cached = flag[0]
    if cached:
        return ExpertStats.load(path, expect={k: meta[k] for k in ("model_fingerprint", "num_experts")}), path
    tokens = sample_sequences(config.data, config.num_samples, config.seq_len, tokenizer,
                              config.seed, vocab_size=model.config.vocab_size)
    shard = tokens[world.get_rank()::world.get_world_size()] if world is not None else tokens
    if config.sequential_sparsity or config.sequential_nm:
        from .surgery import sparsify_layer

        if not config.layer_by_layer:
            raise ValueError("Sequential MoE-Pruner runs layer by layer: set layer_by_layer=True.")
        sums = observe_layers(model, shard, config, progress, prune=lambda layer, row, layer_sums: sparsify_layer(
            layer, layer_sums, config.sequential_sparsity, config.sequential_nm))
    elif config.layer_by_layer:
        sums = observe_layers(model, shard, config, progress)
    else:
        sums = observe(model, adapter, shard, config, progress)
    calibration = dict(config.key_fields(), tokens=int(tokens.numel()))
    stats = ExpertStats.from_sums(sums, dict(meta, calibration=calibration))
    if path is not None and (world is None or world.get_rank() == 0):
        try:
            stats.save(path)
        except FileExistsError:  # another process finished the same calibration first
            stats = ExpertStats.load(path, expect={"model_fingerprint": fingerprint})
    if world is not None:
        world.barrier()  # the cache exists once any rank returns
    return stats, path


def calibrate_chunks(model: PreTrainedModel, config: CalibConfig, num_chunks: int, tokenizer=None,
                     progress: Progress | None = None) -> list[ExpertStats]:
    """Stats of `num_chunks` disjoint parts of one calibration set (for stability analyses).

    Merged, they equal `calibrate(model, config)` up to the probes' sampling.
    """
    adapter = get_adapter(model)
    meta = model_meta(model, adapter, model_fingerprint(model))
    tokens = sample_sequences(config.data, config.num_samples, config.seq_len, tokenizer,
                              config.seed, vocab_size=model.config.vocab_size)
    world = distributed()  # data-parallel as in `calibrate`: each rank observes a shard of each chunk
    chunks = []
    for i, part in enumerate(torch.tensor_split(tokens, num_chunks)):
        if world is not None:
            part = part[world.get_rank()::world.get_world_size()]
        sums = observe(model, adapter, part, config)
        chunks.append(ExpertStats.from_sums(sums, dict(meta, calibration=dict(config.key_fields(), chunk=i))))
        if progress is not None:
            progress(i + 1, num_chunks)
    return chunks


def observe(model, adapter: Adapter, tokens: torch.Tensor, config: CalibConfig,
            progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Run the model over `tokens` (N, L) with an observer attached; return its sums.

    On a CUDA out-of-memory error the pass starts again with half the batch size (a partly
    observed batch would leave some layers' sums ahead of others).
    """
    batch_size = config.batch_size
    while True:
        try:
            return _observe_pass(model, adapter, tokens, config, batch_size, progress)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            torch.cuda.empty_cache()


def observe_layers(model, tokens: torch.Tensor, config: CalibConfig, progress: Progress | None = None,
                   prune=None) -> dict[str, torch.Tensor]:
    """`observe`, one decoder layer at a time from the checkpoint's files (`moeviz.layerwise`):
    `model` is a skeleton from `load_skeleton(…, with_files=True)`. Progress counts layers."""
    from .checkpoint import Checkpoint
    from .layerwise import observe_layerwise
    from .loading import resolve_device

    source = getattr(model, "_moeviz_source", None)
    if source is None:
        raise ValueError("Layer-by-layer calibration reads the checkpoint's files: load the model with "
                         "load_skeleton(name, with_files=True).")
    return observe_layerwise(model, Checkpoint(source), tokens, config.probe_tokens, config.seed,
                             config.batch_size, resolve_device(config.device), progress, prune)


def _observe_pass(model, adapter, tokens, config, batch_size, progress):
    observer = Observer(adapter, probe_tokens=config.probe_tokens, seed=config.seed)
    device = execution_device(model)
    with torch.inference_mode(), observer.attached():
        for start in range(0, len(tokens), batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            if progress is not None:
                progress(min(start + batch_size, len(tokens)), len(tokens))
        return observer.sums()


__all__ = ["CalibConfig", "calibrate", "cache_key", "cache_path", "StatsError"]
