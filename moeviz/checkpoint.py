"""A model's checkpoint without its weights in memory: where its files are, its config, and
the safetensors files read tensor by tensor (memory-mapped).

`Checkpoint` reads single tensors straight from the files (`dequantize` for FP8 weights with
their scales); `parse_expert_key` and `FileLayer` find the routed experts' tensors there;
`fingerprint` identifies the weights from a strided sample of every tensor, the same whether
it reads the files or a model in memory. A model built from the config without its weights
(`skeleton`) and the fit check are in `building`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from safetensors import safe_open

from .moe_layer import ExpertWeights

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_SAMPLE_ROWS, _SAMPLE_COLS = 8, 8  # per sampled tensor, for the fingerprint
_SAMPLE_TENSORS = 256  # tensors whose values are sampled (every tensor's name and shape counts)
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                    "_attn_implementation_autoset", "_commit_hash")
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


# ---- where a checkpoint's files are ----------------------------------------------------------
DEMO = "demo"  # the default model; `demo_names()` lists every shipped one
MOEVIZ_MODEL_TYPE = "moeviz_pruned"  # the model type of a moeviz-only export: stock loaders refuse it by name


def demo_names() -> list[str]:
    """The shipped demo models' names: `demo`, `demo-fine`."""
    from .demo import DEMO_MODELS

    return list(DEMO_MODELS)


def is_demo(name_or_path: str | os.PathLike) -> bool:
    """Whether the name is one of the shipped demo models (they have the demo tasks)."""
    return str(name_or_path) in demo_names()


def demo_path(name: str = DEMO) -> Path:
    """The directory of a shipped demo model."""
    from .demo import DEMO_MODELS

    if name not in DEMO_MODELS:
        raise ValueError(f"Unknown demo model {name!r}; shipped: {', '.join(DEMO_MODELS)}")
    return DEMO_MODELS[name].path


