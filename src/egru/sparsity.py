"""Activity, backward activity, weight density and effective multiply-accumulates (SPEC §2–3).

Everything here is computed from :class:`~egru.state.LayerRecord` s, the same way whichever
backend produced them. Effective MACs are what an event-driven layer must do for the observed
events, counting only nonzero weights (pruned ones cost nothing):

* forward: per step, the nonzero weights of every active input (a first layer: every input) and
  of every unit that fired at the previous step — ``3H·(|inputs active| + |A_{t-1}|)`` when no
  weight is pruned;
* backward: ``W_hᵀδ_t`` at the units in ``G_{t-1}`` (fired or inside the surrogate's support),
  the weight gradients over the same events as the forward products, and a stacked layer's
  input gradient ``W_iᵀδ_t`` over all its nonzero weights.

The dense counts are those of the same shapes with every weight and unit: ``3H·(I + H)``
forward (:func:`dense_macs`; an LSTM, with four gates, ``4H·(I + H)``), and backward
``3H·(I + 2H)``, ``3H·(2I + 2H)`` where the input needs a gradient (:func:`dense_backward_macs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .diagnostics import UnitHealth, unit_health
from .state import LayerRecord


@dataclass(frozen=True)
class LayerStats:
    activity: float  # mean event rate over units, valid steps and samples
    backward_activity: float  # fraction of units active or inside the surrogate's support
    effective_macs: int  # forward MACs an event-driven layer does for the observed events
    dense_macs: int  # forward MACs a dense layer of the same shape does
    steps: int  # valid (sample, step) pairs counted
    backward_effective_macs: int  # backward MACs for the observed events (module docstring)
    backward_dense_macs: int  # backward MACs of a dense layer of the same shape
    weight_density_ih: float = 1.0  # fraction of nonzero input weights
    weight_density_hh: float = 1.0  # fraction of nonzero recurrent weights
    health: Optional[UnitHealth] = None  # an event layer's silent and saturated units, thresholds

    @property
    def activity_sparsity(self) -> float:
        return 1.0 - self.activity

    @property
    def backward_sparsity(self) -> float:
        return 1.0 - self.backward_activity


def layer_stats(record: LayerRecord) -> LayerStats:
    """Statistics of one layer's call (see the module docstring)."""
    with torch.no_grad():
        valid = record.valid
        n_valid = int(valid.sum())
        units = record.e.shape[-1]
        D = units // record.hidden_size
        fired = record.e != 0
        in_support = (record.c_hat - record.threshold).abs() < record.support
        per_step = valid.unsqueeze(-1)
        activity = float((fired & per_step).sum()) / max(n_valid * units, 1)
        backward = float(((fired | in_support) & per_step).sum()) / max(n_valid * units, 1)
        effective = int((record.forward_macs * per_step).sum())
        backward_effective = int((record.backward_macs * per_step).sum())
    I, H = record.input_size, record.hidden_size
    return LayerStats(activity, backward, effective, dense_macs(I, H) * n_valid * D, n_valid,
                      backward_effective,
                      dense_backward_macs(I, H, input_grad=record.input_grad) * n_valid * D,
                      *record.weight_density.tolist(), health=unit_health(record))


def model_stats(records: list[LayerRecord]) -> LayerStats:
    """One :class:`LayerStats` over several layers: rates weighted by units, MACs summed,
    densities weighted by the matrices' sizes."""
    stats = [layer_stats(r) for r in records]
    weights = [r.e.shape[-1] * s.steps for r, s in zip(records, stats)]
    total = max(sum(weights), 1)
    ih = [r.input_size * r.e.shape[-1] for r in records]  # entries of W_ih over directions (/3)
    hh = [r.hidden_size * r.e.shape[-1] for r in records]
    return LayerStats(
        activity=sum(w * s.activity for w, s in zip(weights, stats)) / total,
        backward_activity=sum(w * s.backward_activity for w, s in zip(weights, stats)) / total,
        effective_macs=sum(s.effective_macs for s in stats),
        dense_macs=sum(s.dense_macs for s in stats),
        steps=sum(s.steps for s in stats),
        backward_effective_macs=sum(s.backward_effective_macs for s in stats),
        backward_dense_macs=sum(s.backward_dense_macs for s in stats),
        weight_density_ih=sum(n * s.weight_density_ih for n, s in zip(ih, stats)) / max(sum(ih), 1),
        weight_density_hh=sum(n * s.weight_density_hh for n, s in zip(hh, stats)) / max(sum(hh), 1),
    )


def dense_macs(input_size: int, hidden_size: int, gates: int = 3) -> int:
    """Forward MACs per sample and step of one dense recurrent layer (one direction):
    ``gates·H·(I + H)``, the entries of its input and recurrent weight matrices. ``gates``: 3 for
    a GRU (and the EGRU run densely), 4 for an LSTM."""
    return gates * hidden_size * (input_size + hidden_size)


def dense_backward_macs(input_size: int, hidden_size: int, gates: int = 3, input_grad: bool = False) -> int:
    """Backward MACs per sample and step of one dense recurrent layer (one direction): the
    weight gradients of both matrices and ``W_hᵀδ``, ``gates·H·(I + 2H)``; where the input needs
    a gradient (a stacked layer's) also ``W_iᵀδ``, ``gates·H·I`` more."""
    return gates * hidden_size * ((2 if input_grad else 1) * input_size + 2 * hidden_size)


def dense_layer_stats(input_size: int, hidden_size: int, steps: int, gates: int = 3,
                      input_grad: bool = False, weight_density: tuple = (1.0, 1.0)) -> LayerStats:
    """The :class:`LayerStats` of a dense layer (``torch.nn.GRU``/``LSTM``) over ``steps`` valid
    (sample, step) pairs: every unit active, every nonzero weight used (``weight_density`` of
    its input and recurrent matrices: a pruned layer run by sparse-weight kernels)."""
    d_ih, d_hh = weight_density
    I, H = input_size, hidden_size
    forward = round(gates * H * (I * d_ih + H * d_hh)) * steps
    backward = round(gates * H * ((2 if input_grad else 1) * I * d_ih + 2 * H * d_hh)) * steps
    return LayerStats(activity=1.0, backward_activity=1.0, effective_macs=forward,
                      dense_macs=dense_macs(I, H, gates) * steps, steps=steps,
                      backward_effective_macs=backward,
                      backward_dense_macs=dense_backward_macs(I, H, gates, input_grad) * steps,
                      weight_density_ih=d_ih, weight_density_hh=d_hh)
