"""Calibration one decoder layer at a time, from the checkpoint's files: for models larger than
the machine's memory (DeepSeek-V3, Qwen3-235B, Mixtral-8x22B …), as llm-compressor's sequential
pipeline and GPTQ implementations do.

The model is a skeleton on the meta device; its embeddings, final norm and rotary embeddings
are read in, then each decoder layer in turn: read from the safetensors files onto the device,
every calibration batch pushed through it (its outputs kept for the next layer, on the CPU when
they would crowd the device), its statistics collected by the same observer as the ordinary
pass, and freed. Attention masks, position ids and rotary embeddings are the model's own: for
each layer and batch the model's forward runs with every decoder layer passing its input
through, up to the layer at hand, whose arguments are taken as they are.

With `prune` (MoE-Pruner's sequential mode, as fusion_bench and Wanda's reference code run it),
each layer's weight masks are applied as soon as its statistics are complete, before its
outputs are computed for the next layer: every layer is scored on the outputs of the already
pruned layers before it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import decoder_layers, get_adapter
from .checkpoint import Checkpoint, parse_expert_key
from .observe import Observer


class _Stop(Exception):
    """Raised inside the model's forward once the layer at hand has its arguments."""

    def __init__(self, args, kwargs):
        super().__init__()
        self.args, self.kwargs = args, kwargs


class LayerwiseModel:
    """A skeleton whose parts are read from the files on demand and freed after use."""

    def __init__(self, model, ckpt: Checkpoint, device: torch.device):
        from .reload import file_tensors

        self.model, self.ckpt, self.device = model, ckpt, device
        self.adapter = get_adapter(model)
        self.layers = decoder_layers(model)
        self.moe = {layer.layer_idx: layer for layer in self.adapter.layers}
        name_of = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        files = file_tensors(self.adapter)
        converted = [key for key, t in files.items() if id(t) not in name_of]
        if converted:
            raise NotImplementedError(f"transformers converts {converted[0]} (and {len(converted) - 1} more tensors) "
                                      "when it loads this checkpoint, which reading layer by layer does not follow: "
                                      "calibrate in one pass.")
        self.named = {key: name_of[id(t)] for key, t in files.items()}  # file key → tensor name
        self.keys_of: dict[int | None, list[str]] = {}  # decoder layer (None: outside the layers) → file keys
        prefix = {i: f"{name}." for name, module in model.named_modules() for i, layer in enumerate(self.layers)
                  if module is layer}
        for key in ckpt.keys():
            ek = parse_expert_key(key, self.moe)
            if ek is None and key not in self.named:
                continue  # a part this causal LM does not hold: a composite checkpoint's vision tower
            name = self.named.get(key, "")
            index = ek.layer_idx if ek is not None else next((i for i, p in prefix.items() if name.startswith(p)), None)
            self.keys_of.setdefault(index, []).append(key)

    def load_outside_layers(self) -> None:
        """Embeddings, final norm, rotary embeddings (and the output layer), not the decoder layers."""
        self._materialise(getattr(self.model, "model", self.model), skip=self.layers)  # not the output layer
        self._fill(None)

    def load_layer(self, index: int) -> nn.Module:
        self._materialise(self.layers[index])
        self._fill(index)
        return self.layers[index]

    def free_layer(self, index: int) -> None:
        self.layers[index].to("meta")

    def _materialise(self, module: nn.Module, skip: nn.Module | None = None) -> None:
        skipped = {id(m) for m in skip.modules()} if skip is not None else set()
        for sub in module.modules():
            if id(sub) in skipped:
                continue
            sub.to_empty(device=self.device, recurse=False)
            if sub._non_persistent_buffers_set:  # rotary frequencies and the like, computed
                self.model._init_weights(sub)

    @torch.no_grad()
    def _fill(self, index: int | None) -> None:
        from .reload import expert_target

        for key in self.keys_of.get(index, []):
            ek = parse_expert_key(key, self.moe)
            if ek is not None:
                target = expert_target(self.moe[ek.layer_idx], ek)
            else:  # found by name: materialising gave the module new tensors
                module, _, leaf = self.named[key].rpartition(".")
                target = getattr(self.model.get_submodule(module), leaf)
            if not target.is_meta:  # the output layer stays unread: calibration needs no logits
                target.copy_(self.ckpt.tensor(key))
        self.ckpt.close()  # let go of the files' mappings: what was read must not pile up layer after layer


