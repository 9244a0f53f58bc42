"""Numba kernels of the event-driven EGRU layer: forward and sparse BPTT (SPEC §1, §2).

Private to :mod:`egru.kernels.event`, which hands over C-contiguous numpy arrays of one float
dtype (float32 or float64). Everything is in processing order (a reverse direction is flipped
before and after). Importing this module imports numba.

Layout. ``G = 3H`` gate rows in ``torch.nn.GRU`` order (r, z, n). Recurrent weights come
transposed, ``w_hh_t`` of shape (H, G): row ``j`` is everything unit ``j`` sends, so the
event-driven product reads one contiguous row per event. A sparse (pruned) weight comes in
compressed rows too (:class:`SparseRows`: per unit, the indices and values of its nonzeros), so
that an event costs the nonzeros of its row; the kernels take the dense or the compressed rows
by a flag of the bundle, and compute the same sums either way.

Arguments that travel together are bundled in named tuples (:class:`Recurrence`,
:class:`Zoneout`, :class:`Surrogate`, :class:`ForwardOutputs`, :class:`Saved`,
:class:`OutputGrads`, :class:`InputGrads`); numba compiles them like positional arguments.

Parallelism (numba ``prange``): samples are independent in the forward pass, so it runs whole
sequences per sample, one parallel region per call; a single sample runs serially (no
parallel region, no barrier per step that a busy core could stall). The backward pass runs
each step in two parallel regions, the cell over samples and the cross-unit product over
blocks of units, so that a row of the weights is read once per step for all samples. The
weight gradients, which sum over samples and steps, are left to one product each after the
time loop. Every parallel kernel has a serial twin (``*_serial``).

The on-disk cache. Every parallel kernel is an entry point called from Python; no jitted
function calls a parallel one (see the note above :func:`sparse_input_product`).
"""

from __future__ import annotations

import types
from typing import NamedTuple

import numba
import numpy as np
from numba import prange
from numba.extending import overload

ZONEOUT_NONE, ZONEOUT_MASK, ZONEOUT_EVAL = 0, 1, 2


class Recurrence(NamedTuple):
    """What every step reads besides the gates: w_hh_t (H, G), b_hh (G,), theta (H,),
    lengths (B,) int64 in [0, T] (steps ``t >= lengths[b]`` are padding and skipped)."""
    w_hh_t: np.ndarray
    b_hh: np.ndarray
    theta: np.ndarray
    lengths: np.ndarray


class SparseRows(NamedTuple):
    """A weight matrix kept by rows of its nonzeros (compressed sparse rows), used where it is
    sparse enough that an event should cost the nonzeros of its row, not the whole row.

    For ``w_t`` (R, C) (a transposed weight: row r is everything input unit r sends): row r's
    column indices ``idx[start[r]:start[r + 1]]`` (ascending) and their values in ``vals``;
    start (R + 1,) int64, idx (nnz,) uint16 where C ≤ 65536 (:func:`index_type`), vals (nnz,).
    With a pruning mask the rows list the mask's nonzeros (a weight of zero there is listed
    too). used: False for a placeholder (the kernels then read the dense rows of ``w_t``; the
    arrays are empty)."""
    used: bool
    start: np.ndarray
    idx: np.ndarray
    vals: np.ndarray


def index_type(n_cols: int):
    """The column indices' type of :class:`SparseRows` with n_cols columns: uint16 where they
    fit (the indexed updates of a compressed row ran 1.5× faster with uint16 than with int32
    or int64 indices: fewer bytes, and LLVM knows they are not negative), else int32."""
    return np.uint16 if n_cols <= 1 << 16 else np.int32


def no_rows(dtype) -> SparseRows:
    """The placeholder :class:`SparseRows` (``used`` False): dense rows."""
    return SparseRows(False, np.zeros(1, np.int64), np.zeros(0, np.uint16), np.zeros(0, dtype))


class Zoneout(NamedTuple):
    """mode: ZONEOUT_NONE, ZONEOUT_MASK (keep-mask ``mask`` (T, B, H)) or ZONEOUT_EVAL
    (``c = p·c_{t-1} + (1 − p)·ĉ``; mask is then a (1, 1, 1) placeholder)."""
    mode: int
    mask: np.ndarray
    p: float


class Surrogate(NamedTuple):
    """The triangle pseudo-derivative ``gamma·max(0, 1 − k|v|)``."""
    gamma: float
    k: float


class ForwardOutputs(NamedTuple):
    """y, c_hat, gh_n, e (T, B, H): outputs, candidate states, ``W_hn y_{t-1} + b_hn`` and
    events (1 or 0), written at the valid steps; y_last, c_last (B, H): the state after each
    sample's last step."""
    y: np.ndarray
    c_hat: np.ndarray
    gh_n: np.ndarray
    e: np.ndarray
    y_last: np.ndarray
    c_last: np.ndarray


class Saved(NamedTuple):
    """What the backward pass reads of the forward: gates (T, B, G) = (r, z, n), gh_n and
    c_hat (T, B, H), c0 (B, H) (events and earlier states are recomputed from them)."""
    gates: np.ndarray
    gh_n: np.ndarray
    c_hat: np.ndarray
    c0: np.ndarray


class OutputGrads(NamedTuple):
    """Gradients arriving at the layer's outputs: g_y (T, B, H); g_e and g_c_hat (T, B, H),
    read only where has_g_e / has_g_c_hat (else (1, 1, 1) placeholders); g_y_last and
    g_c_last (B, H) of the final state."""
    g_y: np.ndarray
    g_e: np.ndarray
    g_c_hat: np.ndarray
    has_g_e: bool
    has_g_c_hat: bool
    g_y_last: np.ndarray
    g_c_last: np.ndarray


class InputGrads(NamedTuple):
    """What the backward pass writes: d_gi (T, B, G) at the valid steps, the gradient of
    ``W_ih x_t + b_ih`` (and, but for the reset gate's factor on the n rows, of
    ``W_hh y_{t-1} + b_hh``); d_theta (B, H), zero on entry, per sample; d_y0, d_c0 (B, H)."""
    d_gi: np.ndarray
    d_theta: np.ndarray
    d_y0: np.ndarray
    d_c0: np.ndarray


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
    acc = a.dtype.type(0)  # (not a[0] * 0: an integer factor would make it float64)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@_jit(fastmath=_CONTRACT)
