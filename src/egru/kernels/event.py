"""The event-driven CPU layer: ``backend="event"`` and ``backend="auto"`` (SPEC §1, §2).

Both have the signature of :func:`egru.functional.egru_layer` and agree with it (outputs, final
state, events and every gradient) to float rounding. The work follows the events:

* forward, the recurrent product touches only the rows of ``W_hhᵀ`` of units that fired at the
  previous step (``3H·|A_{t-1}|`` MACs per sample and step, counted in :data:`counters`); the
  input product is one dense matmul for all steps, or event-driven when the input is itself
  sparse (a stacked layer's input is the previous layer's ``y``);
* backward (sparse BPTT), ``W_hhᵀ·δ_t`` is computed only for units that fired or lie inside the
  surrogate's support at step ``t−1``; the weight gradients are one product each after the
  time loop, event-driven over the units that fired (or the input's nonzeros) when those are
  few (:data:`SPARSE_WEIGHT_GRAD_DENSITY`), and the gradient of the input is skipped when the
  input needs none (a first layer's data).

Backward. ``W_hhᵀ·δ_t`` is computed four units at a time for every sample that has one of them
in G (``layer_backward``): each row of ``W_hhᵀ`` is read once per step for all samples, in
register blocks of four units by four samples. With the default surrogate (support half-width
``1/k = 1``) nearly every unit lies inside the support at every activity, so there is little to
skip; the kernel is then a dense product, and it beat a BLAS matmul per step on the machine
measured. ``"auto"`` computes the forward recurrent product densely (one matmul per step) for
many samples at high activity. The elementwise cell runs in the same numba kernels in every
mode.

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
does the same. ``"auto"`` chooses the dense forward product per call (see
:func:`prefers_event`): at least ``AUTO_DENSE_MIN_BATCH`` samples and an activity of at least
``AUTO_ACTIVITY_LIMIT`` at this layer's previous call.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
import weakref
from typing import Optional

try:
    import fcntl
except ImportError:  # not on Windows: first compilations are not serialised across processes
    fcntl = None

import numpy as np
import torch

from ..functional import LayerOutput, egru_layer, reverse_padded
from ..thread_modes import ThreadModes
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


class KernelCalls:
    """Calls into the numba kernels that are safe from several processes and threads.

    * Compiling: the first call of a kernel for a dtype in a process compiles it or loads it
      from numba's on-disk cache. numba numbers a function's cache entries by reading and
      rewriting an index file without a lock, so two processes compiling one function for two
      signatures at once (``torchrun`` workers, parallel test runs) can each write entry 1 and
      leave an index naming the other's code. Those first calls hold an exclusive lock on a
      file in the kernel's cache directory; later calls take no lock.
    * Threads: numba's ``workqueue`` threading layer (its fallback where neither OpenMP nor
      TBB is available) aborts the process when two Python threads enter parallel regions at
      once. Under it (and before the layer is known) calls are serialised by a lock; the
      ``omp`` and ``tbb`` layers are thread-safe and run calls concurrently.
    """

    def __init__(self):
        self._ready: set = set()  # (kernel, dtype) compiled or loaded in this process
        self._thread_lock = threading.RLock()

    def __call__(self, kernel, dtype, *args):
        if (kernel, dtype) not in self._ready:
            with _cache_lock(kernel), self._thread_lock:
                result = kernel(*args)
            self._ready.add((kernel, dtype))
            return result
        if _threading_layer() in (None, "workqueue"):
            with self._thread_lock:
                return kernel(*args)
        return kernel(*args)


def _threading_layer() -> Optional[str]:
    """numba's threading layer once a parallel region has run, else None."""
    try:
        return load_kernels().numba.threading_layer()
    except ValueError:
        return None


@contextlib.contextmanager
def _cache_lock(kernel):
    """An exclusive lock, across processes, on the cache directory of a jitted kernel (none
    for kernels without a disk cache, without the JIT, or where ``fcntl`` is missing)."""
    directory = getattr(getattr(kernel, "_cache", None), "cache_path", None)
    if directory is None or fcntl is None:
        yield
        return
    try:
        os.makedirs(directory, exist_ok=True)
        handle = open(os.path.join(directory, "egru-compile.lock"), "a")
    except OSError:  # a cache numba can read but we cannot write: numba compiles in memory
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


call = KernelCalls()
thread_modes = ThreadModes()  # the backward's and the sparse input product's thread modes


