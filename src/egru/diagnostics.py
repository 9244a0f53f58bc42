"""How an EGRU learns: the health of its units and the gradient that reaches each time step.

Two kinds of figure, cheap enough to take at every logged training step or validation:

* :func:`unit_health` of a layer's :class:`~egru.state.LayerRecord`: the fraction of units that
  are **silent** (no event anywhere in the batch and sequence: no output, and a gradient only
  through the surrogate), the fraction **saturated** (an event at nearly every step: a dense
  unit, whose reset keeps pulling its state down), the fraction of unit-steps **inside the
  surrogate's support** (where a gradient can pass ``H(ĉ − ϑ)``) and the thresholds' quantiles.
* :func:`gradient_through_time`: ``‖∂L/∂s_t‖`` for every step ``t`` of a recurrent layer's
  internal state ``s`` (the EGRU's ``c``, a GRU's ``h``, an LSTM's cell ``c``), averaged over
  the batch: the loss's reach back in time. The layer is run one step at a time from its state,
  so that every step's state is a tensor of its own that autograd can differentiate for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .state import LayerRecord

SATURATED = 0.9  # a unit firing at this fraction of the valid steps or more is saturated
QUANTILES = (0.0, 0.1, 0.5, 0.9, 1.0)


@dataclass(frozen=True)
class UnitHealth:
    silent_units: float  # fraction of units without an event in the whole call
    saturated_units: float  # fraction of units with an event at >= SATURATED of the valid steps
    in_support: float  # fraction of valid unit-steps with |ĉ − ϑ| inside the surrogate's support
    threshold_quantiles: tuple  # the thresholds at QUANTILES

    def as_dict(self) -> dict:
        return {"silent_units": self.silent_units, "saturated_units": self.saturated_units,
                "in_support": self.in_support,
                **{f"threshold_q{round(q * 100)}": v for q, v in zip(QUANTILES, self.threshold_quantiles)}}


def unit_health(record: LayerRecord) -> UnitHealth:
    """The health figures of one layer's call (see the module docstring); both directions of a
    bidirectional layer count as units of their own."""
    with torch.no_grad():
        valid = record.valid.unsqueeze(-1)  # (T, B, 1)
        steps = valid.sum().clamp(min=1)
        rate = ((record.e != 0) & valid).sum(dim=(0, 1)) / steps  # per unit, (D*H,)
        inside = ((record.c_hat - record.threshold).abs() < record.support) & valid
        units = rate.numel()
        quantiles = torch.quantile(record.threshold.double(), torch.tensor(QUANTILES, dtype=torch.float64))
        return UnitHealth(silent_units=float((rate == 0).sum()) / units,
                          saturated_units=float((rate >= SATURATED).sum()) / units,
                          in_support=float(inside.sum()) / float(steps * units),
                          threshold_quantiles=tuple(quantiles.tolist()))


def internal_state(state) -> torch.Tensor:
    """The part of a recurrent layer's state that carries it through time: the EGRU's ``c``
    (``(y, c)``), an LSTM's cell ``c`` (``(h, c)``), a GRU's ``h``."""
    return state[1] if isinstance(state, tuple) else state


def gradient_through_time(layer: nn.Module, x: torch.Tensor, loss_of, state=None) -> torch.Tensor:
    """``‖∂L/∂s_t‖`` for every step of a recurrent layer, the batch's mean.

    Args:
        layer: an :class:`egru.EGRU`, ``torch.nn.GRU`` or ``torch.nn.LSTM`` (time-major), or any
            module called as ``layer(x, state)`` that returns ``(output, state, ...)`` with such
            a state.
        x: its input, (T, B, I).
        loss_of: the loss (a scalar) of the layer's output (T, B, H); whatever follows the layer
            (more layers, a readout, the cross-entropy) is its business.
        state: the initial state (None: the layer's zeros).

    Returns:
        (T, L) norms, ``L`` the state's layers (× directions), each over the ``H`` units of a
        sample and averaged over the batch; at ``t`` the state carried into step ``t + 1`` (the
        last one reaches no output: 0). No parameter's ``.grad`` is touched.
    """
    if x.dim() != 3:
        raise ValueError(f"expected x of shape (T, B, I), got {tuple(x.shape)}")
    kept, outputs = [], []
    for x_t in x.unbind(0):
        out, state = layer(x_t.unsqueeze(0), state)[:2]
        kept.append(internal_state(state))
        outputs.append(out)
    grads = torch.autograd.grad(loss_of(torch.cat(outputs)), kept, allow_unused=True)
    return torch.stack([g.norm(dim=-1).mean(dim=-1) if g is not None else s.new_zeros(s.shape[0])
                        for g, s in zip(grads, kept)]).detach()