def _axpy(out, v, row):
    """``out += v·row`` for 1-D arrays of the same length (a helper of its own, so that LLVM
    vectorises it without having to reason about the aliasing of a large kernel's arrays)."""
    for i in range(out.shape[0]):
        out[i] += v * row[i]


@_jit(fastmath=_CONTRACT)
def _axpy4(out, v0, r0, v1, r1, v2, r2, v3, r3):
    """``out += v0·r0 + v1·r1 + v2·r2 + v3·r3``: four rows per pass over ``out``."""
    for i in range(out.shape[0]):
        out[i] += v0 * r0[i] + v1 * r1[i] + v2 * r2[i] + v3 * r3[i]


@_jit(fastmath=_CONTRACT)
def _add_rows(out, w_t, idx, coef, n, lo):
    """``out += Σ_{q<n} coef[q]·w_t[idx[q], lo:lo+len(out)]``: the event-driven product, one
    row of ``w_t`` per event (or nonzero), listed with its value.

    Four rows are added per pass over ``out``: one load and store of ``out`` per four rows
    instead of per row, so that the rows stream from the cache at close to its bandwidth.
    """
    hi = lo + out.shape[0]
    q = 0
    while q + 4 <= n:
        _axpy4(out, coef[q], w_t[idx[q], lo:hi], coef[q + 1], w_t[idx[q + 1], lo:hi],
               coef[q + 2], w_t[idx[q + 2], lo:hi], coef[q + 3], w_t[idx[q + 3], lo:hi])
        q += 4
    while q < n:
        _axpy(out, coef[q], w_t[idx[q], lo:hi])
        q += 1


@_jit(fastmath=_CONTRACT)
def _add_compressed_rows(out, w_t, rows, act, coef, n):
    """``out += Σ_{q<n} coef[q]·w_t[act[q]]`` through the compressed rows (:class:`SparseRows`
    of w_t): each event costs the nonzeros of its row. Returns the MACs done.

    A coefficient that is not finite takes its dense row: in a dense product ``NaN·0`` and
    ``inf·0`` are NaN at every gate, which the nonzeros alone would miss.
    """
    done = 0
    for q in range(n):
        j = act[q]
        v = coef[q]
        if v - v != 0:  # NaN or ±inf
            _axpy(out, v, w_t[j])
            done += out.shape[0]
            continue
        for p in range(rows.start[j], rows.start[j + 1]):
            out[rows.idx[p]] += v * rows.vals[p]
        done += rows.start[j + 1] - rows.start[j]
    return done


@_jit(fastmath=_CONTRACT)
def _add_rows_at(out, dense, idx, coef, n, cols):
    """``out[cols] += Σ_{q<n} coef[q]·dense[idx[q], cols]``: :func:`_add_rows` at the columns
    cols (ascending) only, four rows per pass (a weight gradient at a pruning mask's nonzeros)."""
    q = 0
    while q + 4 <= n:
        c0, c1, c2, c3 = coef[q], coef[q + 1], coef[q + 2], coef[q + 3]
        r0, r1, r2, r3 = dense[idx[q]], dense[idx[q + 1]], dense[idx[q + 2]], dense[idx[q + 3]]
        for p in range(cols.shape[0]):
            g = cols[p]
            out[g] += c0 * r0[g] + c1 * r1[g] + c2 * r2[g] + c3 * r3[g]
        q += 4
    while q < n:
        c0, r0 = coef[q], dense[idx[q]]
        for p in range(cols.shape[0]):
            g = cols[p]
            out[g] += c0 * r0[g]
        q += 1


@_jit(fastmath=_CONTRACT)
def _add_compressed_row_2d(out, r, dense, idx, vals, first, last, c0, c1):
    """``out[r, c0:c1] += Σ_{first ≤ p < last} vals[p]·dense[idx[p], c0:c1]``: one compressed
    row times a dense matrix along columns c0:c1, four nonzeros per pass over ``out[r]``.
    Indexed in place, without slices: a slice per nonzero cost more than its short AXPY."""
    p = first
    while p + 4 <= last:
        g0, g1, g2, g3 = idx[p], idx[p + 1], idx[p + 2], idx[p + 3]
        w0, w1, w2, w3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
        for c in range(c0, c1):
            out[r, c] += w0 * dense[g0, c] + w1 * dense[g1, c] + w2 * dense[g2, c] + w3 * dense[g3, c]
        p += 4
    while p < last:
        g0, w0 = idx[p], vals[p]
        for c in range(c0, c1):
            out[r, c] += w0 * dense[g0, c]
        p += 1


@_jit(fastmath=_REDUCE)
def _gather_dot(idx, vals, v):
    """``Σ_p vals[p]·v[idx[p]]``: a compressed row dotted with a dense vector."""
    acc = v.dtype.type(0)
    for p in range(idx.shape[0]):
        acc += vals[p] * v[idx[p]]
    return acc


@_jit(fastmath=_REDUCE)
def _gather_dot4(idx, vals, d0, d1, d2, d3):
    """:func:`_gather_dot` of one compressed row with four vectors, reading the row once."""
    a0 = a1 = a2 = a3 = d0.dtype.type(0)
    for p in range(idx.shape[0]):
        g = idx[p]
        w = vals[p]
        a0 += w * d0[g]
        a1 += w * d1[g]
        a2 += w * d2[g]
        a3 += w * d3[g]
    return a0, a1, a2, a3


@_jit(fastmath=_REDUCE)
def _all_finite(v):
    """Whether the 1-D array v holds no NaN or infinity (``x − x`` is NaN exactly for those)."""
    acc = v.dtype.type(0)
    for i in range(v.shape[0]):
        acc += v[i] - v[i]
    return acc == 0