def unsupported(x: torch.Tensor, weight_hh: torch.Tensor, surrogate) -> Optional[str]:
    """Why the event kernels cannot compute this call, or None when they can."""
    if type(surrogate) is not Triangle:
        return f"surrogate {type(surrogate).__name__} is not supported (only Triangle)"
    if x.device.type != "cpu" or weight_hh.device.type != "cpu":
        return f"device {x.device.type} is not supported (CPU only)"
    if x.dtype not in (torch.float32, torch.float64) or weight_hh.dtype != x.dtype:
        return (f"dtype {x.dtype} with weights of {weight_hh.dtype} is not supported "
                "(float32 or float64, one for both)")
    if _in_functorch_transform():
        return "torch.func transforms (vmap, grad, ...) are not supported"
    if load_kernels() is None:
        return "numba is not installed"
    return None


def _in_functorch_transform() -> bool:
    """Whether a ``torch.func`` transform is active: its wrapped tensors have no data that the
    kernels could read."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


class Counters:
    """Multiply-accumulates the event kernels actually performed, summed over calls.

    ``recurrent``: forward recurrent product, ``3H·Σ|A_{t-1}|`` over valid steps and samples;
    ``input``: forward input product when it ran event-driven (``3H·nnz(x)`` over valid steps);
    ``backward_recurrent``: ``W_hᵀδ`` products, done for blocks of four units (see the numba
    ``layer_backward``); ``backward_weight``: recurrent weight gradient (when it is a dense
    matmul, the matmul's MACs).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.recurrent = self.input = self.backward_recurrent = self.backward_weight = 0
        self.calls = 0


counters = Counters()

# Sparse input products pay off below this density of nonzeros in x.
SPARSE_INPUT_DENSITY = 0.3


class _WeightMemo:
    """Values derived from weights, kept while a weight is unchanged: the same tensor object,
    storage and autograd version (``_version``, bumped by optimiser steps and other in-place
    changes through the tensor and its views), plus an optional ``check`` value of the
    caller's. Fresh products (DropConnect's masked weights) are computed every time."""

    def __init__(self, size: int):
        self.size = size
        self.entries: dict = {}

    def get(self, w: torch.Tensor, compute, check=None):
        if w.requires_grad and w.grad_fn is not None:
            return compute()
        stamp = (w._version, w.data_ptr(), check)
        hit = self.entries.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == stamp:
            return hit[2]
        value = compute()
        if len(self.entries) >= self.size:
            self.entries.pop(next(iter(self.entries)))
        self.entries[id(w)] = (weakref.ref(w), stamp, value)
        return value


class _TransposeCache:
    """``w.t().contiguous()`` of weights, kept while a weight is unchanged.

    ``EGRU`` stores its weights column by column, so that ``w.t()`` is already contiguous: it
    is returned as it is, always current, nothing cached or checked. Weights in the row-major
    layout (assigned by the user, a ``torch.nn.GRU``'s) are transposed and cached. A transpose
    of ``W_hh`` costs about as much as the whole recurrent product of a short, very sparse
    sequence; parameters change only at optimiser steps. Autograd's version counter sees
    in-place changes through the tensor and its views, but not writes through ``.data`` (as
    ``torch.autograd.gradcheck`` perturbs inputs) or through numpy views, so an entry is reused
    only if a fingerprint of the contents (one read of ``w``, about a tenth of the cost of
    transposing it) matches too.
    """

    def __init__(self, size: int = 32):
        self.memo = _WeightMemo(size)

    @staticmethod
    def _fingerprint(w: torch.Tensor) -> int:
        bits = w.detach().contiguous().view(-1).view(torch.int32).numpy().view("uint32")
        with np.errstate(over="ignore"):  # wrapping is intended (seen without the JIT only)
            return int(call(load_kernels().fingerprint, None, bits))

    def get(self, w: torch.Tensor) -> torch.Tensor:
        w_t = w.detach().t()
        if w_t.is_contiguous():  # stored column by column (EGRU's own weights): nothing to copy
            return w_t
        if w.requires_grad and w.grad_fn is not None:  # a fresh product: no fingerprint needed
            return w_t.contiguous()
        return self.memo.get(w, w_t.contiguous, check=self._fingerprint(w))


_transposed = _TransposeCache()

# Whether a weight holds only finite values. The event-driven products skip the weights of
# silent units, where a dense product multiplies them by zero: a NaN or infinite weight would
# vanish there instead of turning the output into NaN as in the reference, so layers with such
# weights take the dense products. The check reads the weight, so its answer is kept per
# version of the weight.
_finite_weights = _WeightMemo(size=64)


def _finite(w: torch.Tensor) -> bool:
    return _finite_weights.get(w, lambda: bool(torch.isfinite(w.detach()).all()))


def _zeros_like_bias(w: torch.Tensor) -> torch.Tensor:
    return torch.zeros(w.shape[0], dtype=w.dtype)


def _forward_pass(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zmask, zoneout_p,
                  dense_forward):
    """The forward computation of one layer/direction in processing order, outside autograd:
    ``(y, c_hat, e, y_last, c_last)`` and what the backward pass needs, ``(gates, gh_n, zm,
    w_hh_t, len_np, zmode)``.

    Inference calls it directly: an autograd Function costs ≈ 0.1 ms per call even without a
    graph, a tenth of a whole sparse B = 1 forward.
    """
    K = load_kernels()
    T, B, I = x.shape
    H = w_hh.shape[1]
    G = 3 * H
    b_ih_ = _zeros_like_bias(w_ih) if b_ih is None else b_ih.detach()
    b_hh_ = _zeros_like_bias(w_hh) if b_hh is None else b_hh.detach()
    x2 = x.detach().reshape(T * B, I)
    # numpy rather than torch for the small bookkeeping: a torch call costs more, most of all
    # when caches are cold (after other models ran)
    len_np = np.full(B, T, np.int64) if lengths is None else lengths.numpy()
    x_np = x2.contiguous().numpy()
    # Parallel regions are entered once per product (a descheduled thread can hold up each
    # once, not once per step); the recurrent product of one sample runs serially, as its
    # parallel form would synchronise the threads at every step.
    parallel = K.numba.get_num_threads() > 1
    dense_forward = dense_forward or not _finite(w_hh)
    if np.count_nonzero(x_np) < SPARSE_INPUT_DENSITY * x_np.size and _finite(w_ih):
        gates = torch.empty(T * B, G, dtype=x.dtype)
        valid = np.arange(T)[:, None] < len_np[None, :]
        # parallel or serial as measured: a short product is held up by a descheduled
        # thread for longer than it takes on one
        with thread_modes.timed(("input product", B, I, G, x.dtype), T, parallel) as parallel_input:
            counters.input += call(K.sparse_input_product, x.dtype, x_np,
                                   _transposed.get(w_ih).numpy(), b_ih_.contiguous().numpy(),
                                   valid.reshape(-1), gates.numpy(), parallel_input)
        gates = gates.view(T, B, G)
    else:
        gates = torch.addmm(b_ih_, x2, w_ih.detach().t()).view(T, B, G)

    if zmask is not None:
        zmode, zm = K.ZONEOUT_MASK, zmask.detach().contiguous()
    else:
        zmode = K.ZONEOUT_EVAL if zoneout_p > 0 else K.ZONEOUT_NONE
        zm = torch.zeros(1, 1, 1, dtype=x.dtype)
    # the kernels write every valid step; padded ones must read as zero
    alloc = torch.empty if lengths is None else torch.zeros
    y, c_hat, gh_n, e = (alloc(T, B, H, dtype=x.dtype) for _ in range(4))
    y_last = torch.empty(B, H, dtype=x.dtype)
    c_last = torch.empty_like(y_last)
    w_hh_t = _transposed.get(w_hh)
    theta_ = theta.detach().contiguous()
    if dense_forward:
        _dense_recurrent_forward(K, gates, w_hh_t, b_hh_.contiguous(), theta_,
                                 y0.detach(), c0.detach(), len_np, zmode, zm, float(zoneout_p),
                                 y, c_hat, gh_n, e, y_last, c_last)
    else:
        # whole samples per thread: one parallel region per call
        macs = np.zeros(B, np.int64)
        call(K.layer_forward if parallel and B > 1 else K.layer_forward_serial, x.dtype,
             gates.numpy(), w_hh_t.numpy(), b_hh_.contiguous().numpy(), theta_.numpy(),
             y0.detach().contiguous().numpy(), c0.detach().contiguous().numpy(), len_np, zmode,
             zm.numpy(), float(zoneout_p), y.numpy(), c_hat.numpy(), gh_n.numpy(), e.numpy(),
             y_last.numpy(), c_last.numpy(), macs)
        counters.recurrent += int(macs.sum())
    counters.calls += 1
    return (y, c_hat, e, y_last, c_last), (gates, gh_n, zm, w_hh_t, len_np, zmode)


class _EventLayer(torch.autograd.Function):
    """One layer/direction in processing order: ``(y, c_hat, e, y_last, c_last)``."""

    @staticmethod
    def forward(ctx, x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zmask, zoneout_p, gamma, k,
                dense_forward):
        outputs, (gates, gh_n, zm, w_hh_t, len_np, zmode) = _forward_pass(
            x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zmask, zoneout_p, dense_forward)
        y, c_hat = outputs[:2]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, y0, c0, w_ih, w_hh, theta, gates, gh_n, c_hat, y, zm)
        ctx.w_hh_t = w_hh_t
        ctx.meta = (len_np, zmode, float(zoneout_p), float(gamma), float(k),
                    b_ih is not None, b_hh is not None)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():  # create_graph=True: autograd would drop the terms
            raise RuntimeError(
                "egru backend 'event'/'auto': the event kernels' backward pass cannot be "
                "differentiated again (create_graph=True, double backward); use "
                "backend='reference' for gradient penalties and higher derivatives")
        return _EventLayer._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, g_y, g_c_hat, g_e, g_y_last, g_c_last):
        K = load_kernels()
        x, y0, c0, w_ih, w_hh, theta, gates, gh_n, c_hat, y, zm = ctx.saved_tensors
        len_np, zmode, zp, gamma, k, has_b_ih, has_b_hh = ctx.meta
        T, B, I = x.shape
        H = y.shape[-1]
        G = 3 * H
        dummy = torch.zeros(1, 1, 1, dtype=x.dtype)

        def arr(g, shape):
            return (torch.zeros(shape, dtype=x.dtype) if g is None else g.contiguous()).numpy()

        y0_, c0_, theta_ = (a.detach().contiguous() for a in (y0, c0, theta))
        # (T, B, H) incoming gradients, and (B, H) ones of the final state
        grads = (arr(g_y, (T, B, H)), (dummy if g_e is None else g_e.contiguous()).numpy(),
                 (dummy if g_c_hat is None else g_c_hat.contiguous()).numpy(),
                 g_e is not None, g_c_hat is not None)
        # the kernels write every valid step; padded ones must read as zero
        d_gi = (torch.empty if (len_np == T).all() else torch.zeros)(T, B, G, dtype=x.dtype)
        d_theta = torch.zeros(B, H, dtype=x.dtype)
        d_y0 = torch.empty(B, H, dtype=x.dtype)
        d_c0 = torch.empty_like(d_y0)
        macs = torch.zeros(H, dtype=torch.int64)
        with thread_modes.timed(("backward", B, H, x.dtype), T,
                                K.numba.get_num_threads() > 1) as parallel:
            call(K.layer_backward if parallel else K.layer_backward_serial, x.dtype,
                 gates.numpy(), gh_n.numpy(), c_hat.numpy(), c0_.numpy(), theta_.numpy(),
                 ctx.w_hh_t.numpy(), len_np, zmode, zm.numpy(), zp, gamma, k,
                 *grads, arr(g_y_last, (B, H)), arr(g_c_last, (B, H)),
                 d_gi.numpy(), d_theta.numpy(), d_y0.numpy(), d_c0.numpy(), macs.numpy())
        counters.backward_recurrent += int(macs.sum())

        need = ctx.needs_input_grad
        d_gi2 = d_gi.view(T * B, G)
        x2 = x.detach().reshape(T * B, I)
        # dx is skipped when x needs no gradient (a first layer's input is data)
        dx = d_gi2.mm(w_ih.detach()).view(T, B, I) if need[0] else None
        valid = (torch.from_numpy(len_np) > torch.arange(T).unsqueeze(1)).view(-1)
        d_w_ih = _weight_grad(K, x2, d_gi2, valid, parallel)[0] if need[3] else None
        need_b_ih, need_b_hh = has_b_ih and need[5], has_b_hh and need[6]
        d_b_ih = d_gi2.sum(0) if need_b_ih or need_b_hh else None
        # the gradient of W_hh y_{t-1} + b_hh equals d_gi but for the reset gate's factor on
        # the n rows: turn d_gi into it in place (it is not needed any more)
        d_gi[..., 2 * H:] *= gates[..., :H]
        d_w_hh = d_b_hh = None
        if need[4]:
            y_prev = torch.cat([y0_.unsqueeze(0), y[:-1]]).view(T * B, H)
            d_w_hh, macs = _weight_grad(K, y_prev, d_gi2, valid, parallel)
            counters.backward_weight += macs
        if need_b_hh:  # the same as d_b_ih but for the n rows
            d_b_hh = torch.cat([d_b_ih[:2 * H], d_gi2[:, 2 * H:].sum(0)])
        return (dx, d_y0 if need[1] else None, d_c0 if need[2] else None, d_w_ih, d_w_hh,
                d_b_ih if need_b_ih else None, d_b_hh, d_theta.sum(0) if need[7] else None,
                None, None, None, None, None, None)


