"""The one place that chooses how a layer is computed.

A backend is a function with the signature of :func:`egru.functional.egru_layer`: one layer
and direction over a whole sequence, returning a :class:`~egru.functional.LayerOutput`.
Every backend is tested against ``"reference"``.
"""

from __future__ import annotations

from . import functional
from .kernels import event

_BACKENDS = {
    # Plain PyTorch autograd over a time loop: the clearest statement of SPEC §1.
    "reference": functional.egru_layer,
    # Event-driven numba kernels, forward and sparse BPTT (numba imported on first use;
    # without it, or for unsupported combinations, the reference with one warning).
    "event": event.egru_layer_event,
    # Per call the faster of event-driven and dense (reference) products.
    "auto": event.egru_layer_auto,
}


def available() -> list[str]:
    return sorted(_BACKENDS)


def resolve(name: str):
    """The layer function of backend ``name``; a clear error for an unknown name."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {available()}") from None