# exp(x) = 2^n·exp(r), x = n·ln 2 + r, |r| ≤ ln(2)/2: Cody–Waite reduction (ln 2 split in two so
# that n·ln2_hi is exact), a Taylor polynomial in r, and 2^n as the product of two powers of two
# built from their bit patterns (each a normal float, so that the product underflows to 0 and
# overflows to inf where exp does). In arithmetic only (no libm call), so that a loop calling it
# is vectorised by LLVM: libm's exp and tanh are scalar calls and were most of the cell's time.
# One version per float type, so that float32 data is computed in float32 (twice the SIMD lanes
# of float64 and cheaper divisions). ±inf give inf and 0 and NaN gives NaN, so that sigmoid and
# tanh built on it are exactly 0/±1 or NaN there, as torch's (0·inf in the candidate state is
# then NaN as in the reference).

def _exp(x):
    """``exp(x)`` in the float type of x, to about 2 ulp (jitted code: the typed versions below;
    without the JIT: numpy's)."""
    return np.exp(x)


@_jit(fastmath=_CONTRACT, inline="always")
def _exp64(x):
    """Degree 13 (truncation < 1e-17 relative)."""
    x = min(max(x, -1416.0), 1416.0)  # where 2^n is 0 or inf anyway (NaN stays NaN)
    n = np.floor(x * 1.4426950408889634 + 0.5)
    r = x - n * 6.93147180369123816490e-01 - n * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    # n in [−2043, 2043]: halves in [−1022, 1022], normal float64s
    n_lo = np.int64(n) >> 1
    n_hi = np.int64(n) - n_lo
    two_lo = np.int64((n_lo + 1023) << 52).view(np.float64)
    two_hi = np.int64((n_hi + 1023) << 52).view(np.float64)
    return (p * two_lo) * two_hi


_F = np.float32


@_jit(fastmath=_CONTRACT, inline="always")
def _exp32(x):
    """Degree 8 (truncation < 1e-10 relative), float32 throughout."""
    x = min(max(x, _F(-174.0)), _F(174.0))  # where 2^n is 0 or inf anyway (NaN stays NaN)
    n = np.floor(x * _F(1.44269504) + _F(0.5))
    r = x - n * _F(0.693359375) - n * _F(-2.12194440e-4)
    p = _F(1.0 / 40320.0)
    p = p * r + _F(1.0 / 5040.0)
    p = p * r + _F(1.0 / 720.0)
    p = p * r + _F(1.0 / 120.0)
    p = p * r + _F(1.0 / 24.0)
    p = p * r + _F(1.0 / 6.0)
    p = p * r + _F(0.5)
    p = p * r + _F(1.0)
    p = p * r + _F(1.0)
    # n in [−251, 251]: halves in [−126, 126], normal float32s
    n_lo = np.int32(n) >> 1
    n_hi = np.int32(n) - n_lo
    two_lo = np.int32((n_lo + 127) << 23).view(np.float32)
    two_hi = np.int32((n_hi + 127) << 23).view(np.float32)
    return (p * two_lo) * two_hi


@overload(_exp, inline="always")
def _exp_typed(x):
    return (lambda x: _exp32(x)) if x == numba.types.float32 else (lambda x: _exp64(x))


# error_model="numpy": no ZeroDivisionError check on ``/`` (the denominators here are ≥ 1),
# whose branch would keep LLVM from vectorising the loop.
@_jit(fastmath=_CONTRACT, error_model="numpy")
def _cell_forward(t, b, gates, gh, c, theta, zoneout, out, y_prev):
    """Sample ``b`` at step ``t`` of the cell, events included, as a loop LLVM can vectorise.

    gates (G,): in, the input part ``W_ih x_t + b_ih``; out, ``(r, z, n)``. gh (G,): the
    recurrent part ``W_hh y_{t-1} + b_hh``. c (H,): in ``c_{t-1}``, out ``c_t`` (after the
    reset). theta (H,). zoneout: :class:`Zoneout`. Writes ``gh_n = W_hn y_{t-1} + b_hn``,
    c_hat, y and the events e (1 or 0) of ``out`` (:class:`ForwardOutputs`) at ``[t, b]``,
    and the output into y_prev (H,) too. Computed in the data's float type (``one`` carries it: a float
    literal would promote float32 to float64); the event is decided on the rounded candidate
    state that is stored, so it is the one the backward pass recomputes from c_hat.
    """
    H = c.shape[0]
    zero = c.dtype.type(0.0)
    one = c.dtype.type(1.0)
    two = one + one
    zmode = zoneout.mode
    zp_ = c.dtype.type(zoneout.p)
    zmask = zoneout.mask[t, b] if zmode == ZONEOUT_MASK else zoneout.mask[0, 0]
    gh_n, c_hat, y, e = out.gh_n[t, b], out.c_hat[t, b], out.y[t, b], out.e[t, b]
    for i in range(H):
        r = one / (one + _exp(-(gates[i] + gh[i])))
        z = one / (one + _exp(-(gates[H + i] + gh[H + i])))
        hn = gh[2 * H + i]
        a = gates[2 * H + i] + r * hn
        nn = one - two / (_exp(two * a) + one)  # tanh(a), to about an ulp of 1 absolute
        cp = c[i]
        ch = (one - z) * nn + z * cp
        if zmode == ZONEOUT_MASK:
            ch = cp + zmask[i] * (ch - cp)
        elif zmode == ZONEOUT_EVAL:
            ch = zp_ * cp + (one - zp_) * ch
        gates[i] = r
        gates[H + i] = z
        gates[2 * H + i] = nn
        gh_n[i] = hn
        c_hat[i] = ch
        # the event, output and reset in the reference's arithmetic (y = e·ĉ, c = ĉ − e·ϑ):
        # equal to selecting for finite values, and a NaN or infinity propagates as there
        ev = one if ch > theta[i] else zero
        out = ev * ch
        y[i] = out
        y_prev[i] = out
        c[i] = ch - ev * theta[i]
        e[i] = ev


