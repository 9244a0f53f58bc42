"""SPEC §1 as pure tensor functions: the reference every backend is checked against.

Each equation of the EGRU cell is written once here. Backends and modules call these
functions (the reference backend) or are tested against them (fast kernels).
Shapes: ``T`` steps, ``B`` batch, ``I`` input features, ``H`` units.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .state import EGRUState


def gates(gi: torch.Tensor, gh: torch.Tensor):
    """GRU gates from the input part ``gi = W_i x + b_i`` and recurrent part ``gh = W_h y + b_h``.

    Both are ``(..., 3H)`` in ``torch.nn.GRU``'s gate order (r, z, n); the reset gate acts
    after the recurrent product, as in ``torch.nn.GRU``. Returns ``(r, z, n)``, each ``(..., H)``.
    """
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return r, z, n


def candidate_state(z: torch.Tensor, n: torch.Tensor, c_prev: torch.Tensor) -> torch.Tensor:
    """``ĉ = (1 − z) ⊙ n + z ⊙ c_{t-1}``."""
    return (1 - z) * n + z * c_prev


def zoneout(
    c_hat: torch.Tensor, c_prev: torch.Tensor, p: float, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Zoneout on the internal state (SPEC §1, regularisers).

    With a ``mask`` (training; ``m ~ Bernoulli(1 − p)`` per unit and step):
    ``ĉ ← c_{t-1} + m ⊙ (ĉ − c_{t-1})``. Without one (evaluation):
    ``ĉ ← p·c_{t-1} + (1 − p)·ĉ``, the expectation of the training form.
    """
    if mask is not None:
        return c_prev + mask * (c_hat - c_prev)
    if p > 0:
        return p * c_prev + (1 - p) * c_hat
    return c_hat


def fire(c_hat: torch.Tensor, threshold: torch.Tensor, surrogate):
    """Events, output and reset: ``e = H(ĉ − ϑ)``, ``y = e ⊙ ĉ``, ``c = ĉ − e ⊙ ϑ``.

    The event is strict (no event when ``ĉ == ϑ``); the output is the pre-reset value; the
    reset subtracts the threshold at once. ``surrogate(v)`` computes ``H(v)`` with its
    pseudo-derivative (see :mod:`egru.surrogate`). Returns ``(y, c, e)``.
    """
    e = surrogate(c_hat - threshold)
    return e * c_hat, c_hat - e * threshold, e


class StepOutput(NamedTuple):
    """One step of a cell: the new state and what the statistics need."""

    state: EGRUState
    e: torch.Tensor  # events (B, H), differentiable through the surrogate
    c_hat: torch.Tensor  # the candidate state the events were taken from (B, H)


def cell_step(
    gi: torch.Tensor,
    state: EGRUState,
    weight_hh: torch.Tensor,
    bias_hh: Optional[torch.Tensor],
    threshold: torch.Tensor,
    surrogate,
    zoneout_p: float = 0.0,
    zoneout_mask: Optional[torch.Tensor] = None,
) -> StepOutput:
    """One EGRU step given the input part of the gates ``gi = W_i x_t + b_i`` (B, 3H)."""
    gh = F.linear(state.y, weight_hh, bias_hh)
    return gated_step(gi, gh, state.c, threshold, surrogate, zoneout_p, zoneout_mask)


def gated_step(
    gi: torch.Tensor,
    gh: torch.Tensor,
    c_prev: torch.Tensor,
    threshold: torch.Tensor,
    surrogate,
    zoneout_p: float = 0.0,
    zoneout_mask: Optional[torch.Tensor] = None,
) -> StepOutput:
    """One EGRU step given both products, ``gi = W_i x_t + b_i`` and ``gh = W_h y_{t-1} + b_h``
    (each (B, 3H)), and the internal state ``c_{t-1}``."""
    _, z, n = gates(gi, gh)
    c_hat = zoneout(candidate_state(z, n, c_prev), c_prev, zoneout_p, zoneout_mask)
    y, c, e = fire(c_hat, threshold, surrogate)
    return StepOutput(EGRUState(y, c), e, c_hat)


def egru_cell(
    x: torch.Tensor,
    state: EGRUState,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    threshold: torch.Tensor,
    surrogate,
    zoneout_p: float = 0.0,
    zoneout_mask: Optional[torch.Tensor] = None,
) -> StepOutput:
    """One EGRU step from the input ``x`` (B, I) and ``state`` (each (B, H)). SPEC §1."""
    gi = F.linear(x, weight_ih, bias_ih)
    return cell_step(gi, state, weight_hh, bias_hh, threshold, surrogate, zoneout_p, zoneout_mask)


class LayerOutput(NamedTuple):
    """A layer run over a sequence, in the input's time order."""

    y: torch.Tensor  # (T, B, H) outputs, zero at padded steps
    state: EGRUState  # final state, (B, H) each: at each sequence's own last step
    e: torch.Tensor  # (T, B, H) events, zero at padded steps
    c_hat: torch.Tensor  # (T, B, H) candidate states


