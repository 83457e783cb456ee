"""moeviz: analyse and prune Mixture-of-Experts language models."""

from .adapters import Adapter, MoELayer, Routing, get_adapter, supported_architectures
from .analysis import router_norms
from .data import load_texts, parse_source, sample_sequences
from .loading import load_model, model_fingerprint, resolve_device

__version__ = "0.1.0"

__all__ = [
    "Adapter", "MoELayer", "Routing", "get_adapter", "supported_architectures", "router_norms",
    "load_texts", "parse_source", "sample_sequences",
    "load_model", "model_fingerprint", "resolve_device",
]