# A weight gradient ``Σ_n d_out[n] ⊗ x[n]`` is computed event-driven below this density of x
# (measured crossover with the dense matmul, T·B = 3200: ≈ 0.33 at H = 1024, ≈ 0.27 at H = 256).
SPARSE_WEIGHT_GRAD_DENSITY = 0.25
# Bytes of d_out per tile of the event-driven weight gradient, about a core's L2 cache (B = 32,
# H = 1024, 10 % density: 77 → 37–41 ms for tiles of 32–256 rows, docs/speed.md).
WEIGHT_GRAD_TILE_BYTES = 1 << 20


def _weight_grad(K, x2, d_out2, valid, parallel):
    """``Σ_n d_out[n] ⊗ x[n]`` (G, I) from x2 (N, I) and d_out2 (N, G) over the rows where
    valid (N,) is true (d_out is zero at the others), and the MACs done: one dense matmul, or
    event-driven over the nonzeros of x when they are few (SPARSE_WEIGHT_GRAD_DENSITY), with
    the parallel kernels or their serial twins (as the backward pass chose)."""
    N, I = x2.shape
    G = d_out2.shape[1]
    sparse = float(torch.count_nonzero(x2)) < SPARSE_WEIGHT_GRAD_DENSITY * max(x2.numel(), 1)
    # a NaN or infinite gradient times a zero input is NaN in the dense product, as in the
    # reference: the event-driven one would skip it
    if not sparse or not bool(torch.isfinite(d_out2).all()):
        # computed transposed: the gradient gets the weights' column-major layout
        return x2.t().mm(d_out2).t(), G * N * I
    d_w_t = torch.empty(I, G, dtype=x2.dtype)
    tile_rows = max(1, WEIGHT_GRAD_TILE_BYTES // (G * x2.element_size()))
    macs = call(K.sparse_weight_grad, x2.dtype, x2.contiguous().numpy(),
                d_out2.contiguous().numpy(), valid.numpy(), tile_rows, d_w_t.numpy(), parallel)
    return d_w_t.t(), int(macs)


def _dense_recurrent_forward(K, gates, w_hh_t, b_hh, theta, y0, c0, len_np, zmode, zm,
                             zp, y, c_hat, gh_n, e, y_last, c_last):
    """The forward time loop with a dense ``gh = b_hh + y_{t-1}·W_hhᵀ`` per step (one matmul,
    B×H by H×G): faster than the event-driven product when most units fire.

    Same contract as ``layer_forward`` (writes y, c_hat, gh_n, e (T, B, H) at the valid steps,
    turns gates (T, B, G) into ``(r, z, n)``); writes y_last, c_last (B, H).
    """
    T, B, G = gates.shape
    H = G // 3
    y_prev = y0.clone().contiguous()
    c = c0.clone().contiguous()
    gh = torch.empty(B, G, dtype=gates.dtype)
    arrays = (gates.numpy(), gh.numpy(), theta.numpy(), len_np, zmode, zm.numpy(), zp,
              y_prev.numpy(), c.numpy(), y.numpy(), c_hat.numpy(), gh_n.numpy(), e.numpy())
    for t in range(T):
        torch.addmm(b_hh, y_prev, w_hh_t, out=gh)
        call(K.forward_cell_step, gates.dtype, t, *arrays)
    counters.recurrent += G * H * int(np.minimum(len_np, T).sum())  # a product per valid step
    y_last.copy_(y_prev)
    c_last.copy_(c)


def _check_lengths(lengths: Optional[torch.Tensor], T: int, B: int) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths).to("cpu", torch.int64).contiguous()
    if lengths.shape != (B,) or (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"expected lengths of shape ({B},) with values in [0, {T}], got {lengths.tolist()}")
    return lengths


