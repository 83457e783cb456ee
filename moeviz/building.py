"""A model built from its config, and its size against the memory it would go to.

`skeleton` builds the model's modules with every tensor on the meta device (no memory, no
weights read): enough to list layers, make plans and draw the dashboard's pages.
`causal_lm_class` finds the class to build or load a config with; `check_fits` refuses a load
that cannot fit before any weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# ---- skeletons and sizes ------------------------------------------------------------------
def skeleton(config, name: str = "", keys: list[str] | None = None) -> PreTrainedModel:
    """The model's modules with every tensor on the meta device: no memory, no weights read.

    Enough for the adapter to list layers, experts and shapes; not for running the model. With
    the checkpoint's tensor names (`keys`), it names its tensors as those files do, as a model
    that `from_pretrained` read from them would (a composite checkpoint's `model.language_model.`).
    """
    with torch.device("meta"):
        model = build_causal_lm(config)
    model.name_or_path = name
    if keys is not None:
        _adopt_conversions(model, keys)
    return model.eval()


def _adopt_conversions(model: PreTrainedModel, keys: list[str]) -> None:
    """Keep the weight conversions that `from_pretrained` would apply to these file keys, as it
    does, so that saving (and moeviz's file names, `reload.file_tensors`) reverts exactly them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if not isinstance(t, WeightRenaming)]
    for key in keys:
        rename_source_key(key, renamings, converters)
    model._weight_conversions = [t for t in mapping if t.was_used()]


def causal_lm_class(config):
    """The causal-LM class of a config: transformers' auto mapping, or else the `…ForCausalLM` class
    its family's modeling code defines (Mistral-4 has one but no mapping)."""
    import importlib

    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    package = type(config).__module__.rsplit(".", 1)[0]
    module = importlib.import_module(f"{package}.modeling_{package.rsplit('.', 1)[-1]}")
    found = [c for name, c in vars(module).items() if name.endswith("ForCausalLM") and isinstance(c, type)
             and getattr(c, "config_class", None) is type(config)]
    if not found:
        raise ValueError(f"Unsupported architecture: {config.model_type}: transformers has no causal-LM class for it.")
    return found[0]


def build_causal_lm(config) -> PreTrainedModel:
    """A new causal LM of `config` (random weights, or meta ones under `torch.device("meta")`)."""
    from transformers import AutoModelForCausalLM

    cls = causal_lm_class(config)
    return cls.from_config(config) if cls is AutoModelForCausalLM else cls._from_config(config)


def model_bytes(model: PreTrainedModel, dtype: torch.dtype | None = None) -> int:
    """Bytes of every parameter and buffer, in `dtype` where given (floating tensors only)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        size = t.element_size() if dtype is None or not t.is_floating_point() else torch.finfo(dtype).bits // 8
        total += t.numel() * size
    return total


def available_bytes(device: torch.device) -> int:
    """Free memory where the weights would go: the GPU's free memory, or the RAM the kernel
    calls available. `MOEVIZ_MAX_MEMORY` (bytes, or with a K/M/G suffix) caps it."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = _meminfo_available()
    cap = os.environ.get("MOEVIZ_MAX_MEMORY")
    return min(free, parse_bytes(cap)) if cap else free


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def parse_bytes(text: str) -> int:
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(text[-1:], 1)
    return int(float(text.rstrip("KMGT")) * scale)


class DoesNotFit(MemoryError):
    """A model that would not fit where it was asked to go."""


def check_fits(needed: int, device: torch.device, what: str) -> None:
    """Refuse, in one line naming the options, a load of `needed` bytes that cannot fit."""
    free = available_bytes(device)
    if needed > free:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        raise DoesNotFit(
            f"{what} needs {needed / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB of {where} is free: "
            "spread it over several GPUs (--device-map auto), keep the weights in CPU memory and run "
            "one module at a time on the GPU (--offload), or load a smaller dtype (--dtype bfloat16)."
        )
