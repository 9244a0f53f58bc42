"""The recurrent state of an EGRU: the output ``y`` and the internal state ``c`` (SPEC §1)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class EGRUState(NamedTuple):
    """State carried from one step (or call) to the next.

    Both parts are state: ``y`` is what the units last sent to each other (zero where no
    event fired), ``c`` is the internal state after the reset. Shapes are ``(..., H)``; for a
    multi-layer module ``(num_layers * num_directions, B, H)``, like ``torch.nn.LSTM``'s
    ``(h, c)``.
    """

    y: torch.Tensor
    c: torch.Tensor

    @classmethod
    def zeros(cls, *shape: int, dtype=None, device=None) -> "EGRUState":
        zero = torch.zeros(*shape, dtype=dtype, device=device)
        return cls(zero, zero.clone())

    def detach(self) -> "EGRUState":
        """The same values cut from the autograd graph (for truncated BPTT)."""
        return EGRUState(self.y.detach(), self.c.detach())

    def layer(self, index: int) -> "EGRUState":
        """The state of one layer/direction of a stacked state ``(L*D, B, H)``."""
        return EGRUState(self.y[index], self.c[index])

    @classmethod
    def stack(cls, states: list["EGRUState"]) -> "EGRUState":
        """Inverse of :meth:`layer`: stack per-layer states into ``(L*D, B, H)``."""
        return cls(torch.stack([s.y for s in states]), torch.stack([s.c for s in states]))


class LayerRecord(NamedTuple):
    """What one layer did during a call, for statistics, plots and regularisers.

    Tensors are time-major and padded like the layer's input; directions are concatenated
    along the last axis as in the layer's output (``D`` = 1 or 2).
    """

    e: torch.Tensor  # (T, B, D*H) events; differentiable through the surrogate where the backend allows
    c_hat: torch.Tensor  # (T, B, D*H) candidate states the events were taken from
    threshold: torch.Tensor  # (D*H,) thresholds, detached
    valid: torch.Tensor  # (T, B) bool, steps that belong to a sequence
    input_active: torch.Tensor  # (T, B) nonzero inputs per step (all I for a dense first layer)
    recurrent_active: torch.Tensor  # (T, B, D) units that sent an event into each step
    input_size: int
    hidden_size: int
    support: float  # half-width of the surrogate's support
    # Multiply-accumulates an event-driven layer does per step, counting only nonzero weights
    # (see egru.sparsity); directions along the last axis:
    forward_macs: torch.Tensor  # (T, B, D) input and recurrent products
    backward_macs: torch.Tensor  # (T, B, D) W_hᵀδ, the weight gradients and a stacked layer's W_iᵀδ
    weight_density: torch.Tensor  # (2,) fraction of nonzero entries of W_ih and W_hh, over directions
    input_grad: bool  # whether the input needed a gradient (a stacked layer's: W_iᵀδ is done)