def reverse_padded(x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
    """Reverse each sequence of a padded ``(T, B, ...)`` tensor within its own length.

    Padded steps stay where they are, so the reverse direction of a packed sequence starts
    at each sequence's last real step. Applying it twice gives back ``x``.
    """
    if lengths is None:
        return x.flip(0)
    T = x.shape[0]
    t = torch.arange(T, device=x.device).unsqueeze(1)
    lengths = lengths.to(x.device).unsqueeze(0)
    index = torch.where(t < lengths, lengths - 1 - t, t)  # (T, B)
    index = index.view(T, -1, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(0, index)


def valid_steps(lengths: Optional[torch.Tensor], T: int, B: int, device) -> torch.Tensor:
    """``(T, B)`` boolean mask of the steps that belong to a sequence (all, without lengths)."""
    if lengths is None:
        return torch.ones(T, B, dtype=torch.bool, device=device)
    return torch.arange(T, device=device).unsqueeze(1) < lengths.to(device).unsqueeze(0)


def egru_layer(
    x: torch.Tensor,
    state: EGRUState,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: Optional[torch.Tensor],
    bias_hh: Optional[torch.Tensor],
    threshold: torch.Tensor,
    surrogate,
    *,
    lengths: Optional[torch.Tensor] = None,
    zoneout_p: float = 0.0,
    zoneout_mask: Optional[torch.Tensor] = None,
    reverse: bool = False,
) -> LayerOutput:
    """One layer and direction of an EGRU over a whole sequence (SPEC §1).

    Args:
        x: (T, B, I) input, padded past each sequence's length when ``lengths`` is given.
        state: initial ``(y_0, c_0)``, each (B, H).
        weight_ih, weight_hh: (3H, I), (3H, H); DropConnect, if any, already applied.
        bias_ih, bias_hh: (3H,) or None.
        threshold: (H,) thresholds ϑ.
        surrogate: the pseudo-derivative of the event function.
        lengths: (B,) sequence lengths, or None when every sequence has T steps.
        zoneout_p: zoneout probability p.
        zoneout_mask: (T, B, H) keep-mask in processing order (training), or None (evaluation).
        reverse: run from each sequence's last step to its first.

    Returns:
        :class:`LayerOutput` in the input's time order.
    """
    T, B = x.shape[:2]
    if reverse:
        x = reverse_padded(x, lengths)
    valid = valid_steps(lengths, T, B, x.device).unsqueeze(-1)
    gi_all = F.linear(x, weight_ih, bias_ih)  # the input product for all steps at once
    ys, es, c_hats = [], [], []
    for t in range(T):
        mask_t = None if zoneout_mask is None else zoneout_mask[t]
        step = cell_step(gi_all[t], state, weight_hh, bias_hh, threshold, surrogate, zoneout_p, mask_t)
        if lengths is None:
            state = step.state
            ys.append(step.state.y)
            es.append(step.e)
        else:  # past a sequence's end its state is held and it emits nothing
            state = EGRUState(
                torch.where(valid[t], step.state.y, state.y),
                torch.where(valid[t], step.state.c, state.c),
            )
            ys.append(step.state.y * valid[t])
            es.append(step.e * valid[t])
        c_hats.append(step.c_hat)
    y, e, c_hat = torch.stack(ys), torch.stack(es), torch.stack(c_hats)
    if reverse:
        y, e, c_hat = (reverse_padded(a, lengths) for a in (y, e, c_hat))
    return LayerOutput(y, state, e, c_hat)


def dropconnect_mask(weight: torch.Tensor, p: float) -> torch.Tensor:
    """A DropConnect mask for ``weight``: Bernoulli(1 − p) entries rescaled by 1/(1 − p)."""
    return torch.empty_like(weight).bernoulli_(1 - p) / (1 - p)


TRACE_ALPHA = 0.9  # the output trace's default decay per step


def output_trace(
    y: torch.Tensor, alpha: float = TRACE_ALPHA, trace0: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Exponential filter of the output over time: ``tr_t = α·tr_{t-1} + (1 − α)·y_t``.

    Args:
        y: (T, ...) outputs. trace0: initial trace (default zeros).
    Returns:
        (T, ...) the trace at every step.
    """
    trace = torch.zeros_like(y[0]) if trace0 is None else trace0
    out = []
    for y_t in y:
        trace = alpha * trace + (1 - alpha) * y_t
        out.append(trace)
    return torch.stack(out)


def activity_penalty(e: torch.Tensor, target: float = 0.05, weight: float = 1.0) -> torch.Tensor:
    """``weight · (mean(e) − target)²``; differentiable through the surrogate of ``e``."""
    return weight * (e.mean() - target) ** 2
