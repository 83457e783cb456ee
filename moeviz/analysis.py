"""Analyses of expert weights and calibration statistics. Reads; never runs the model."""

from __future__ import annotations

import numpy as np

from .adapters import Adapter


def router_norms(adapter: Adapter) -> np.ndarray:
    """‖w_e‖₂ of every expert's router row: (L, E), from the weights alone."""
    return np.stack([
        layer.router_weight.detach().float().norm(dim=-1).cpu().numpy() for layer in adapter.layers
    ])