@contextmanager
def _pass_through(layers: nn.ModuleList, stop_at: int):
    """Decoder layers before `stop_at` hand their input on untouched; `stop_at` raises `_Stop`."""
    def passing(hidden, *args, **kwargs):
        return hidden

    def stopping(*args, **kwargs):
        raise _Stop(args, kwargs)

    try:
        for i in range(stop_at + 1):
            layers[i].forward = stopping if i == stop_at else passing
        yield
    finally:
        for i in range(stop_at + 1):
            del layers[i].forward


def layer_arguments(model, layers: nn.ModuleList, index: int, batch: torch.Tensor):
    """The model's own arguments for decoder layer `index` on `batch` (masks, positions, rotary):
    (args, kwargs), args[0] being the embeddings (only meaningful for layer 0)."""
    with _pass_through(layers, index), torch.inference_mode():
        try:
            model.model(input_ids=batch, use_cache=False)
        except _Stop as stop:
            return stop.args, stop.kwargs
    raise RuntimeError(f"Decoder layer {index} was never called.")


@torch.inference_mode()
def observe_layerwise(model, ckpt: Checkpoint, tokens: torch.Tensor, probe_tokens: int, seed: int,
                      batch_size: int, device: torch.device, progress: Callable[[int, int], None] | None = None,
                      prune: Callable | None = None) -> dict[str, torch.Tensor]:
    """The observer's sums over `tokens` (N, L), one decoder layer at a time (see the module doc).

    `prune(layer, row, sums)`: called once a MoE layer's sums are complete, before its outputs
    are computed (MoE-Pruner's sequential mode); the layer is then run again for its outputs.
    """
    lw = LayerwiseModel(model, ckpt, device)
    lw.load_outside_layers()
    observer = Observer(lw.adapter, probe_tokens=probe_tokens, seed=seed, device=device)
    rows = {layer.layer_idx: row for row, layer in enumerate(lw.adapter.layers)}
    batches = list(torch.split(tokens, batch_size))
    hidden = [None] * len(batches)
    store = _storage(tokens, model.config.hidden_size, model.dtype, device)
    for index in range(len(lw.layers)):
        layer = lw.load_layer(index)
        with observer.attached():
            outputs = _run_layer(model, lw.layers, index, layer, batches, hidden, device)
        if index in rows:
            row = rows[index]
            observer.finish_layer(row)
            if prune is not None:
                prune(lw.moe[index], row, observer.layers[row].sums)
                outputs = _run_layer(model, lw.layers, index, layer, batches, hidden, device)
        hidden = [out.to(store) for out in outputs]
        lw.free_layer(index)
        if progress is not None:
            progress(index + 1, len(lw.layers))
    return observer.sums()


def _run_layer(model, layers, index, layer, batches, hidden, device) -> list[torch.Tensor]:
    outputs = []
    for b, batch in enumerate(batches):
        args, kwargs = layer_arguments(model, layers, index, batch.to(device))
        h = args[0] if hidden[b] is None else hidden[b].to(device)
        out = layer(h, *args[1:], **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _storage(tokens: torch.Tensor, hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.device:
    """Where the layers' outputs wait for the next layer: the device when they take under a
    quarter of its free memory, else the CPU."""
    if device.type != "cuda":
        return device
    needed = tokens.numel() * hidden_size * torch.finfo(dtype).bits // 8
    return device if needed < torch.cuda.mem_get_info(device)[0] // 4 else torch.device("cpu")
