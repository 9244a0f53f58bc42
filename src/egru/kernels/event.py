"""The event-driven CPU layer: ``backend="event"`` and ``backend="auto"`` (SPEC §1, §2).

Both have the signature of :func:`egru.functional.egru_layer` and agree with it (outputs, final
state, events and every gradient) to float rounding. The work follows the events:

* forward, the recurrent product touches only the rows of ``W_hhᵀ`` of units that fired at the
  previous step (``3H·|A_{t-1}|`` MACs per sample and step, counted in :data:`counters`); the
  input product is one dense matmul for all steps, or event-driven when the input is itself
  sparse (a stacked layer's input is the previous layer's ``y``);
* backward (sparse BPTT), ``W_hhᵀ·δ_t`` is computed only for units that fired or lie inside the
  surrogate's support at step ``t−1``, the recurrent weight gradient only from units that fired;
  the input gradients are one matmul after the time loop.

What is saved for the backward pass is the gates ``(r, z, n)``, ``W_hn y + b_hn``, the outputs
and candidate states; events and previous states are recomputed from them exactly.

Supported: CPU tensors of float32 or float64, the :class:`~egru.surrogate.Triangle` surrogate,
numba installed. All module features work: stacked and bidirectional layers, given state,
packed sequences (lengths), zoneout (training mask and evaluation form), DropConnect. The
``e`` and ``c_hat`` outputs are differentiable too, so the activity regulariser works.
Differences from the reference: ``c_hat`` is zero at padded steps (the reference computes a
meaningless value there; statistics ignore padded steps), and the backward pass cannot be
differentiated again (double backward raises an error).

Where a combination is not supported (another surrogate, CUDA tensors, another dtype, numba
missing), ``"event"`` warns once and computes with the reference backend; ``"auto"`` silently
does the same. ``"auto"`` also chooses the reference (dense products) per call where the
event-driven kernels would be slower: forward only (no gradient needed), at least
``PARALLEL_MIN_BATCH`` samples, and an activity of at least ``AUTO_ACTIVITY_LIMIT`` at this
layer's previous call.
"""

from __future__ import annotations

import importlib
import math
import warnings
import weakref
from typing import Optional

import torch

from ..functional import LayerOutput, egru_layer, reverse_padded, valid_steps
from ..state import EGRUState
from ..surrogate import Triangle

_NUMBA_MODULE = "egru.kernels._event_numba"
_kernels = None  # the numba module once imported
_warned: set = set()  # reasons already warned about, so each warns once


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"egru backend 'event': {reason}; using the reference backend instead",
                      RuntimeWarning, stacklevel=4)


def load_kernels():
    """The numba kernel module, or None when numba cannot be imported."""
    global _kernels
    if _kernels is None:
        try:
            _kernels = importlib.import_module(_NUMBA_MODULE)
        except ImportError:
            return None
    return _kernels


def unsupported(x: torch.Tensor, weight_hh: torch.Tensor, surrogate) -> Optional[str]:
    """Why the event kernels cannot compute this call, or None when they can."""
    if type(surrogate) is not Triangle:
        return f"surrogate {type(surrogate).__name__} is not supported (only Triangle)"
    if x.device.type != "cpu" or weight_hh.device.type != "cpu":
        return f"device {x.device.type} is not supported (CPU only)"
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype} is not supported (float32 or float64)"
    if load_kernels() is None:
        return "numba is not installed"
    return None


