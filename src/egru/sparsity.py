"""Activity, backward activity and effective multiply-accumulates (SPEC §2).

Everything here is computed from :class:`~egru.state.LayerRecord` s, the same way whichever
backend produced them. Counts are for the forward pass: an event-driven layer does
``3H·(|inputs active| + |units active at the previous step|)`` MACs per sample and step, a
dense one ``3H·(I + H)`` (:func:`dense_macs`; an LSTM, with four gates, ``4H·(I + H)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import LayerRecord


@dataclass(frozen=True)
class LayerStats:
    activity: float  # mean event rate over units, valid steps and samples
    backward_activity: float  # fraction of units active or inside the surrogate's support
    effective_macs: int  # MACs an event-driven layer does for the observed events
    dense_macs: int  # MACs a dense layer of the same shape does
    steps: int  # valid (sample, step) pairs counted

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
        gate_rows = 3 * record.hidden_size
        inputs = (record.input_active * valid).sum() * D
        recurrent = (record.recurrent_active * per_step).sum()
        effective = gate_rows * int(inputs + recurrent)
        dense = dense_macs(record.input_size, record.hidden_size) * n_valid * D
    return LayerStats(activity, backward, effective, dense, n_valid)


def model_stats(records: list[LayerRecord]) -> LayerStats:
    """One :class:`LayerStats` over several layers: rates weighted by units, MACs summed."""
    stats = [layer_stats(r) for r in records]
    weights = [r.e.shape[-1] * s.steps for r, s in zip(records, stats)]
    total = max(sum(weights), 1)
    return LayerStats(
        activity=sum(w * s.activity for w, s in zip(weights, stats)) / total,
        backward_activity=sum(w * s.backward_activity for w, s in zip(weights, stats)) / total,
        effective_macs=sum(s.effective_macs for s in stats),
        dense_macs=sum(s.dense_macs for s in stats),
        steps=sum(s.steps for s in stats),
    )


def dense_macs(input_size: int, hidden_size: int, gates: int = 3) -> int:
    """MACs per sample and step of one dense recurrent layer (one direction): ``gates·H·(I + H)``,
    the entries of its input and recurrent weight matrices. ``gates``: 3 for a GRU (and the EGRU
    run densely), 4 for an LSTM."""
    return gates * hidden_size * (input_size + hidden_size)


def dense_layer_stats(input_size: int, hidden_size: int, steps: int, gates: int = 3) -> LayerStats:
    """The :class:`LayerStats` of a dense layer (``torch.nn.GRU``/``LSTM``) over ``steps`` valid
    (sample, step) pairs: every unit active, every MAC done."""
    macs = dense_macs(input_size, hidden_size, gates) * steps
    return LayerStats(activity=1.0, backward_activity=1.0, effective_macs=macs, dense_macs=macs, steps=steps)