def _run_event(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate,
               lengths, zoneout_p, zoneout_mask, reverse, dense_forward=False) -> LayerOutput:
    T, B = x.shape[:2]
    lengths = _check_lengths(lengths, T, B)
    xp = reverse_padded(x, lengths) if reverse else x
    inputs = (xp.contiguous(), state.y, state.c, weight_ih, weight_hh, bias_ih, bias_hh, threshold)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, c_hat, e, y_last, c_last = _EventLayer.apply(
            *inputs, lengths, zoneout_mask, zoneout_p, surrogate.dampening_factor,
            surrogate.pseudo_derivative_support, dense_forward)
    else:  # nothing to differentiate: no autograd Function
        (y, c_hat, e, y_last, c_last), _ = _forward_pass(*inputs, lengths, zoneout_mask,
                                                         zoneout_p, dense_forward)
    if reverse:
        y, e, c_hat = (reverse_padded(a, lengths) for a in (y, e, c_hat))
    return LayerOutput(y, EGRUState(y_last, c_last), e, c_hat)


def _outside_autocast(layer_fn):
    """``layer_fn`` run outside CPU autocast, on inputs in the weights' float type.

    Autocast would hand the kernels bfloat16 products they cannot take; the layer computes in
    its weights' type (float32 or float64) instead, as autocast itself leaves the elementwise
    cell and the recurrence in full precision.
    """

    @functools.wraps(layer_fn)
    def wrapped(x, state, weight_ih, weight_hh, *args, **kwargs):
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return layer_fn(x, state, weight_ih, weight_hh, *args, **kwargs)
        dtype = weight_hh.dtype
        with torch.autocast("cpu", enabled=False):
            state = EGRUState(state.y.to(dtype), state.c.to(dtype))
            return layer_fn(x.to(dtype), state, weight_ih, weight_hh, *args, **kwargs)

    return wrapped