class Counters:
    """Multiply-accumulates the event kernels actually performed, summed over calls.

    ``recurrent``: forward recurrent product, ``3H·Σ|A_{t-1}|`` over valid steps and samples;
    ``input``: forward input product when it ran event-driven (``3H·nnz(x)`` over valid steps);
    ``backward_recurrent``: ``W_hᵀδ`` products; ``backward_weight``: recurrent weight gradient.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.recurrent = self.input = self.backward_recurrent = self.backward_weight = 0
        self.calls = 0


counters = Counters()

# Sparse input products pay off below this density of nonzeros in x.
SPARSE_INPUT_DENSITY = 0.3


class _TransposeCache:
    """``w.t().contiguous()`` of parameters, kept while a parameter is unchanged.

    A transpose of ``W_hh`` costs about as much as the whole recurrent product of a short,
    very sparse sequence; parameters change only at optimiser steps (their ``_version``).
    """

    def __init__(self, size: int = 32):
        self.size = size
        self.entries: dict = {}

    def get(self, w: torch.Tensor) -> torch.Tensor:
        if w.requires_grad and w.grad_fn is not None:  # a fresh product (DropConnect): no reuse
            return w.detach().t().contiguous()
        key = id(w)
        hit = self.entries.get(key)
        if hit is not None and hit[0]() is w and hit[1] == w._version:
            return hit[2]
        w_t = w.detach().t().contiguous()
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[key] = (weakref.ref(w), w._version, w_t)
        return w_t


_transposed = _TransposeCache()


def _zeros_like_bias(w: torch.Tensor) -> torch.Tensor:
    return torch.zeros(w.shape[0], dtype=w.dtype)


class _EventLayer(torch.autograd.Function):
    """One layer/direction in processing order: ``(y, c_hat, e, y_last, c_last)``."""

    @staticmethod
    def forward(ctx, x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zmask, zoneout_p, gamma, k):
        K = load_kernels()
        T, B, I = x.shape
        H = w_hh.shape[1]
        G = 3 * H
        b_ih_ = _zeros_like_bias(w_ih) if b_ih is None else b_ih.detach()
        b_hh_ = _zeros_like_bias(w_hh) if b_hh is None else b_hh.detach()
        x2 = x.detach().reshape(T * B, I)
        valid = valid_steps(lengths, T, B, x.device)
        len_np = (torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths).numpy()
        density = float((x2 != 0).sum()) / max(x2.numel(), 1)
        sparse_input = density < SPARSE_INPUT_DENSITY
        if sparse_input:
            gates = torch.empty(T * B, G, dtype=x.dtype)
            row_macs = torch.zeros(T * B, dtype=torch.int64)
            K.sparse_input_product(x2.contiguous().numpy(), _transposed.get(w_ih).numpy(),
                                   b_ih_.contiguous().numpy(), valid.reshape(-1).numpy(),
                                   gates.numpy(), row_macs.numpy())
            counters.input += int(row_macs.sum())
            gates = gates.view(T, B, G)
        else:
            gates = torch.addmm(b_ih_, x2, w_ih.detach().t()).view(T, B, G)

        if zmask is not None:
            zmode, zm = K.ZONEOUT_MASK, zmask.detach().contiguous()
        else:
            zmode = K.ZONEOUT_EVAL if zoneout_p > 0 else K.ZONEOUT_NONE
            zm = torch.zeros(1, 1, 1, dtype=x.dtype)
        y = torch.zeros(T, B, H, dtype=x.dtype)
        c_hat = torch.zeros_like(y)
        gh_n = torch.zeros_like(y)
        y_last = torch.empty(B, H, dtype=x.dtype)
        c_last = torch.empty_like(y_last)
        macs = torch.zeros(B, dtype=torch.int64)
        w_hh_t = _transposed.get(w_hh)
        parallel = _parallel(B)
        forward = K.layer_forward if parallel else K.layer_forward_serial
        forward(gates.numpy(), w_hh_t.numpy(), b_hh_.contiguous().numpy(),
                        theta.detach().contiguous().numpy(), y0.detach().contiguous().numpy(),
                        c0.detach().contiguous().numpy(), len_np, zmode, zm.numpy(),
                        float(zoneout_p), _n_chunks(G), y.numpy(), c_hat.numpy(), gh_n.numpy(),
                        y_last.numpy(), c_last.numpy(), macs.numpy())
        counters.recurrent += int(macs.sum())
        counters.calls += 1
        e = ((c_hat > theta.detach()) & valid.unsqueeze(-1)).to(x.dtype)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y0, c0, w_ih, w_hh, theta, gates, gh_n, c_hat, y, zm)
        ctx.w_hh_t = w_hh_t
        ctx.meta = (parallel, len_np, zmode, float(zoneout_p), float(gamma), float(k), sparse_input,
                    b_ih is not None, b_hh is not None)
        return y, c_hat, e, y_last, c_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_y, g_c_hat, g_e, g_y_last, g_c_last):
        K = load_kernels()
        x, y0, c0, w_ih, w_hh, theta, gates, gh_n, c_hat, y, zm = ctx.saved_tensors
        parallel, len_np, zmode, zp, gamma, k, sparse_input, has_b_ih, has_b_hh = ctx.meta
        T, B, I = x.shape
        H = y.shape[-1]
        G = 3 * H
        dummy = torch.zeros(1, 1, 1, dtype=x.dtype)

        def arr(g, shape):
            return (torch.zeros(shape, dtype=x.dtype) if g is None else g.contiguous()).numpy()

        d_gi = torch.zeros(T, B, G, dtype=x.dtype)
        d_w_hh_t = torch.zeros(H, G, dtype=x.dtype)
        d_b_hh = torch.zeros(B, G, dtype=x.dtype)
        d_theta = torch.zeros(B, H, dtype=x.dtype)
        d_y0 = torch.empty(B, H, dtype=x.dtype)
        d_c0 = torch.empty_like(d_y0)
        macs = torch.zeros(2, dtype=torch.int64)
        backward = K.layer_backward if parallel else K.layer_backward_serial
        backward(
            gates.numpy(), gh_n.numpy(), c_hat.numpy(), y.numpy(), y0.detach().contiguous().numpy(),
            c0.detach().contiguous().numpy(), theta.detach().contiguous().numpy(),
            ctx.w_hh_t.numpy(), len_np, zmode, zm.numpy(), zp, gamma, k,
            arr(g_y, (T, B, H)),
            (dummy if g_e is None else g_e.contiguous()).numpy(),
            (dummy if g_c_hat is None else g_c_hat.contiguous()).numpy(),
            g_e is not None, g_c_hat is not None,
            arr(g_y_last, (B, H)), arr(g_c_last, (B, H)),
            d_gi.numpy(), d_w_hh_t.numpy(), d_b_hh.numpy(), d_theta.numpy(), d_y0.numpy(),
            d_c0.numpy(), macs.numpy())
        counters.backward_recurrent += int(macs[0])
        counters.backward_weight += int(macs[1])

        need = ctx.needs_input_grad
        d_gi2 = d_gi.view(T * B, G)
        x2 = x.detach().reshape(T * B, I)
        dx = d_gi2.mm(w_ih.detach()).view(T, B, I) if need[0] else None
        d_w_ih = None
        if need[3]:
            if sparse_input:
                d_w_ih_t = torch.zeros(I, G, dtype=x.dtype)
                K.sparse_weight_grad(x2.contiguous().numpy(), d_gi2.numpy(), d_w_ih_t.numpy())
                d_w_ih = d_w_ih_t.t()
            else:
                d_w_ih = d_gi2.t().mm(x2)
        d_b_ih = d_gi2.sum(0) if has_b_ih and need[5] else None
        d_b_hh_ = d_b_hh.sum(0) if has_b_hh and need[6] else None
        return (dx, d_y0 if need[1] else None, d_c0 if need[2] else None, d_w_ih,
                d_w_hh_t.t() if need[4] else None, d_b_ih, d_b_hh_,
                d_theta.sum(0) if need[7] else None, None, None, None, None, None)


# Below this batch size the time loop runs on one thread (see _event_numba).
PARALLEL_MIN_BATCH = 4


def _parallel(batch: int) -> bool:
    from numba import get_num_threads

    return batch >= PARALLEL_MIN_BATCH and get_num_threads() > 1


def _n_chunks(G: int) -> int:
    """Slices of the gate rows for the recurrent product: one per thread, at least 64 rows each."""
    from numba import get_num_threads

    return max(1, min(get_num_threads(), G // 64))


def _check_lengths(lengths: Optional[torch.Tensor], T: int, B: int) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths).to("cpu", torch.int64).contiguous()
    if lengths.shape != (B,) or (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"expected lengths of shape ({B},) with values in [0, {T}], got {lengths.tolist()}")
    return lengths


def _run_event(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate,
               lengths, zoneout_p, zoneout_mask, reverse) -> LayerOutput:
    T, B = x.shape[:2]
    lengths = _check_lengths(lengths, T, B)
    xp = reverse_padded(x, lengths) if reverse else x
    y, c_hat, e, y_last, c_last = _EventLayer.apply(
        xp.contiguous(), state.y, state.c, weight_ih, weight_hh, bias_ih, bias_hh, threshold,
        lengths, zoneout_mask, zoneout_p, surrogate.dampening_factor,
        surrogate.pseudo_derivative_support)
    if reverse:
        y, e, c_hat = (reverse_padded(a, lengths) for a in (y, e, c_hat))
    return LayerOutput(y, EGRUState(y_last, c_last), e, c_hat)


def egru_layer_event(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
                     lengths=None, zoneout_p=0.0, zoneout_mask=None, reverse=False) -> LayerOutput:
    """``backend="event"``: :func:`egru.functional.egru_layer` with event-driven kernels."""
    reason = unsupported(x, weight_hh, surrogate)
    if reason is not None:
        _warn_once(reason)
        return egru_layer(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate,
                          lengths=lengths, zoneout_p=zoneout_p, zoneout_mask=zoneout_mask,
                          reverse=reverse)
    return _run_event(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate,
                      lengths, zoneout_p, zoneout_mask, reverse)


# --- backend="auto" ----------------------------------------------------------------------------

# activity of the previous call of each layer/direction, keyed by its threshold parameter
_last_activity: dict = {}


def prefers_event(batch: int, activity: float, training: bool) -> bool:
    """Whether event-driven products beat dense ones for this call (measured, docs/speed.md).

    With a backward pass to come, the sparse BPTT beats the reference's autograd at every
    activity measured. Forward only, a dense step is one ``(B, H) × (H, 3H)`` GEMM at high
    efficiency while the event-driven step does ``activity`` of its MACs at lower efficiency,
    one sample at a time: for a few samples events always win, for many only at low activity.
    """
    if training or batch < PARALLEL_MIN_BATCH:
        return True
    return activity < AUTO_ACTIVITY_LIMIT


AUTO_ACTIVITY_LIMIT = 0.25


def egru_layer_auto(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
                    lengths=None, zoneout_p=0.0, zoneout_mask=None, reverse=False) -> LayerOutput:
    """``backend="auto"``: per call, the event-driven or the reference (dense) computation.

    The choice uses the shapes and the activity this layer/direction had at its previous call
    (unknown at the first call: event-driven). Unsupported combinations use the reference.
    """
    kwargs = dict(lengths=lengths, zoneout_p=zoneout_p, zoneout_mask=zoneout_mask, reverse=reverse)
    args = (x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate)
    if unsupported(x, weight_hh, surrogate) is not None:
        return egru_layer(*args, **kwargs)
    key = id(threshold)
    activity = _last_activity.get(key, (None, 0.0))
    activity = activity[1] if activity[0] is not None and activity[0]() is threshold else 0.0
    tensors = (x, state.y, state.c, weight_ih, weight_hh, bias_ih, bias_hh, threshold)
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if prefers_event(x.shape[1], activity, training):
        out = _run_event(*args, **kwargs)
    else:
        out = egru_layer(*args, **kwargs)
    with torch.no_grad():
        valid = valid_steps(lengths, x.shape[0], x.shape[1], x.device)
        fired = float(out.e.detach().sum())
        _last_activity[key] = (weakref.ref(threshold), fired / max(float(valid.sum()) * out.e.shape[-1], 1.0))
    return out