@_jit(parallel=True, fastmath=_CONTRACT)
def layer_forward(gates, y0, c0, rec, w_rows, zoneout, out, macs):
    """One layer and direction over a whole sequence; event-driven recurrent product.

    Shapes: T steps, B samples, H units, G = 3H.
      gates (T, B, G): in: the input part of the gates ``W_ih x_t + b_ih``;
                       out: ``(r, z, n)`` of every valid step (kept for the backward pass).
      y0, c0 (B, H): the initial state; rec: :class:`Recurrence`; zoneout: :class:`Zoneout`.
      w_rows: :class:`SparseRows` of ``rec.w_hh_t`` where it is used (a sparse weight: an
      event costs the nonzeros of its row), else the dense rows are read.
      out: :class:`ForwardOutputs`, written at every valid step (padded steps are left
      untouched: the caller zeroes them when the lengths differ).
      macs (B,) int64: multiply-accumulates done in the recurrent product, ``G·|A_{t-1}|``
      (with compressed rows, the nonzeros of the fired units' rows) summed over valid steps.

    Samples are independent in the forward pass, so each thread runs whole sequences of its
    samples (one parallel region per call, no synchronisation per step). Per step a sample adds
    the rows of ``w_hh_t`` of its fired units into its own gh row, which stays in L1/L2 (a
    unit-major order, each row read once per step for all samples, sweeps every sample's gh
    row through the cache per unit).
    """
    T, B, G = gates.shape
    H = G // 3
    out.c_last[:] = c0
    out.y_last[:] = y0
    # fired units of the previous step, per sample: act[b, :n], their outputs in coef[b, :n]
    act = np.empty((B, H), np.int64)
    coef = np.empty((B, H), out.y.dtype)
    gh = np.empty((B, G), out.y.dtype)
    for b in prange(B):
        n = _fired_units(y0[b], y0[b], act[b], coef[b])
        for t in range(rec.lengths[b]):
            # gh = b_hh + Σ_{j fired} y_j · W_hh[:, j]
            gh[b, :] = rec.b_hh
            if w_rows.used:
                macs[b] += _add_compressed_rows(gh[b], rec.w_hh_t, w_rows, act[b], coef[b], n)
            else:
                _add_rows(gh[b], rec.w_hh_t, act[b], coef[b], n, 0)
                macs[b] += G * n
            _cell_forward(t, b, gates[t, b], gh[b], out.c_last[b], rec.theta, zoneout, out,
                          out.y_last[b])
            n = _fired_units(out.e[t, b], out.y[t, b], act[b], coef[b])


@_jit()
def _fired_units(e, y, act, coef):
    """The units with an event, e (H,) != 0, into act[:n] and their outputs y (H,) into
    coef[:n]; returns n. A NaN output counts too (``0·NaN`` from a NaN state): it reaches every
    unit through the recurrent product, as in a dense product."""
    n = 0
    for i in range(e.shape[0]):
        if e[i] != 0 or y[i] != y[i]:
            act[n] = i
            coef[n] = y[i]
            n += 1
    return n


@_jit(fastmath=_CONTRACT)
def forward_cell_step(t, gates, gh, rec, zoneout, y_prev, c, out):
    """The cell of step ``t`` for every valid sample, given the recurrent part gh (B, G) (the
    dense mode: the caller runs the time loop and computes ``gh = b_hh + y_{t-1}·W_hhᵀ`` with
    one matmul per step, faster than events when most units fire).

    y_prev, c (B, H): in, the state after step t−1; out, after step t (samples past their end
    keep theirs). Other arguments as in :func:`layer_forward` (``rec.w_hh_t`` and
    ``out.y_last``/``out.c_last`` are not used). One thread: the vectorised cell is a fraction
    of the step's matmul, less than handing the cores between torch's and numba's thread pools
    every step would cost.
    """
    B = y_prev.shape[0]
    for b in range(B):
        if rec.lengths[b] > t:
            _cell_forward(t, b, gates[t, b], gh[b], c[b], rec.theta, zoneout, out, y_prev[b])


@_jit(fastmath=_CONTRACT, inline="always")
def _pseudo_derivative(v, gamma, k, one):
    """The triangle surrogate of dH/dv, ``γ·max(0, 1 − k|v|)``, in the float type of ``one``
    (the cell and the choice of G_t must round it alike: a unit is in G exactly where it is
    nonzero)."""
    return gamma * max(one - one, one - k * abs(v))


@_jit(fastmath=_CONTRACT)
def _cell_backward(t, b, saved, theta, zoneout, surrogate, grads, dy, dc, dgh, out):
    """The elementwise part of one step of BPTT for sample ``b`` (all its H units).

    Reads dy[b], dc[b] (gradients reaching ``y_t`` from later steps, and ``c_t``) and the
    saved forward values of step ``t``; writes d_gi[t, b] (gradient of ``W_ih x_t + b_ih``),
    dgh[b] (gradient of ``W_hh y_{t-1} + b_hh``), dc[b] (now the gradient of ``c_{t-1}``)
    and accumulates d_theta[b]. Arguments as in :func:`layer_backward`. Computed in the data's
    float type, as the forward cell.
    """
    gates, gh_n, c_hat, c0 = saved
    g_y, g_e, g_c_hat, has_g_e, has_g_c_hat = grads[:5]
    d_gi, d_theta = out.d_gi, out.d_theta
    zmode, zmask = zoneout.mode, zoneout.mask
    H = theta.shape[0]
    one = c_hat.dtype.type(1.0)
    zero = one - one
    gamma_, k_ = c_hat.dtype.type(surrogate.gamma), c_hat.dtype.type(surrogate.k)
    zp_ = c_hat.dtype.type(zoneout.p)
    for i in range(H):
        th = theta[i]
        ch = c_hat[t, b, i]
        fired = ch > th
        e = one if fired else zero
        sg = _pseudo_derivative(ch - th, gamma_, k_, one)
        if t == 0:
            cp = c0[b, i]
        else:
            cp = c_hat[t - 1, b, i]
            cp = cp - (one if cp > th else zero) * th  # the forward's reset, in its arithmetic
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
            gch0 = (one - zp_) * gch
            gcp = zp_ * gch
        else:
            gch0 = gch
            gcp = zero
        # ĉ0 = (1 − z)·n + z·c_{t-1}
        gn = gch0 * (one - z)
        gz = gch0 * (cp - nn)
        gcp += gch0 * z
        # n = tanh(i_n + r·h_n), z = σ(i_z + h_z), r = σ(i_r + h_r)
        ga_n = gn * (one - nn * nn)
        ga_z = gz * z * (one - z)
        ga_r = ga_n * gh_n[t, b, i] * r * (one - r)
        d_gi[t, b, i] = ga_r
        d_gi[t, b, H + i] = ga_z
        d_gi[t, b, 2 * H + i] = ga_n
        dgh[b, i] = ga_r
        dgh[b, H + i] = ga_z
        dgh[b, 2 * H + i] = ga_n * r
        dc[b, i] = gcp


