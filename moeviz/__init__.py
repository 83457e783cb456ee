"""moeviz: analyse and prune Mixture-of-Experts language models.

The names below are imported on first use (PEP 562), so that `import moeviz` and the command
line's `--help` start at once: torch, transformers and scipy load when a name needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {  # public name → the submodule that defines it
    **dict.fromkeys(["Adapter", "get_adapter"], "adapters"),
    **dict.fromkeys(["MoELayer", "Routing"], "moe_layer"),
    "supported_architectures": "tiny",
    "router_norms": "analysis",
    **dict.fromkeys(["load_texts", "parse_source", "sample_sequences"], "data"),
    **dict.fromkeys(["load_model", "model_fingerprint", "resolve_device"], "loading"),
}
__all__ = list(_WHERE)

if TYPE_CHECKING:
    from .adapters import Adapter, get_adapter
    from .analysis import router_norms
    from .data import load_texts, parse_source, sample_sequences
    from .loading import load_model, model_fingerprint, resolve_device
    from .moe_layer import MoELayer, Routing
    from .tiny import supported_architectures


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'moeviz' has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
