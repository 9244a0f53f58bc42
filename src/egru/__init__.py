"""egru: event-based gated recurrent units (activity-sparse RNNs) for PyTorch."""

from . import diagnostics, functional, prune, rtrl
from .backends import available as available_backends
from .modules import EGRU, EGRUCell, init_thresholds_, keep_thresholds_in_range
from .sparsity import LayerStats, layer_stats, model_stats
from .state import EGRUState, LayerRecord
from .surrogate import FastSigmoid, Triangle, heaviside

__version__ = "0.1.0"

__all__ = [
    "EGRU",
    "EGRUCell",
    "EGRUState",
    "FastSigmoid",
    "LayerRecord",
    "LayerStats",
    "Triangle",
    "available_backends",
    "diagnostics",
    "functional",
    "heaviside",
    "init_thresholds_",
    "keep_thresholds_in_range",
    "layer_stats",
    "model_stats",
    "prune",
    "rtrl",
]