@_jit(fastmath=_CONTRACT, inline="always")
def _in_g(c_hat, theta, gamma, k, one):
    """Whether a unit with candidate state c_hat is in G (fired, or its pseudo-derivative is
    nonzero): only then does the gradient of its output matter."""
    return c_hat > theta or _pseudo_derivative(c_hat - theta, gamma, k, one) > 0


@_jit(fastmath=_REDUCE)
def _dot4(r0, r1, r2, r3, v):
    """``(r0·v, r1·v, r2·v, r3·v)``: four dot products per pass over v."""
    a0 = a1 = a2 = a3 = v.dtype.type(0)
    for i in range(v.shape[0]):
        a0 += r0[i] * v[i]
        a1 += r1[i] * v[i]
        a2 += r2[i] * v[i]
        a3 += r3[i] * v[i]
    return a0, a1, a2, a3


@_jit(fastmath=_REDUCE, inline="always")
def _dot4x4(w0, w1, w2, w3, d0, d1, d2, d3):
    """The 16 dot products ``w_p·d_q`` in one pass over the rows: each element loaded is
    used four times (a register block of a matrix product)."""
    z = w0.dtype.type(0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for i in range(w0.shape[0]):
        x0, x1, x2, x3 = w0[i], w1[i], w2[i], w3[i]
        e = d0[i]
        a00 += x0 * e
        a10 += x1 * e
        a20 += x2 * e
        a30 += x3 * e
        e = d1[i]
        a01 += x0 * e
        a11 += x1 * e
        a21 += x2 * e
        a31 += x3 * e
        e = d2[i]
        a02 += x0 * e
        a12 += x1 * e
        a22 += x2 * e
        a32 += x3 * e
        e = d3[i]
        a03 += x0 * e
        a13 += x1 * e
        a23 += x2 * e
        a33 += x3 * e
    return (a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33)


@_jit(fastmath=_REDUCE)  # (the flags of the inlined _dot4x4 are this function's)
def _unit_block_gradient(j, w_hh_t, dgh, members, n, dy):
    """``dy[b, j + p] = w_hh_t[j + p]·dgh[b]`` for the four units j..j+3 and the samples b in
    members[:n]: four samples at a time with :func:`_dot4x4`, the rest one at a time."""
    w0, w1, w2, w3 = w_hh_t[j], w_hh_t[j + 1], w_hh_t[j + 2], w_hh_t[j + 3]
    q = 0
    while q + 4 <= n:
        b0, b1, b2, b3 = members[q], members[q + 1], members[q + 2], members[q + 3]
        (dy[b0, j], dy[b1, j], dy[b2, j], dy[b3, j],
         dy[b0, j + 1], dy[b1, j + 1], dy[b2, j + 1], dy[b3, j + 1],
         dy[b0, j + 2], dy[b1, j + 2], dy[b2, j + 2], dy[b3, j + 2],
         dy[b0, j + 3], dy[b1, j + 3], dy[b2, j + 3], dy[b3, j + 3]) = _dot4x4(
            w0, w1, w2, w3, dgh[b0], dgh[b1], dgh[b2], dgh[b3])
        q += 4
    while q < n:
        b = members[q]
        dy[b, j], dy[b, j + 1], dy[b, j + 2], dy[b, j + 3] = _dot4(w0, w1, w2, w3, dgh[b])
        q += 1


@_jit(fastmath=_REDUCE)
def _unit_gradient_compressed(j, w_t, rows, dgh, members, n, dense, dy):
    """``dy[b, j] = Σ_{g ∈ nz(j)} w_t[j, g]·dgh[b, g]`` through the compressed row j
    (:class:`SparseRows` of w_t) for the samples b in members[:n], four samples per pass over
    the row; the dense row for a sample whose dgh holds a NaN or infinity (dense[b]: ``0·NaN``
    is NaN in a dense product). Returns the MACs done."""
    lo, hi = rows.start[j], rows.start[j + 1]
    idx, vals = rows.idx[lo:hi], rows.vals[lo:hi]
    done = 0
    q = 0
    while q < n:
        if q + 4 <= n and not (dense[members[q]] or dense[members[q + 1]]
                               or dense[members[q + 2]] or dense[members[q + 3]]):
            b0, b1, b2, b3 = members[q], members[q + 1], members[q + 2], members[q + 3]
            dy[b0, j], dy[b1, j], dy[b2, j], dy[b3, j] = _gather_dot4(
                idx, vals, dgh[b0], dgh[b1], dgh[b2], dgh[b3])
            done += 4 * (hi - lo)
            q += 4
            continue
        b = members[q]
        if dense[b]:
            dy[b, j] = _dot(w_t[j], dgh[b])
            done += w_t.shape[1]
        else:
            dy[b, j] = _gather_dot(idx, vals, dgh[b])
            done += hi - lo
        q += 1
    return done


@_jit(fastmath=_CONTRACT)
def _unit_gradient_all_samples(j, w_t, rows, dgh_t, dgh, members, n, dense, acc, blk, dy):
    """:func:`_unit_gradient_compressed` for every sample at once: ``acc[blk] = Σ_{g ∈ nz(j)}
    w_t[j, g]·dgh_t[g]``, one AXPY along the samples per nonzero of row j (dgh_t (G, B): dgh
    transposed; acc (n_blocks, B) scratch), then ``dy[b, j] = acc[blk, b]`` for the samples b
    in members[:n] (dense rows for those with a non-finite dgh). Vectorised where the gathers
    are not; it computes samples that do not need the unit too. Returns the MACs done."""
    B = acc.shape[1]
    lo, hi = rows.start[j], rows.start[j + 1]
    acc[blk, :] = 0
    _add_compressed_row_2d(acc, blk, dgh_t, rows.idx, rows.vals, lo, hi, 0, B)
    done = (hi - lo) * B
    for q in range(n):
        b = members[q]
        if dense[b]:
            dy[b, j] = _dot(w_t[j], dgh[b])
            done += w_t.shape[1]
        else:
            dy[b, j] = acc[blk, b]
    return done


# From this many samples needing a block of units, the compressed rows go through all samples
# at once (:func:`_unit_gradient_all_samples`) instead of gathering per sample.
ALL_SAMPLES_MIN = 4


@_jit(parallel=True, fastmath=_CONTRACT)
def layer_backward(saved, rec, w_rows, zoneout, surrogate, grads, out, macs):
    """Sparse backpropagation through time of :func:`layer_forward` (SPEC §2), without the
    weight gradients (the caller computes them from d_gi after the loop).

    saved: :class:`Saved`; rec, w_rows, zoneout: as in the forward; surrogate:
    :class:`Surrogate` (``dH/dv``, ``v = ĉ − ϑ``); grads: :class:`OutputGrads`; out:
    :class:`InputGrads`; macs (H,) int64, zero on entry: MACs of the cross-unit product
    ``W_hᵀδ``, per block of units at its first unit.
    Only units in G_{t-1} (fired, or inside the surrogate's support) need ``W_hᵀδ_t``: the
    output gradient of any other unit is multiplied by zero at step t−1.

    Per step, the elementwise part runs in parallel over samples, then the product in
    parallel over blocks of four units: the block's rows of ``w_hh_t`` are read once and
    dotted with the ``δ_t`` of every sample that has one of the four units in G_{t-1}, four
    samples at a time (sixteen dot products per pass, in registers; the ``δ_t`` of all
    samples, B × 3H, stay in L2). A unit outside G_{t-1} computed with its block gets a value
    that is multiplied by zero at step t−1, and so does the stale value a sample keeps for the
    units of a block it does not need (no event, zero pseudo-derivative). Reading each row
    once for all samples moves B times less memory than one sample at a time. With compressed
    rows (``w_rows.used``) each unit of the block costs the nonzeros of its row per sample
    that needs it, gathered from its δ; from ``ALL_SAMPLES_MIN`` such samples on, one AXPY
    along the samples per nonzero instead (on δ transposed each step, B × 3H), which costs the
    nonzeros times B but runs vectorised.
    """
    gates, c_hat = saved.gates, saved.c_hat
    theta, w_hh_t, lengths = rec.theta, rec.w_hh_t, rec.lengths
    T, B, G = gates.shape
    H = G // 3
    dy = grads.g_y_last.copy()
    dc = grads.g_c_last.copy()
    dgh = np.zeros((B, G), gates.dtype)
    n_blocks = (H + 3) // 4  # the last one has H mod 4 units when that is not 0
    members = np.empty((n_blocks, B), np.int64)  # per block, the samples that need it
    dense = np.zeros(B, np.bool_)  # per sample, dgh not finite: the compressed rows' dense twin
    by_samples = w_rows.used and B >= ALL_SAMPLES_MIN
    dgh_t = np.zeros((G if by_samples else 1, B), gates.dtype)
    acc = np.empty((n_blocks, B), gates.dtype)  # per block, the AXPYs' accumulator
    one = c_hat.dtype.type(1.0)
    gamma_, k_ = c_hat.dtype.type(surrogate.gamma), c_hat.dtype.type(surrogate.k)
    for t in range(T - 1, -1, -1):
        for b in prange(B):
            if lengths[b] > t:
                _cell_backward(t, b, saved, theta, zoneout, surrogate, grads, dy, dc, dgh, out)
                if w_rows.used:
                    dense[b] = not _all_finite(dgh[b])
        if by_samples:
            for g in prange(G):
                for b in range(B):
                    dgh_t[g, b] = dgh[b, g]
        for blk in prange(n_blocks):
            lo = 4 * blk
            hi = min(H, lo + 4)
            # samples at step t with a unit of the block in G_{t-1} (every sample for y_0);
            # samples past their end keep their gradient
            n = 0
            for b in range(B):
                if lengths[b] > t:
                    need = t == 0
                    for j in range(lo, hi):
                        need = need or _in_g(c_hat[t - 1, b, j], theta[j], gamma_, k_, one)
                    if need:
                        members[blk, n] = b
                        n += 1
            if w_rows.used and by_samples and n >= ALL_SAMPLES_MIN:
                for j in range(lo, hi):
                    macs[lo] += _unit_gradient_all_samples(j, w_hh_t, w_rows, dgh_t, dgh,
                                                           members[blk], n, dense, acc, blk, dy)
            elif w_rows.used:
                for j in range(lo, hi):
                    macs[lo] += _unit_gradient_compressed(j, w_hh_t, w_rows, dgh, members[blk],
                                                          n, dense, dy)
            elif hi - lo == 4:
                _unit_block_gradient(lo, w_hh_t, dgh, members[blk], n, dy)
                macs[lo] += G * n * 4
            else:
                for j in range(lo, hi):
                    for q in range(n):
                        dy[members[blk, q], j] = _dot(w_hh_t[j], dgh[members[blk, q]])
                macs[lo] += G * n * (hi - lo)
    out.d_y0[:] = dy
    out.d_c0[:] = dc


@_jit(parallel=True)
def fingerprint(bits):
    """A position-weighted sum (mod 2^64) of the bit patterns bits (N,) uint32 of an array.

    Any change of one entry changes it; a change of several entries leaves it unchanged only
    by an accident of probability about 2^-64. Reads the array once (memory speed).
    """
    acc = np.uint64(0)
    golden = np.uint64(0x9E3779B97F4A7C15)
    for i in prange(bits.shape[0]):
        # an odd multiplier per position (Weyl sequence), so that moved entries count too
        weight = (np.uint64(i) * golden) | np.uint64(1)
        acc += (np.uint64(bits[i]) + np.uint64(1)) * weight
    return acc


@_jit(parallel=True)
def _nonzeros_by_row(x, rows):
    """The nonzeros of the rows of x (N, I) where rows (N,) is true, row by row (compressed
    sparse rows): ``(start, idx, vals)``, row n's column indices in
    ``idx[start[n]:start[n + 1]]`` (ascending) and their values in vals; other rows are empty."""
    N, I = x.shape
    start = np.zeros(N + 1, np.int64)
    for n in prange(N):
        count = 0
        if rows[n]:
            for j in range(I):
                if x[n, j] != 0:
                    count += 1
        start[n + 1] = count
    for n in range(N):
        start[n + 1] += start[n]
    idx = np.empty(start[N], np.int64)
    vals = np.empty(start[N], x.dtype)
    for n in prange(N):
        q = start[n]
        if rows[n]:
            for j in range(I):
                if x[n, j] != 0:
                    idx[q] = j
                    vals[q] = x[n, j]
                    q += 1
    return start, idx, vals


@_jit()
def _transpose_sparse(start, idx, vals, n_cols):
    """Compressed sparse rows of a matrix into those of its transpose (a counting sort):
    ``(start, idx, vals)`` by column, row indices ascending."""
    N = start.shape[0] - 1
    t_start = np.zeros(n_cols + 1, np.int64)
    for q in range(start[N]):
        t_start[idx[q] + 1] += 1
    for j in range(n_cols):
        t_start[j + 1] += t_start[j]
    t_idx = np.empty(start[N], np.int64)
    t_vals = np.empty(start[N], vals.dtype)
    fill = t_start[:n_cols].copy()
    for n in range(N):
        for q in range(start[n], start[n + 1]):
            j = idx[q]
            t_idx[fill[j]] = n
            t_vals[fill[j]] = vals[q]
            fill[j] += 1
    return t_start, t_idx, t_vals


# Parallel tasks of a sparse product: chunks of output rows (more than threads, for balance).
PRODUCT_CHUNKS = 8


@_jit(parallel=True, fastmath=_CONTRACT)
def _sparse_dense_product(start, idx, vals, dense, dense_rows, out_cols, bias, out, tile_rows):
    """``out = bias + S·dense`` for a sparse S in compressed rows ``(start, idx, vals)`` with
    the column indices ascending in each row: each row of out adds the rows of dense of its
    nonzeros, four per pass. Returns the MACs done.

    Either operand's weight may be sparse too (:class:`SparseRows`, where ``used``):
    dense_rows, compressed rows of dense (a pruned weight in the input product: each nonzero
    of S adds the nonzeros of its row of dense); out_cols, per row m of out the columns to
    compute (a weight gradient at a pruning mask's nonzeros: out[m] is bias elsewhere).

    dense is read in tiles of tile_rows rows, all rows of out adding their nonzeros in one
    tile before the next, so that the tile stays in L2 while it is used; without tiles each
    nonzero read a whole row of a dense operand larger than the last-level cache from memory
    (the weight gradient's gate gradients). Rows of out in parallel chunks.
    """
    M, C = out.shape
    n_chunks = min(M, PRODUCT_CHUNKS)
    done = np.zeros(n_chunks, np.int64)
    for c in prange(n_chunks):
        lo = c * M // n_chunks
        hi = (c + 1) * M // n_chunks
        cursor = start[lo:hi].copy()  # per row, its first nonzero not yet added
        for m in range(lo, hi):
            out[m, :] = bias
        for tile_start in range(0, dense.shape[0], tile_rows):
            tile_end = tile_start + tile_rows
            for m in range(lo, hi):
                first = cursor[m - lo]
                last = first
                while last < start[m + 1] and idx[last] < tile_end:
                    last += 1
                n = last - first
                if dense_rows.used:
                    done[c] += _add_compressed_rows(out[m], dense, dense_rows, idx[first:],
                                                    vals[first:], n)
                elif out_cols.used:
                    cols = out_cols.idx[out_cols.start[m]:out_cols.start[m + 1]]
                    _add_rows_at(out[m], dense, idx[first:], vals[first:], n, cols)
                    done[c] += n * cols.shape[0]
                else:
                    _add_rows(out[m], dense, idx[first:], vals[first:], n, 0)
                    done[c] += n * C
                cursor[m - lo] = last
    return done.sum()


@_jit(parallel=True, fastmath=_CONTRACT)
def _compressed_rows_product(rows, dense, out, tile_cols):
    """``out = S·dense`` for S (R, C) in compressed rows (:class:`SparseRows`), dense (C, N),
    out (R, N): row r of out adds the rows of dense at the nonzeros of row r of S, four per
    pass, vectorised along N. Returns the MACs done.

    The gradient of a pruned weight's input (``dxᵀ = W_ihᵀ·δᵀ``, dense the transposed gate
    gradients): per nonzero of the weight one AXPY of length N, instead of a gather per
    nonzero and sample. dense is read in tiles of tile_cols columns, all rows of out adding
    their nonzeros in one tile (in parallel over rows) before the next, so that the tile stays
    in the last-level cache (2.5× faster than rows outside the tiles at H = 1024).
    """
    R, N = out.shape
    done = 0
    for tile_start in range(0, N, tile_cols):
        tile_end = min(N, tile_start + tile_cols)
        for r in prange(R):
            first, last = rows.start[r], rows.start[r + 1]
            o = out[r, tile_start:tile_end]
            o[:] = 0
            _add_rows(o, dense, rows.idx[first:], rows.vals[first:], last - first, tile_start)
        done += (rows.start[R] - rows.start[0]) * (tile_end - tile_start)
    return done


@_jit()
def gather_rows(start, idx, w_t):
    """The values of w_t (R, C) at the compressed rows' positions ``(start, idx)`` (a pruning
    mask's nonzeros), and whether they are all finite: ``(vals, finite)``. O(nnz): the weight
    of a pruned module is a fresh product every call, its mask's pattern is not. (Serial: a
    parallel version took twice as long at H = 1024.)"""
    vals = np.empty(idx.shape[0], w_t.dtype)
    not_finite = 0
    for r in range(w_t.shape[0]):
        for p in range(start[r], start[r + 1]):
            v = w_t[r, idx[p]]
            vals[p] = v
            not_finite += v - v != 0
    return vals, not_finite == 0


def _renamed(kernel, name):
    """The Python function of a kernel under another name (getattr: with NUMBA_DISABLE_JIT=1
    the decorated kernels are the Python functions themselves). numba's on-disk cache keys a
    function by its name and first line, not by its compile options: compiled under its
    original name, a twin with other options shares the original's cache entries, and
    whichever is compiled first serves both (the parallel forward kernel ran on one thread
    after the serial twin had been cached)."""
    fn = getattr(kernel, "py_func", kernel)
    twin = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = name
    return twin


def _serial_twin(kernel, **options):
    """The kernel compiled without ``parallel=True`` (``prange`` is then ``range``), under a
    name of its own."""
    name = getattr(kernel, "py_func", kernel).__name__ + "_serial"
    return _jit(**options)(_renamed(kernel, name))


# Serial twins of the parallel kernels: no parallel region at all. For one sample, a single
# numba thread, and wherever the parallel kernel is measured to be slower (the backward pass
# synchronises the threads twice per step, which a core busy with another process turns into
# a stall of every step; see egru.kernels.thread_modes).
layer_forward_serial = _serial_twin(layer_forward, fastmath=_CONTRACT)
layer_backward_serial = _serial_twin(layer_backward, fastmath=_CONTRACT)
_nonzeros_by_row_serial = _serial_twin(_nonzeros_by_row)
_sparse_dense_product_serial = _serial_twin(_sparse_dense_product, fastmath=_CONTRACT)
_compressed_rows_product_serial = _serial_twin(_compressed_rows_product, fastmath=_CONTRACT)


# The two products below are compositions of parallel kernels, called one after the other
# from Python. They are not jitted themselves: a cached function without ``parallel=True``
# that calls cached parallel ones does not start numba's thread pool when it is loaded from
# the cache (the pool is started by the loader of a parallel function's own entry, which its
# callers do not inherit once the callee itself came from the cache), and the process then
# crashes at the first parallel region. So every parallel kernel here is an entry point
# called from Python, and no jitted function calls a parallel one.


def sparse_input_product(x, w_ih_t, w_rows, b_ih, rows, out, parallel=True):
    """Event-driven input product for a sparse input (a stacked layer's input is a ``y``), or
    for a pruned weight (any input: the product over the weight's nonzeros).

    x (N, I) with N = T·B; w_ih_t (I, G) = W_ih transposed; w_rows: :class:`SparseRows` of
    w_ih_t where used (each nonzero of x costs the nonzeros of its row), else placeholder;
    b_ih (G,); rows (N,) bool: rows to compute (the others, padded steps, get ``b_ih``).
    Writes out (N, G) = ``b_ih + Σ_{j: x[n, j] ≠ 0} x[n, j]·W_ih[:, j]`` and returns the MACs
    done (``G·nnz(x)`` with dense rows). ``w_ih_t`` is read in one tile: it is used by every row
    and stays in the last-level cache (tiles were no faster). parallel: the parallel kernels,
    or their serial twins.
    """
    nonzeros, product = _sparse_kernels(parallel)
    start, idx, vals = nonzeros(x, rows)
    return int(product(start, idx, vals, w_ih_t, w_rows, no_rows(w_ih_t.dtype), b_ih, out,
                       w_ih_t.shape[0]))


def sparse_weight_grad(x, d_out, rows, tile_rows, d_w_t, parallel=True, mask_rows=None):
    """``d_w_t[j] = Σ_{n: x[n, j] ≠ 0} x[n, j]·d_out[n]``: the weight gradient of a product
    with a sparse input, ``xᵀ·d_out`` over the nonzeros of x.

    x (N, I), d_out (N, G), rows (N,) bool: rows that count (padded steps do not); d_out is
    read in tiles of tile_rows rows (see :func:`_sparse_dense_product`); writes d_w_t (I, G).
    mask_rows: :class:`SparseRows` of a pruning mask (I, G), or None: the gradient is then
    computed at the mask's nonzeros only, zero elsewhere (the pruned weights are structural
    zeros, their gradient is not wanted). Returns the MACs done. parallel: as in
    :func:`sparse_input_product`.
    """
    nonzeros, product = _sparse_kernels(parallel)
    start, idx, vals = nonzeros(x, rows)
    t_start, t_idx, t_vals = _transpose_sparse(start, idx, vals, x.shape[1])
    zero = np.zeros(d_out.shape[1], d_out.dtype)
    out_cols = no_rows(d_out.dtype) if mask_rows is None else mask_rows
    return int(product(t_start, t_idx, t_vals, d_out, no_rows(d_out.dtype), out_cols, zero,
                       d_w_t, tile_rows))


def compressed_input_grad(w_rows, d_out_t, dx_t, tile_cols, parallel=True):
    """``dx_t = W_ihᵀ·d_outᵀ`` through the compressed rows w_rows (:class:`SparseRows` of
    w_ih_t (I, G)): the gradient of the input of a product with a pruned weight.

    d_out_t (G, N): the gate gradients transposed; writes dx_t (I, N); returns the MACs done,
    ``nnz·N``. tile_cols: columns of d_out_t per tile (see :func:`_compressed_rows_product`).
    parallel: as in :func:`sparse_input_product`."""
    product = _compressed_rows_product if parallel else _compressed_rows_product_serial
    return int(product(w_rows, d_out_t, dx_t, tile_cols))


def _sparse_kernels(parallel):
    if parallel:
        return _nonzeros_by_row, _sparse_dense_product
    return _nonzeros_by_row_serial, _sparse_dense_product_serial
