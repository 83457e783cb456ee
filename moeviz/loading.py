"""Loading models and tokenizers: the shipped demo, a local path, or a Hugging Face hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from .adapters import check_reading, execution_device, get_adapter
from .building import causal_lm_class, check_fits, model_bytes, skeleton
from .checkpoint import DEMO, fingerprint, local_dir, read_config, resolve_source

__all__ = ["DEMO", "load_model", "load_skeleton", "load_config", "load_tokenizer", "local_dir", "model_fingerprint",
           "resolve_device", "resolve_source", "execution_device"]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all (one TCP connection), so that an offline
    machine fails at once instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but torch sees no GPU (is this a CPU build of torch?).")
    return dev


def load_config(name_or_path: str, trust_remote_code: bool = False):
    source = resolve_source(name_or_path)
    if not Path(source).is_dir():  # a hub id: the local cache first, then the hub only if it answers
        from transformers import AutoConfig

        try:
            from transformers import PretrainedConfig

            from .checkpoint import aliased_config

            fields = PretrainedConfig.get_config_dict(source, local_files_only=True)[0]
            if (alias := aliased_config(fields, trust_remote_code)) is not None:
                return alias
            return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
        except OSError:
            if not hub_reachable():
                raise OSError(f"{name_or_path!r} is not a local checkpoint, not in the Hugging Face cache, and the "
                              "Hub cannot be reached from here (offline?).") from None
    try:
        return read_config(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise OSError(
            f"Could not load the config of {name_or_path!r}: not a local checkpoint, and the "
            f"Hugging Face Hub did not provide it (offline, a typo, or a gated model?). {err}"
        ) from err


def load_model(
    name_or_path: str | os.PathLike = DEMO,
    device: str = "auto",
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    offload: bool = False,
) -> tuple[PreTrainedModel, object | None]:
    """Load a MoE causal LM and its tokenizer (None when the checkpoint has none).

    The architecture is checked from the config before any weight is read, so an
    unsupported model fails fast, and so is the size: a model that cannot fit where it is
    asked to go is refused in one line naming the options. The weights keep the checkpoint's
    dtype (bf16 stays bf16, on the CPU too) unless `dtype` says otherwise. `device_map="auto"`
    spreads a large model over all GPUs. `offload=True` keeps the weights in CPU memory and
    brings each module to `device` only while it runs (accelerate's `cpu_offload`).
    """
    if offload and device_map is not None:
        raise ValueError("Use either offload or device_map, not both.")
    config = load_config(name_or_path, trust_remote_code)
    shape = skeleton(config)
    get_adapter(shape)  # raises for unsupported architectures, before any weight is read
    source = resolve_source(name_or_path)
    dev = resolve_device(device)
    dtype = parse_dtype(dtype)
    if device_map is None:
        needed = model_bytes(shape, None if dtype == "auto" else dtype)
        check_fits(needed, torch.device("cpu") if offload else dev, f"{name_or_path} ({needed / 2**30:.1f} GiB)")
    from .reload import is_pruned_export, load_exported

    if is_pruned_export(source):  # expert substitution (moeviz's or another tool's), or moeviz-only
        model = load_exported(source, config, dtype=None if dtype == "auto" else dtype,
                              device="cpu" if offload or device_map else dev)
    else:
        kwargs = dict(config=config, dtype=dtype, trust_remote_code=trust_remote_code)
        if device_map is not None:
            kwargs["device_map"] = device_map
        elif dev.type == "cuda" and not offload:
            kwargs["device_map"] = str(dev)  # straight to the GPU, not through a copy in CPU memory
        model = causal_lm_class(config).from_pretrained(source, **kwargs)
    if offload:
        try:
            from accelerate import cpu_offload
        except ImportError as err:
            raise ImportError("offload needs accelerate: pip install accelerate") from err
        model = cpu_offload(model, execution_device=dev)
    elif device_map is None:
        model.to(dev)
    model.eval()
    model.name_or_path = str(name_or_path)
    if Path(source).is_dir():
        model._moeviz_source = source  # the files these weights came from (fingerprint, restores)
    with torch.no_grad():
        check_reading(get_adapter(model))  # moeviz's reading of every MoE block against the model itself
    return model, load_tokenizer(source, trust_remote_code)


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None or "auto": the checkpoint's own dtype; else float32, bfloat16 or float16."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_skeleton(name_or_path: str | os.PathLike = DEMO, trust_remote_code: bool = False,
                  with_files: bool = False) -> PreTrainedModel:
    """The model's modules on the meta device: layers, experts and shapes, no weights read.

    `with_files`: also find the checkpoint's files (downloading a hub model's) and take their
    dtype, for work that reads the weights part by part (layer-by-layer calibration).
    """
    config = load_config(name_or_path, trust_remote_code)
    model = skeleton(config, str(name_or_path))
    get_adapter(model)  # raises for unsupported architectures, before any file is read
    if not with_files:
        return model
    from .checkpoint import Checkpoint

    files = local_dir(name_or_path)
    ckpt = Checkpoint(files)
    config.dtype = ckpt.main_dtype
    model = skeleton(config, str(name_or_path), ckpt.keys())
    model._moeviz_source = files
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(source: str, trust_remote_code: bool = False):
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        return None  # transformers would build an empty tokenizer from nothing
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return None  # e.g. a random model saved without tokenizer: use the `random` text source


def model_fingerprint(model: PreTrainedModel | str | os.PathLike) -> str:
    """A short hash of a model's config and weights (see `moeviz.checkpoint.fingerprint`), from
    a loaded model or from a checkpoint's files (without loading it)."""
    if isinstance(model, PreTrainedModel):
        return fingerprint(model)
    return fingerprint(local_dir(model))


def file_layers(name_or_path: str | os.PathLike) -> list:
    """Every MoE layer's experts, read from the checkpoint's files one expert at a time
    (`moeviz.checkpoint.FileLayer`): the weight-space analyses without loading the model."""
    from .adapters import get_adapter
    from .checkpoint import Checkpoint, FileLayer

    ckpt = Checkpoint(local_dir(name_or_path))
    return [FileLayer(ckpt, layer) for layer in get_adapter(load_skeleton(name_or_path)).layers]
