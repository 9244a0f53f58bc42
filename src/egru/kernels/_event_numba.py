"""Numba kernels of the event-driven EGRU layer: forward and sparse BPTT (SPEC §1, §2).

Private to :mod:`egru.kernels.event`, which validates the inputs and hands over C-contiguous
numpy arrays of one float dtype (float32 or float64). Everything is in processing order (a
reverse direction is flipped before and after). Importing this module imports numba.

Layout. ``G = 3H`` gate rows in ``torch.nn.GRU`` order (r, z, n). Recurrent weights come
transposed, ``w_hh_t`` of shape (H, G): row ``j`` is everything unit ``j`` sends, so the
event-driven product reads one contiguous row per event.

Parallelism (numba ``prange``): the time loop is sequential; inside a step, the recurrent
product is split over slices of the G gate rows (no two threads write the same entry), the
elementwise cell over samples, the backward products over units.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

ZONEOUT_NONE, ZONEOUT_MASK, ZONEOUT_EVAL = 0, 1, 2


def _jit(**options):
    """``numba.njit`` with an on-disk cache where one can be written, without one elsewhere."""

    def decorate(fn):
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:  # numba found no writable cache directory: compile in memory
            return numba.njit(cache=False, nogil=True, **options)(fn)

    return decorate


# Products may be contracted to fused multiply-adds; nothing else is relaxed, so the
# elementwise cell rounds like the reference (events are compared exactly).
_CONTRACT = {"contract"}
# Dot products may in addition be reassociated, which lets LLVM vectorise the reduction.
_REDUCE = {"contract", "reassoc"}


@_jit(fastmath=_REDUCE)
def _dot(a, b):
    """``Σ_i a[i]·b[i]`` of two 1-D arrays of the same length."""
    acc = a[0] * 0
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@_jit(fastmath=_CONTRACT)
def _axpy(out, v, row):
    """``out += v·row`` for 1-D arrays of the same length (a helper of its own, so that LLVM
    vectorises it without having to reason about the aliasing of a large kernel's arrays)."""
    for i in range(out.shape[0]):
        out[i] += v * row[i]


@_jit()
def _group_by_unit(idx, count, value, samples, start, units, ent_b, ent_v):
    """Turn per-sample event lists into per-unit lists (a counting sort).

    idx (B, H) int64: the units of sample ``b`` are ``idx[b, :count[b]]``; value (B, H): the
    value each carries, ``value[b, j]``. samples (B,) bool: which samples take part.
    Writes start (H+1,): unit ``j``'s entries are ``start[j]:start[j+1]`` of ent_b (sample)
    and ent_v (value); units (H,): the units with at least one entry. Returns their number.
    """
    B = idx.shape[0]
    H = start.shape[0] - 1
    start[:] = 0
    for b in range(B):
        if samples[b]:
            for k in range(count[b]):
                start[idx[b, k] + 1] += 1
    n_units = 0
    for j in range(H):
        if start[j + 1] > 0:
            units[n_units] = j
            n_units += 1
        start[j + 1] += start[j]
    fill = start[:H].copy()
    for b in range(B):
        if samples[b]:
            for k in range(count[b]):
                j = idx[b, k]
                ent_b[fill[j]] = b
                ent_v[fill[j]] = value[b, j]
                fill[j] += 1
    return n_units


@_jit(parallel=True, fastmath=_CONTRACT)
def layer_forward(gates, w_hh_t, b_hh, theta, y0, c0, lengths, zmode, zmask, zp, n_chunks,
                  y, c_hat, gh_n, y_last, c_last, macs):
    """One layer and direction over a whole sequence; event-driven recurrent product.

    Shapes: T steps, B samples, H units, G = 3H.
      gates (T, B, G): in: the input part of the gates ``W_ih x_t + b_ih``;
                       out: ``(r, z, n)`` of every valid step (kept for the backward pass).
      w_hh_t (H, G), b_hh (G,), theta (H,), y0 and c0 (B, H), lengths (B,) int64 in [0, T].
      zmode: ZONEOUT_NONE, ZONEOUT_MASK (keep-mask zmask (T, B, H)) or ZONEOUT_EVAL (p = zp).
      n_chunks: number of slices of the G gate rows the product is split into.
    Outputs, zero on entry:
      y, c_hat, gh_n (T, B, H): outputs, candidate states and ``W_hn y_{t-1} + b_hn``;
      y_last, c_last (B, H): state after each sample's last step;
      macs (B,) int64: multiply-accumulates done in the recurrent product, ``G·|A_{t-1}|``
      summed over the valid steps.
    Padded steps (``t >= lengths[b]``) are skipped: their outputs stay zero.
    """
    T, B, G = gates.shape
    H = G // 3
    c = c0.copy()
    # events of the previous step, per sample: act[b, :n_act[b]] (units), values in y_prev
    act = np.empty((B, H), np.int64)
    n_act = np.zeros(B, np.int64)
    y_prev = y0.copy()
    for b in range(B):
        for j in range(H):
            if y0[b, j] != 0:
                act[b, n_act[b]] = j
                n_act[b] += 1
    start = np.zeros(H + 1, np.int64)
    units = np.empty(H, np.int64)
    ent_b = np.empty(B * H, np.int64)
    ent_v = np.empty(B * H, y.dtype)
    gh = np.empty((B, G), y.dtype)
    # a 1 of the data's dtype: float32 data is computed in float32 (expf, tanhf), like torch
    one = np.ones(1, y.dtype)[0]
    width = (G + n_chunks - 1) // n_chunks
    for t in range(T):
        valid = lengths > t
        n_units = _group_by_unit(act, n_act, y_prev, valid, start, units, ent_b, ent_v)
        # gh = b_hh + Σ_{j fired} y_j · W_hh[:, j]; a row of w_hh_t is reused by every
        # sample in which that unit fired while it is in cache
        for q in prange(n_chunks):
            lo = q * width
            hi = min(G, lo + width)
            for b in range(B):
                if valid[b]:
                    gh[b, lo:hi] = b_hh[lo:hi]
            for u in range(n_units):
                j = units[u]
                for p in range(start[j], start[j + 1]):
                    b = ent_b[p]
                    v = ent_v[p]
                    _axpy(gh[b, lo:hi], v, w_hh_t[j, lo:hi])
        for b in prange(B):
            if not valid[b]:
                continue
            macs[b] += G * n_act[b]
            n = 0
            for i in range(H):
                r = one / (one + np.exp(-(gates[t, b, i] + gh[b, i])))
                z = one / (one + np.exp(-(gates[t, b, H + i] + gh[b, H + i])))
                hn = gh[b, 2 * H + i]
                nn = np.tanh(gates[t, b, 2 * H + i] + r * hn)
                cp = c[b, i]
                ch = (one - z) * nn + z * cp
                if zmode == ZONEOUT_MASK:
                    ch = cp + zmask[t, b, i] * (ch - cp)
                elif zmode == ZONEOUT_EVAL:
                    ch = zp * cp + (1 - zp) * ch
                gates[t, b, i] = r
                gates[t, b, H + i] = z
                gates[t, b, 2 * H + i] = nn
                gh_n[t, b, i] = hn
                c_hat[t, b, i] = ch
                if ch > theta[i]:  # event: output the value, reset by the threshold
                    y[t, b, i] = ch
                    y_prev[b, i] = ch
                    c[b, i] = ch - theta[i]
                    act[b, n] = i
                    n += 1
                else:
                    y_prev[b, i] = 0
                    c[b, i] = ch
            n_act[b] = n
    y_last[:] = y_prev
    c_last[:] = c


@_jit(parallel=True, fastmath=_CONTRACT)
def layer_backward(gates, gh_n, c_hat, y, y0, c0, theta, w_hh_t, lengths, zmode, zmask, zp,
                   gamma, k, g_y, g_e, g_c_hat, has_g_e, has_g_c_hat, g_y_last, g_c_last,
                   d_gi, d_w_hh_t, d_b_hh, d_theta, d_y0, d_c0, macs):
    """Sparse backpropagation through time of :func:`layer_forward` (SPEC §2).

    Surrogate ``dH/dv = gamma·max(0, 1 − k|v|)``, ``v = ĉ − ϑ``.
    Inputs: gates (T, B, G) = (r, z, n), gh_n, c_hat, y (T, B, H) from the forward pass;
      y0, c0 (B, H); theta (H,); w_hh_t (H, G); lengths, zmode, zmask, zp as in the forward;
      g_y (T, B, H) gradient of y; g_e, g_c_hat (T, B, H) gradients of the events and
      candidate states, read only if has_g_e / has_g_c_hat; g_y_last, g_c_last (B, H)
      gradients of the final state.
    Outputs, zero on entry:
      d_gi (T, B, G): gradient of the input part of the gates (``W_ih x_t + b_ih``);
      d_w_hh_t (H, G): gradient of w_hh_t; d_b_hh (B, G), d_theta (B, H): per sample;
      d_y0, d_c0 (B, H); macs (2,) int64: MACs of the cross-unit product ``W_hᵀδ`` and of
      the weight gradient.
    Only units in G_{t-1} (fired, or inside the surrogate's support) need ``W_hᵀδ_t``; only
    units in A_{t-1} (fired) contribute a column ``δ_t ⊗ y_{t-1}`` to the weight gradient.
    """
    T, B, G = gates.shape
    H = G // 3
    dy = g_y_last.copy()  # gradient reaching y_t from later steps and the final state
    dc = g_c_last.copy()  # gradient reaching c_t
    dgh = np.zeros((B, G), gates.dtype)  # gradient of W_hh y_{t-1} + b_hh at step t
    need = np.empty((B, H), np.int64)  # units of G_{t-1} per sample
    n_need = np.zeros(B, np.int64)
    start = np.zeros(H + 1, np.int64)
    units = np.empty(H, np.int64)
    ent_b = np.empty(B * H, np.int64)
    ent_v = np.empty(B * H, gates.dtype)
    for t in range(T - 1, -1, -1):
        valid = lengths > t
        for b in prange(B):
            if not valid[b]:
                continue
            for i in range(H):
                th = theta[i]
                ch = c_hat[t, b, i]
                fired = ch > th
                e = 1.0 if fired else 0.0
                sg = gamma * max(0.0, 1.0 - k * abs(ch - th))
                if t == 0:
                    cp = c0[b, i]
                else:
                    cp = c_hat[t - 1, b, i]
                    if cp > th:
                        cp = cp - th
                r = gates[t, b, i]
                z = gates[t, b, H + i]
                nn = gates[t, b, 2 * H + i]
                gy = dy[b, i] + g_y[t, b, i]
                gc = dc[b, i]
                # y = e·ĉ, c = ĉ − e·ϑ, e = H(ĉ − ϑ)
                ge = gy * ch - gc * th
                if has_g_e:
                    ge += g_e[t, b, i]
                gv = ge * sg
                gch = gy * e + gc + gv
                if has_g_c_hat:
                    gch += g_c_hat[t, b, i]
                d_theta[b, i] += -gv - gc * e
                # zoneout
                if zmode == ZONEOUT_MASK:
                    m = zmask[t, b, i]
                    gch0 = m * gch
                    gcp = gch - m * gch
                elif zmode == ZONEOUT_EVAL:
                    gch0 = (1 - zp) * gch
                    gcp = zp * gch
                else:
                    gch0 = gch
                    gcp = 0.0
                # ĉ0 = (1 − z)·n + z·c_{t-1}
                gn = gch0 * (1 - z)
                gz = gch0 * (cp - nn)
                gcp += gch0 * z
                # n = tanh(i_n + r·h_n), z = σ(i_z + h_z), r = σ(i_r + h_r)
                ga_n = gn * (1 - nn * nn)
                ga_z = gz * z * (1 - z)
                ga_r = ga_n * gh_n[t, b, i] * r * (1 - r)
                d_gi[t, b, i] = ga_r
                d_gi[t, b, H + i] = ga_z
                d_gi[t, b, 2 * H + i] = ga_n
                dgh[b, i] = ga_r
                dgh[b, H + i] = ga_z
                dgh[b, 2 * H + i] = ga_n * r
                dc[b, i] = gcp
            for i in range(G):
                d_b_hh[b, i] += dgh[b, i]
            # G_{t-1}: the units whose output gradient matters (all of them for y_0)
            n = 0
            for j in range(H):
                dy[b, j] = 0
                if t == 0:
                    need[b, n] = j
                    n += 1
                else:
                    cp = c_hat[t - 1, b, j]
                    if cp > theta[j] or gamma * max(0.0, 1.0 - k * abs(cp - theta[j])) > 0:
                        need[b, n] = j
                        n += 1
            n_need[b] = n
        y_prev = y0 if t == 0 else y[t - 1]
        n_units = _group_by_unit(need, n_need, y_prev, valid, start, units, ent_b, ent_v)
        n_fired = 0
        for p in range(start[H]):
            if ent_v[p] != 0:
                n_fired += 1
        macs[0] += G * start[H]
        macs[1] += G * n_fired
        # per unit j: dy_{t-1}[b, j] = W_hh[:, j] · δ_t[b], and ΔW_hh[:, j] += y_{t-1}[b, j]·δ_t[b]
        for u in prange(n_units):
            j = units[u]
            for p in range(start[j], start[j + 1]):
                b = ent_b[p]
                dy[b, j] = _dot(w_hh_t[j], dgh[b])
                v = ent_v[p]
                if v != 0:
                    _axpy(d_w_hh_t[j], v, dgh[b])
    d_y0[:] = dy
    d_c0[:] = dc


@_jit(parallel=True, fastmath=_CONTRACT)
def sparse_input_product(x, w_ih_t, b_ih, rows, out, macs):
    """Event-driven input product for a sparse input (a stacked layer's input is a ``y``).

    x (N, I) with N = T·B; w_ih_t (I, G) = W_ih transposed; b_ih (G,); rows (N,) bool:
    rows to compute (the others, padded steps, keep ``b_ih``). Writes out (N, G) =
    ``b_ih + Σ_{j: x[n, j] ≠ 0} x[n, j]·W_ih[:, j]`` and macs (N,) int64, ``G·nnz(x[n])``.
    """
    N, I = x.shape
    G = out.shape[1]
    for n in prange(N):
        out[n, :] = b_ih
        if not rows[n]:
            continue
        count = 0
        for j in range(I):
            v = x[n, j]
            if v != 0:
                count += 1
                _axpy(out[n], v, w_ih_t[j])
        macs[n] = G * count


@_jit(parallel=True, fastmath=_CONTRACT)
def sparse_weight_grad(x, d_out, d_w_t):
    """``d_w_t[j] = Σ_{n: x[n, j] ≠ 0} x[n, j]·d_out[n]``: the weight gradient of a product
    with a sparse input, column by column.

    x (N, I), d_out (N, G); writes d_w_t (I, G) (zero on entry). Returns the MACs done.
    """
    N, I = x.shape
    G = d_out.shape[1]
    # column-major copy of the nonzeros (a counting sort), so each thread owns a column
    start = np.zeros(I + 1, np.int64)
    for n in range(N):
        for j in range(I):
            if x[n, j] != 0:
                start[j + 1] += 1
    for j in range(I):
        start[j + 1] += start[j]
    rows = np.empty(start[I], np.int64)
    fill = start[:I].copy()
    for n in range(N):
        for j in range(I):
            if x[n, j] != 0:
                rows[fill[j]] = n
                fill[j] += 1
    for j in prange(I):
        for p in range(start[j], start[j + 1]):
            n = rows[p]
            v = x[n, j]
            _axpy(d_w_t[j], v, d_out[n])
    return G * start[I]


# Serial twins of the time-loop kernels. With few samples a step is too little work to pay for
# waking threads twice per step, so the caller picks these below a batch size.
# (getattr: with NUMBA_DISABLE_JIT=1 the decorated kernels are the Python functions themselves.)
layer_forward_serial = _jit(fastmath=_CONTRACT)(getattr(layer_forward, "py_func", layer_forward))
layer_backward_serial = _jit(fastmath=_CONTRACT)(getattr(layer_backward, "py_func", layer_backward))