@_outside_autocast
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


def prefers_event(batch: int, activity: float) -> bool:
    """Whether the event-driven recurrent product beats a dense one for this call (measured,
    docs/speed.md).

    A dense step is one ``(B, H) × (H, 3H)`` matmul at high efficiency, the event-driven step
    does ``activity`` of its MACs at lower efficiency: with up to 8 samples events won at every
    activity measured (even 1.0), with 32 they tie with the matmul at activity 0.5–0.7 and lose
    at 1.0 (by up to 1.4× at H = 1024). The backward pass chooses its own mode (see
    ``_EventLayer.backward``).
    """
    return batch < AUTO_DENSE_MIN_BATCH or activity < AUTO_ACTIVITY_LIMIT


AUTO_DENSE_MIN_BATCH = 16
AUTO_ACTIVITY_LIMIT = 0.75


@_outside_autocast
def egru_layer_auto(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
                    lengths=None, zoneout_p=0.0, zoneout_mask=None, reverse=False) -> LayerOutput:
    """``backend="auto"``: per call, the event-driven or a dense recurrent product.

    Both run in the event layer (the same cell kernels, the same backward); the choice uses the
    batch size and the activity this layer/direction had at its previous call (unknown at the
    first call: event-driven). Unsupported combinations use the reference backend.
    """
    kwargs = dict(lengths=lengths, zoneout_p=zoneout_p, zoneout_mask=zoneout_mask, reverse=reverse)
    args = (x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate)
    if unsupported(x, weight_hh, surrogate) is not None:
        return egru_layer(*args, **kwargs)
    key = id(threshold)
    activity = _last_activity.get(key, (None, 0.0))
    activity = activity[1] if activity[0] is not None and activity[0]() is threshold else 0.0
    out = _run_event(*args, **kwargs, dense_forward=not prefers_event(x.shape[1], activity))
    # counted in numpy: a torch reduction of this size runs in torch's thread pool, whose
    # synchronisation stalls when another process takes a core
    T, B, H = out.e.shape
    fired = np.count_nonzero(out.e.detach().numpy())
    valid = T * B if lengths is None else int(np.minimum(np.asarray(lengths), T).sum())
    _last_activity[key] = (weakref.ref(threshold), fired / max(valid * H, 1))
    return out