def resolve_source(name_or_path: str | os.PathLike) -> str:
    """`demo`, `demo-fine` → the shipped checkpoints; a path must exist; anything else is a hub id."""
    name = str(name_or_path)
    if is_demo(name):
        return str(demo_path(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint.")
        return str(path)
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep + os.sep in name
    if looks_local:
        raise FileNotFoundError(f"No such model directory: {path}")
    import difflib

    close = difflib.get_close_matches(name, demo_names(), n=1, cutoff=0.75)
    if close and "/" not in name:  # a typo of a shipped name, not a hub id
        raise FileNotFoundError(f"No model {name!r}: did you mean {close[0]!r}? (shipped: {', '.join(demo_names())})")
    return name


def local_dir(name_or_path: str | os.PathLike, download: bool = True) -> str:
    """The directory holding a checkpoint's files: the path itself, or the local copy of a hub
    id (downloaded into the Hugging Face cache if it is not there yet, unless `download` is off:
    then FileNotFoundError)."""
    source = resolve_source(name_or_path)
    if Path(source).is_dir():
        return source
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
    try:
        return snapshot_download(source, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError as err:  # not downloaded yet
        if not download:
            raise FileNotFoundError(f"{source} is not in the Hugging Face cache of this machine.") from err
        return snapshot_download(source, allow_patterns=patterns)


def read_config(source: str | os.PathLike, trust_remote_code: bool = False):
    """A checkpoint's config, as `AutoConfig.from_pretrained` reads it; for a moeviz-only export
    (model type `moeviz_pruned`), the original architecture's config that it records."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    file = Path(source) / "config.json"
    if file.is_file():
        fields = json.loads(file.read_text())
        if fields.get("model_type") == MOEVIZ_MODEL_TYPE:
            original = fields.pop("moeviz")
            fields.update(model_type=original["model_type"], architectures=original["architectures"])
            return CONFIG_MAPPING[original["model_type"]].from_dict(fields)
        if (alias := aliased_config(fields, trust_remote_code)) is not None:
            return alias
    return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)


# Model types that hub configs name but transformers does not, for checkpoints that run on a
# family transformers has (their remote code is that family's): read with that family's config.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def aliased_config(fields: dict, trust_remote_code: bool = False):
    """The config of an aliased model type (Kimi-K2's `kimi_k2`: DeepSeek-V3's code) read as its
    family's, unless the user asked for the checkpoint's remote code; None for other types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = fields.get("model_type")
    if model_type not in MODEL_TYPE_ALIASES or model_type in CONFIG_MAPPING or trust_remote_code:
        return None
    fields = {k: v for k, v in fields.items() if k not in ("auto_map", "model_type")}
    return CONFIG_MAPPING[MODEL_TYPE_ALIASES[model_type]].from_dict(fields)


class Checkpoint:
    """The safetensors files of a local checkpoint directory: names, shapes, dtypes, and one
    tensor at a time, memory-mapped (reading a tensor does not read its neighbours)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path} holds no .safetensors files.")
            self.file_of = {name: file for file in files for name in _header(file)}
        self._headers = {file: _header(file) for file in set(self.file_of.values())}
        self._open: dict[Path, object] = {}

    @property
    def files(self) -> list[Path]:
        return sorted(self._headers)

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def info(self, name: str) -> dict:
        """{"dtype": "BF16", "shape": [...], "data_offsets": [...]} from the file's header."""
        return self._headers[self.file_of[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.info(name)["dtype"]]

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor (the files' size, less their headers)."""
        return sum(h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for h in self._headers.values() for n in h)

    @property
    def main_dtype(self) -> torch.dtype:
        """The dtype holding most of the bytes among 16- and 32-bit floats: the checkpoint's
        dtype, also when most weights are FP8 or integers with scales (what they dequantize to)."""
        size = Counter()
        for header in self._headers.values():
            for info in header.values():
                size[info["dtype"]] += info["data_offsets"][1] - info["data_offsets"][0]
        compute = [d for d, _ in size.most_common() if d in ("BF16", "F16", "F32", "F64")]
        return DTYPES[compute[0] if compute else size.most_common(1)[0][0]]

    def _handle(self, name: str):
        file = self.file_of[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file (a new CPU tensor of its own size)."""
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        """Unmap the files read so far (their pages leave this process's memory)."""
        self._open.clear()

    def router_weight(self, layer_idx: int, num_experts: int) -> torch.Tensor:
        """The router's (E, H) weight of decoder layer `layer_idx`, found by name and shape."""
        marker = f"layers.{layer_idx}."
        for name in self.keys():
            if marker in name and name.endswith(("gate.weight", "router.weight")) \
                    and len(self.shape(name)) == 2 and self.shape(name)[0] == num_experts:
                return self.tensor(name)
        raise KeyError(f"No router weight of layer {layer_idx} ({num_experts} rows) in {self.path}")

    def rows(self, name: str, index: list[int]) -> torch.Tensor:
        """Rows `index` (along the first dimension) of one tensor, reading only those rows."""
        part = self._handle(name).get_slice(name)
        return torch.stack([part[i:i + 1][0] for i in index]) if self.shape(name) else part[()]


def scale_key(ckpt: Checkpoint, key: str) -> str | None:
    """The scale stored beside an FP8 weight (`….weight_scale_inv`, block-wise as DeepSeek-V3 and
    Qwen3-FP8 ship; `….weight_scale`, as compressed-tensors writes), or None."""
    if not key.endswith("weight") or ckpt.dtype(key) not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    return next((key + s for s in ("_scale_inv", "_scale") if key + s in ckpt.file_of), None)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block=None) -> torch.Tensor:
    """An FP8 weight (…, O, I) times its scale: one per `block` (b₀, b₁) of a ⌈O/b₀⌉ × ⌈I/b₁⌉
    grid (the last blocks may be partial, as DeepSeek-V3's 576-row projections have; without
    `block`, the grid's cells are ⌈O/rows⌉ × ⌈I/cols⌉), per row (O,) or (O, 1), or per tensor;
    computed in float32 and cast to `dtype`, as transformers does."""
    w = weight.float()
    rows, cols = w.shape[-2:]
    s = scale.float()
    if s.dim() == 1 and s.numel() == rows:  # per output row
        s = s[:, None]
    elif s.dim() < 2:  # per tensor
        s = s.reshape(1, 1)
    block_rows, block_cols = block or (-(-rows // s.shape[-2]), -(-cols // s.shape[-1]))
    if s.shape[-2] * block_rows < rows or s.shape[-1] * block_cols < cols:
        raise ValueError(f"An FP8 weight of shape {tuple(w.shape)} is not covered by its {tuple(s.shape)} scales "
                         f"of blocks {block_rows} × {block_cols}.")
    s = s.repeat_interleave(block_rows, -2).repeat_interleave(block_cols, -1)[..., :rows, :cols]
    return (w * s).to(dtype)


# ---- expert tensors in the files ------------------------------------------------------------
_KEY = re.compile(r"^(?P<head>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?experts\.)"
                  r"(?:(?P<expert>\d+)\.(?P<name>.+)|(?P<fused>[^.]+))$")
ROLES = {"gate_proj.weight": "gate", "w1.weight": "gate", "up_proj.weight": "up", "w3.weight": "up",
          "down_proj.weight": "down", "w2.weight": "down", "gate_proj.bias": "gate_bias",
          "up_proj.bias": "up_bias", "down_proj.bias": "down_bias"}  # per-expert file names → ExpertWeights

class ExpertKey(NamedTuple):
    """A file key holding expert weights: one expert's projection, or a fused (E, …) tensor."""

    layer_idx: int
    expert_idx: int | None  # None for a fused tensor
    name: str  # "w1.weight", "down_proj.weight", … or the fused tensor's name ("gate_up_proj")
    head: str  # the key up to the expert index

    def renumbered(self, expert_idx: int) -> str:
        return f"{self.head}{expert_idx}.{self.name}"


def parse_expert_key(key: str, moe_layers) -> ExpertKey | None:
    """The expert a file key belongs to, or None when it is not a routed expert's tensor."""
    m = _KEY.match(key)
    if m is None or int(m["layer"]) not in moe_layers:
        return None
    if m["expert"] is None:
        return ExpertKey(int(m["layer"]), None, m["fused"], m["head"])
    return ExpertKey(int(m["layer"]), int(m["expert"]), m["name"], m["head"])


class FileLayer:
    """One MoE layer's experts read from the checkpoint's files, one expert at a time: what the
    weight-space analyses need of a `MoELayer` (`expert_weights`, sizes, the router), without
    the model in memory. Files with one key per expert and projection (as transformers saves)."""

    fused = False  # read expert by expert

    def __init__(self, ckpt: Checkpoint, layer):
        self.ckpt, self.layer_idx, self.num_experts = ckpt, layer.layer_idx, layer.num_experts
        self.hidden_size, self.intermediate_size = layer.hidden_size, layer.intermediate_size
        self.keys: dict[int, dict[str, str]] = {}
        for key in ckpt.keys():
            ek = parse_expert_key(key, (self.layer_idx,))
            if ek is not None and ek.expert_idx is not None and ek.name in ROLES:
                self.keys.setdefault(ek.expert_idx, {})[ROLES[ek.name]] = key
        if sorted(self.keys) != list(range(self.num_experts)):
            raise NotImplementedError(f"Layer {self.layer_idx}'s experts are not stored one key per expert in "
                                      f"{ckpt.path}; compute weight spaces from the loaded model instead.")

    def expert_weights(self, expert_idx: int) -> ExpertWeights:
        return ExpertWeights(**{"gate": None, **{role: self.ckpt.tensor(key) for role, key in self.keys[expert_idx].items()}})

    @property
    def router_weight(self) -> torch.Tensor:
        return self.ckpt.router_weight(self.layer_idx, self.num_experts)


def readable(directory: str | os.PathLike) -> None:
    """Give a directory written through a private temporary one (and safetensors' 0600 files)
    the usual permissions: what the user's umask allows, like any file they write."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for file in Path(directory).rglob("*"):
        os.chmod(file, (0o777 if file.is_dir() else 0o666) & ~umask)


def _header(file: Path) -> dict:
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


# ---- fingerprints -----------------------------------------------------------------------
def fingerprint(source: str | os.PathLike | PreTrainedModel) -> str:
    """A short hash of the config, every tensor's name and shape, and a strided sample of the
    values of up to 256 tensors spread over the model (64 numbers each).

    Two loads of the same weights agree (also in float32 from a float32 checkpoint); a pruned or
    retrained model differs. A checkpoint directory is read from its files: a few rows of a few
    hundred tensors, so a 60 GB checkpoint is not read through to describe it. A model loaded by
    moeviz from a directory is hashed from that directory; any other model (built in memory) is
    hashed as `save_pretrained` would write it.
    """
    from transformers import PreTrainedModel  # here, not at import: it loads transformers' modeling code

    if isinstance(source, PreTrainedModel):
        origin = getattr(source, "_moeviz_source", None)
        if origin is None:
            return _model_fingerprint(source)
        source = origin
    ckpt = Checkpoint(source)
    h = _config_hash(read_config(source))
    names = ckpt.keys()
    sampled = _sampled(names)
    for name in names:
        shape = ckpt.shape(name)
        _hash_tensor(h, name, shape, ckpt.rows(name, _row_index(shape)) if name in sampled else None)
    return h.hexdigest()[:16]


def _sampled(names: list[str]) -> set[str]:
    """The tensors whose values the fingerprint reads: evenly spread over the sorted names."""
    step = max(1, -(-len(names) // _SAMPLE_TENSORS))
    return set(names[::step])


def _model_fingerprint(model: PreTrainedModel) -> str:
    from transformers.core_model_loading import revert_weight_conversion

    h = _config_hash(model.config)
    state = dict(model.state_dict())
    for tied in getattr(model, "all_tied_weights_keys", None) or {}:  # not in a saved checkpoint either
        state.pop(tied, None)
    state.update(_offloaded(model, state))
    state = revert_weight_conversion(model, state)  # the names a checkpoint would hold
    names = sorted(state)
    sampled = _sampled(names)
    for name in names:
        tensor = state[name].detach()
        shape = tuple(tensor.shape)
        rows = (tensor[_row_index(shape)] if shape else tensor) if name in sampled else None
        _hash_tensor(h, name, shape, rows)
    return h.hexdigest()[:16]


def _offloaded(model: PreTrainedModel, state: dict) -> dict:
    """Name → tensor for the weights accelerate keeps off the model (meta in its state dict)."""
    found = {}
    for prefix, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            if tensor.is_meta and name in weights:
                found[f"{prefix}.{name}" if prefix else name] = weights[name]
    return found


def _config_hash(config):
    h = hashlib.sha256()
    d = config.to_dict()
    for key in _VOLATILE_CONFIG:
        d.pop(key, None)
    h.update(json.dumps(d, sort_keys=True, default=str).encode())
    return h


def _row_index(shape: tuple[int, ...]) -> list[int]:
    if not shape:
        return []
    n = shape[0]
    return sorted({round(i * (n - 1) / max(_SAMPLE_ROWS - 1, 1)) for i in range(min(n, _SAMPLE_ROWS))})


def _hash_tensor(h, name: str, shape: tuple[int, ...], rows: torch.Tensor | None) -> None:
    h.update(name.encode())
    h.update(str(shape).encode())
    if rows is None:
        return
    flat = rows.reshape(len(rows), -1) if shape else rows.reshape(1, 1)
    step = max(1, flat.shape[1] // _SAMPLE_COLS)
    h.update(flat[:, ::step][:, :_SAMPLE_COLS].float().cpu().numpy().tobytes())
