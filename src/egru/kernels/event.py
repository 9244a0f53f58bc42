"""The event-driven CPU layer as PyTorch operators: ``egru::event_layer`` and its backward.

One layer and direction in processing order, computed by the numba kernels of
:mod:`egru.kernels._event_numba` (SPEC §1, §2). The work follows the events:

* forward, the recurrent product touches only the rows of ``W_hhᵀ`` of units that fired at the
  previous step (``3H·|A_{t-1}|`` MACs per sample and step); the input product is one dense
  matmul for all steps, or event-driven when the input is itself sparse (a stacked layer's
  input is the previous layer's ``y``); with ``dense_forward`` the recurrent product is one
  matmul per step instead (faster when most units of many samples fire);
* backward (sparse BPTT), ``W_hhᵀ·δ_t`` is computed only for blocks of units that fired or lie
  inside the surrogate's support at step ``t−1``; the weight gradients are one product each
  after the time loop, event-driven over the nonzeros of their input when those are few, and
  the gradient of the input is skipped when the input needs none (a first layer's data);
* a weight with few nonzeros (below ``sparse_weight_density``; pruned, SPEC §3) is kept by
  rows of its nonzeros, so that an event costs the nonzeros of its row in the forward products
  and in ``W_hhᵀ·δ_t``; with a pruning mask (:class:`WeightMasks`: its zeros are structural)
  the weight's gradient is computed at the mask's nonzeros only and is exactly zero elsewhere.

Registered with ``torch.library`` (a fake implementation for shapes, an autograd formula), so
``torch.compile`` traces a model through the layer without graph breaks. Decisions that need
the data are made here, by the rules and thresholds the caller passes in :class:`Settings`:
sparse or dense input product and weight gradient (by the density of the input), dense
products wherever a weight or gradient is not finite (an event-driven product would skip a
NaN that a dense one propagates), and the parallel or serial kernels (measured as they run).
Everything else (support, fallback, the ``auto`` policy, the thresholds themselves) is chosen
by :mod:`egru.backends`. This module imports nothing of the package.

Saved for the backward pass: the gates ``(r, z, n)``, ``W_hn y + b_hn``, the outputs and
candidate states; events and previous states are recomputed from them exactly. The backward
pass cannot be differentiated again.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import weakref
from typing import NamedTuple, Optional

try:
    import fcntl
except ImportError:  # not on Windows: first compilations are not serialised across processes
    fcntl = None

import numpy as np
import torch
from torch import Tensor

from .thread_modes import ThreadModes

_NUMBA_MODULE = "egru.kernels._event_numba"
_NUMPY_TYPES = {torch.float32: np.float32, torch.float64: np.float64}


class LayerInputs(NamedTuple):
    """The tensors of one call, in processing order: x (T, B, I); y0, c0 (B, H); w_ih (G, I),
    w_hh (G, H), b_ih and b_hh (G,) or None; theta (H,); lengths (B,) int64 or None (every
    sequence has T steps); zoneout_mask (T, B, H) keep-mask or None."""
    x: Tensor
    y0: Tensor
    c0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    b_ih: Optional[Tensor]
    b_hh: Optional[Tensor]
    theta: Tensor
    lengths: Optional[Tensor]
    zoneout_mask: Optional[Tensor]


class Settings(NamedTuple):
    """How one call is computed.

    zoneout_p: zoneout probability (without a mask: the evaluation form ``p·c + (1 − p)·ĉ``);
    gamma, k: the triangle surrogate ``gamma·max(0, 1 − k|v|)``; dense_forward: one matmul per
    step for the recurrent product instead of the event-driven one; sparse_input_density,
    sparse_weight_grad_density: the event-driven input product / weight gradient is used below
    this fraction of nonzeros in their input (of the dense product's MACs, when the weight is
    kept in compressed rows); weight_grad_tile_bytes: bytes of the gate gradients per tile of
    the event-driven weight gradient; thread_mode: ``"measured"`` (parallel or serial kernels,
    whichever is faster as they run), ``"parallel"`` or ``"serial"``; sparse_weight_density:
    a weight is kept in compressed rows (its nonzeros per input unit) below this fraction of
    nonzeros (of its mask's nonzeros when it has a pruning mask); 0: never.
    """
    zoneout_p: float
    gamma: float
    k: float
    dense_forward: bool
    sparse_input_density: float
    sparse_weight_grad_density: float
    weight_grad_tile_bytes: int
    thread_mode: str
    sparse_weight_density: float = 0.0


class WeightMasks(NamedTuple):
    """Pruning masks of w_ih (G, I) and w_hh (G, H), or None: a mask declares the weight's
    zeros structural (the weight is zero wherever its mask is; a pruned module's weight is
    ``orig·mask``). With a mask, the weight is kept by rows of the mask's nonzeros (when
    sparse enough) and its gradient is computed only there, exactly zero elsewhere: the true
    gradient of a weight at a zero entry is not zero in general, but ``orig·mask`` multiplies
    it by zero anyway. Entries of the weight outside its mask are taken as zero."""
    w_ih: Optional[Tensor] = None
    w_hh: Optional[Tensor] = None


# --- the runtime state of the kernels ---------------------------------------------------------


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
    * torch's threads: numba's threads are started (:meth:`start_threads`) before the first
      call of every kernel, so that starting them cannot change torch's thread count.
    """

    def __init__(self, kernels):
        self._kernels = kernels
        self._ready: set = set()  # (kernel, dtype) compiled or loaded in this process
        self._thread_lock = threading.RLock()
        self._started = False  # numba's threads, see start_threads

    def __call__(self, kernel, dtype, *args):
        if (kernel, dtype) not in self._ready:
            self.start_threads()  # a kernel's first call may be the process's first parallel region
            with _cache_lock(kernel), self._thread_lock:
                result = kernel(*args)
            self._ready.add((kernel, dtype))
            return result
        if self._threading_layer() in (None, "workqueue"):
            with self._thread_lock:
                return kernel(*args)
        return kernel(*args)

    def start_threads(self) -> None:
        """Start numba's threads if they are not running yet, keeping torch's intra-op thread count.

        As numba's OpenMP layer starts its threads it sets the thread count of the OpenMP
        runtime, which torch's operations share (one libgomp in the process), to numba's own:
        a process that gave torch fewer threads than cores (``torch.set_num_threads``,
        ``OMP_NUM_THREADS``, the measured modes of :mod:`.thread_modes`: threads that
        synchronise often stall on busy cores) would otherwise run every later torch operation
        on all cores."""
        if self._started:
            return
        with self._thread_lock:
            if self._started:
                return
            threads = torch.get_num_threads()
            try:
                self._kernels.numba.get_num_threads()  # starts them
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
            self._started = True

    def _threading_layer(self) -> Optional[str]:
        """numba's threading layer once a parallel region has run, else None."""
        try:
            return self._kernels.numba.threading_layer()
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


class Counters:
    """Multiply-accumulates the event kernels actually performed, summed over calls.

    ``recurrent``: forward recurrent product, ``3H·Σ|A_{t-1}|`` over valid steps and samples
    (a dense step counts ``3H·H``); ``input``: forward input product when it ran event-driven
    (``3H·nnz(x)`` over valid steps); ``backward_recurrent``: ``W_hᵀδ`` products, done for
    blocks of four units; ``backward_weight``: recurrent weight gradient (when it is a dense
    matmul, the matmul's MACs); ``backward_input``: the gradient of the input (when needed).
    With a weight in compressed rows, an event or nonzero input counts the nonzeros of its row
    instead of ``3H`` (the MACs touched), and the weight gradient at a pruning mask counts the
    mask's nonzeros of each event's row.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.recurrent = self.input = self.backward_recurrent = self.backward_weight = 0
        self.backward_input = 0
        self.calls = 0


class _WeightMemo:
    """Values derived from weights, kept while a weight is unchanged: the same tensor object,
    storage and autograd version (``_version``, bumped by optimiser steps and other in-place
    changes through the tensor and its views), plus an optional ``check`` value of the
    caller's. Fresh products (DropConnect's masked weights) are computed every time."""

    def __init__(self, size: int):
        self.size = size
        self.entries: dict = {}

    def get(self, w: Tensor, compute, check=None):
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


class Runtime:
    """What the kernels keep between calls: the numba module (imported on first use), the
    guarded kernel calls, the measured thread modes, per-weight memos (transposes, finiteness)
    and the MAC counters."""

    def __init__(self):
        self._kernels = None
        self._calls = None
        self.thread_modes = ThreadModes()
        self.counters = Counters()
        self._transposes = _WeightMemo(size=32)
        self._finite = _WeightMemo(size=64)
        self._nonzeros = _WeightMemo(size=64)  # weight → its number of nonzeros
        self._rows = _WeightMemo(size=32)  # weight → (its compressed rows, all finite)
        self._patterns = _WeightMemo(size=64)  # pruning mask → (start, idx) of its nonzeros

    def kernels(self):
        """The numba kernel module, or None when numba cannot be imported."""
        if self._kernels is None:
            try:
                self._kernels = importlib.import_module(_NUMBA_MODULE)
            except ImportError:
                return None
            self._calls = KernelCalls(self._kernels)
        return self._kernels

    def call(self, kernel, dtype, *args):
        return self._calls(kernel, dtype, *args)

    def numba_threads(self) -> int:
        """numba's thread count (its threads started as :meth:`KernelCalls.start_threads` does)."""
        self._calls.start_threads()
        return self._kernels.numba.get_num_threads()

    def transposed(self, w: Tensor) -> Tensor:
        """``w.t().contiguous()``, kept while the weight is unchanged.

        ``EGRU`` stores its weights column by column, so that ``w.t()`` is already contiguous:
        it is returned as it is, nothing cached or checked. Weights in the row-major layout
        (assigned by the user, a ``torch.nn.GRU``'s) are transposed and cached: a transpose of
        ``W_hh`` costs about as much as the whole recurrent product of a short, very sparse
        sequence, and parameters change only at optimiser steps. Autograd's version counter
        misses writes through ``.data`` (as ``torch.autograd.gradcheck`` perturbs inputs) and
        through numpy views, so an entry is reused only if a fingerprint of the contents (one
        read of ``w``, about a tenth of the cost of transposing it) matches too.
        """
        w_t = w.detach().t()
        if w_t.is_contiguous():
            return w_t
        if w.requires_grad and w.grad_fn is not None:  # a fresh product: no fingerprint needed
            return w_t.contiguous()
        return self._transposes.get(w, w_t.contiguous, check=self._fingerprint(w))

    def _fingerprint(self, w: Tensor) -> int:
        w = w.detach()
        if not w.is_contiguous() and w.t().is_contiguous():  # EGRU's column-major weights
            w = w.t()
        bits = w.contiguous().view(-1).view(torch.int32).numpy().view("uint32")
        with np.errstate(over="ignore"):  # wrapping is intended (seen without the JIT only)
            return int(self.call(self._kernels.fingerprint, None, bits))

    def finite(self, w: Tensor) -> bool:
        """Whether a weight holds only finite values, kept per version of the weight."""
        return self._finite.get(w, lambda: bool(torch.isfinite(w.detach()).all()))

    def compressed_rows(self, w: Tensor, mask: Optional[Tensor], s: "Settings"):
        """``(rows, finite)``: the compressed rows (``SparseRows``) of ``w.t()`` when its
        fraction of nonzeros is below ``s.sparse_weight_density`` (of its pruning mask's
        nonzeros, when ``mask`` is given), and whether their values are all finite; else the
        placeholder of dense rows and None (not checked).

        With a mask, the pattern (which entries) is kept per version of the mask buffer and the
        values are gathered from ``w``, O(nnz): at each call where ``w`` is a fresh product
        (``orig·mask`` made for autograd), else kept per version of ``w`` and of the mask (a
        pruned module hands the same masked weight to every call without gradients until
        ``orig`` or the mask changes). Without one, the number of nonzeros is kept per
        version of the weight (a dense weight is then never read again), and compressed rows
        per version and fingerprint (one read of the weight per call: writes through ``.data``
        and numpy views do not bump the version; see :meth:`transposed`).
        """
        K = self._kernels
        dense = K.no_rows(_NUMPY_TYPES[w.dtype]), None
        limit = s.sparse_weight_density * w.numel()
        if limit <= 0:
            return dense
        if mask is not None:
            start, idx = self._patterns.get(mask, lambda: self._mask_pattern(mask, w.dtype))
            if start[-1] >= limit:
                return dense

            def gather():
                w_t = self.transposed(w).numpy()
                vals, finite = self.call(K.gather_rows, w_t.dtype, start, idx, w_t)
                return K.SparseRows(True, start, idx, vals), bool(finite)

            return self._rows.get(w, gather, check=(id(mask), mask._version, mask.data_ptr()))
        if self._nonzeros.get(w, lambda: int(torch.count_nonzero(w.detach()))) >= limit:
            return dense
        fresh = w.requires_grad and w.grad_fn is not None
        return self._rows.get(w, lambda: self._nonzero_rows(self.transposed(w).numpy()),
                              check=None if fresh else self._fingerprint(w))

    def _nonzero_rows(self, w_t: np.ndarray):
        K = self._kernels
        start, idx, vals = self.call(K._nonzeros_by_row, w_t.dtype, w_t,
                                     np.ones(w_t.shape[0], np.bool_))
        rows = K.SparseRows(True, start, idx.astype(K.index_type(w_t.shape[1])), vals)
        return rows, bool(np.isfinite(vals).all())

    def _mask_pattern(self, mask: Tensor, dtype):
        """``(start, idx)`` of the nonzeros of a mask (G, C) by rows of its transpose."""
        m = mask.detach().t()
        if m.dtype != dtype:  # (bool or integer masks: in the weight's type, as compiled)
            m = (m != 0).to(dtype)
        rows, _ = self._nonzero_rows(m.contiguous().numpy())
        return rows.start, rows.idx

    @contextlib.contextmanager
    def threads(self, key, units: float, mode: str):
        """Yields whether to run the parallel kernels (True) or their serial twins: serial on one
        numba thread, else as ``mode`` says, ``"measured"`` timing the block."""
        if mode == "serial" or self.numba_threads() == 1:
            yield False
        elif mode == "parallel":
            yield True
        else:
            with self.thread_modes.timed(key, units) as parallel:
                yield parallel


runtime = Runtime()


# --- forward ------------------------------------------------------------------------------------


def _forward(inputs: LayerInputs, s: Settings, masks: WeightMasks = WeightMasks()):
    """The forward pass outside autograd: ``(y, c_hat, e, y_last, c_last, gates, gh_n)``, the
    last two kept for the backward pass."""
    K = runtime.kernels()
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zoneout_mask = inputs
    T, B, I = x.shape
    H = w_hh.shape[1]
    G = 3 * H
    dtype = x.dtype
    b_ih = torch.zeros(G, dtype=dtype) if b_ih is None else b_ih.detach().contiguous()
    b_hh = torch.zeros(G, dtype=dtype) if b_hh is None else b_hh.detach().contiguous()
    # numpy rather than torch for the small bookkeeping: a torch call costs more, most of all
    # when caches are cold (after other models ran)
    len_np = np.full(B, T, np.int64) if lengths is None else lengths.numpy()
    x2 = x.detach().reshape(T * B, I)
    x_np = x2.contiguous().numpy()
    counters = runtime.counters
    ih_rows, ih_finite = runtime.compressed_rows(w_ih, masks.w_ih, s)
    # the event-driven product's cost, as a fraction of the dense rows' at every input
    cost = np.count_nonzero(x_np) / max(x_np.size, 1) * _relative_cost(ih_rows, w_ih.numel(), s)
    if cost < s.sparse_input_density and _finite(w_ih, ih_finite):
        gates = torch.empty(T * B, G, dtype=dtype)
        valid = np.arange(T)[:, None] < len_np[None, :]
        # a short product is held up by a descheduled thread for longer than it takes on one
        key = ("input product", B, I, G, dtype, ih_rows.used)
        with runtime.threads(key, T, s.thread_mode) as parallel:
            counters.input += runtime.call(
                K.sparse_input_product, dtype, x_np, runtime.transposed(w_ih).numpy(), ih_rows,
                b_ih.numpy(), valid.reshape(-1), gates.numpy(), parallel)
        gates = gates.view(T, B, G)
    else:
        gates = torch.addmm(b_ih, x2, w_ih.detach().t()).view(T, B, G)

    # the kernels write every valid step; padded ones must read as zero
    alloc = torch.empty if lengths is None else torch.zeros
    y, c_hat, gh_n, e = (alloc(T, B, H, dtype=dtype) for _ in range(4))
    y_last = torch.empty(B, H, dtype=dtype)
    c_last = torch.empty_like(y_last)
    out = K.ForwardOutputs(y.numpy(), c_hat.numpy(), gh_n.numpy(), e.numpy(), y_last.numpy(),
                           c_last.numpy())
    rec = K.Recurrence(runtime.transposed(w_hh).numpy(), b_hh.numpy(),
                       theta.detach().contiguous().numpy(), len_np)
    zoneout = _zoneout(K, zoneout_mask, s.zoneout_p, x_np.dtype)
    y0, c0 = y0.detach().contiguous(), c0.detach().contiguous()
    hh_rows, hh_finite = runtime.compressed_rows(w_hh, masks.w_hh, s)
    if s.dense_forward or not _finite(w_hh, hh_finite):
        _dense_recurrent_forward(K, gates, y0, c0, rec, zoneout, out)
        counters.recurrent += G * H * int(np.minimum(len_np, T).sum())  # a matmul per valid step
    else:
        # whole samples per thread: one parallel region per call; one sample runs serially, as
        # the parallel form would synchronise the threads at every step
        macs = np.zeros(B, np.int64)
        parallel = s.thread_mode != "serial" and B > 1 and runtime.numba_threads() > 1
        runtime.call(K.layer_forward if parallel else K.layer_forward_serial, dtype,
                     gates.numpy(), y0.numpy(), c0.numpy(), rec, hh_rows, zoneout, out, macs)
        counters.recurrent += int(macs.sum())
    counters.calls += 1
    return y, c_hat, e, y_last, c_last, gates, gh_n


def _relative_cost(rows, entries: int, s: Settings) -> float:
    """The time of an event-driven product through a weight's compressed rows relative to
    its dense rows (1 for dense rows): its fraction of nonzeros over ``sparse_weight_density``,
    the fraction where the two take the same time (a compressed row costs more per MAC: an
    indexed access per nonzero instead of a vectorised stretch of a row). The choices between
    event-driven and dense products then compare this cost times the input's density with
    their thresholds, as they compare the input's density alone for dense rows."""
    if not rows.used:
        return 1.0
    return rows.start[-1] / max(entries, 1) / s.sparse_weight_density


def _finite(w: Tensor, rows_finite: Optional[bool]) -> bool:
    """Whether a weight is finite: checked on its compressed rows where it has them (entries
    outside a pruning mask are taken as zero), else on the whole weight (kept per version)."""
    return runtime.finite(w) if rows_finite is None else rows_finite


def _zoneout(K, mask: Optional[Tensor], p: float, dtype):
    """The kernels' Zoneout bundle: the training mask, or the evaluation form (p > 0), or none
    (the mask is then a placeholder the kernels do not read)."""
    if mask is not None:
        return K.Zoneout(K.ZONEOUT_MASK, mask.detach().contiguous().numpy(), float(p))
    mode = K.ZONEOUT_EVAL if p > 0 else K.ZONEOUT_NONE
    return K.Zoneout(mode, np.zeros((1, 1, 1), dtype), float(p))


def _dense_recurrent_forward(K, gates, y0, c0, rec, zoneout, out):
    """The forward time loop with a dense ``gh = b_hh + y_{t-1}·W_hhᵀ`` per step (one matmul,
    B×H by H×G). Same contract as ``layer_forward``."""
    T, B, G = gates.shape
    y_prev = y0.clone()
    c = c0.clone()
    gh = torch.empty(B, G, dtype=gates.dtype)
    w_hh_t, b_hh = torch.from_numpy(rec.w_hh_t), torch.from_numpy(rec.b_hh)
    for t in range(T):
        torch.addmm(b_hh, y_prev, w_hh_t, out=gh)
        runtime.call(K.forward_cell_step, gates.dtype, t, gates.numpy(), gh.numpy(), rec, zoneout,
                     y_prev.numpy(), c.numpy(), out)
    out.y_last[:] = y_prev.numpy()
    out.c_last[:] = c.numpy()


@torch.library.custom_op("egru::event_layer", mutates_args=(), device_types="cpu")
def event_layer(x: Tensor, y0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                b_ih: Optional[Tensor], b_hh: Optional[Tensor], theta: Tensor,
                lengths: Optional[Tensor], zoneout_mask: Optional[Tensor], zoneout_p: float,
                gamma: float, k: float, dense_forward: bool, sparse_input_density: float,
                sparse_weight_grad_density: float, weight_grad_tile_bytes: int,
                thread_mode: str, sparse_weight_density: float = 0.0,
                w_ih_mask: Optional[Tensor] = None, w_hh_mask: Optional[Tensor] = None,
                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer and direction: ``(y, c_hat, e, y_last, c_last, gates, gh_n)`` (the arguments
    are those of :class:`LayerInputs`, :class:`Settings` and :class:`WeightMasks`; the last
    two outputs are saved for the backward pass)."""
    inputs = LayerInputs(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zoneout_mask)
    settings = Settings(zoneout_p, gamma, k, dense_forward, sparse_input_density,
                        sparse_weight_grad_density, weight_grad_tile_bytes, thread_mode,
                        sparse_weight_density)
    return _forward(inputs, settings, WeightMasks(w_ih_mask, w_hh_mask))


@event_layer.register_fake
def _event_layer_fake(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zoneout_mask,
                      *settings_and_masks):
    T, B, _ = x.shape
    H = w_hh.shape[1]
    sequence = [x.new_empty(T, B, H) for _ in range(3)]
    return (*sequence, x.new_empty(B, H), x.new_empty(B, H), x.new_empty(T, B, 3 * H),
            x.new_empty(T, B, H))


def layer(inputs: LayerInputs, settings: Settings, masks: WeightMasks = WeightMasks()):
    """``(y, c_hat, e, y_last, c_last)`` of one layer and direction in processing order,
    differentiable in every tensor of ``inputs`` but lengths and zoneout_mask (the masks are
    not differentiated either)."""
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in inputs)
    if not needs_graph and not torch.compiler.is_compiling():
        # nothing to differentiate, nothing to trace: the implementation without the
        # dispatcher, whose bookkeeping is a noticeable part of a sparse B = 1 forward
        return _forward(inputs, settings, masks)[:5]
    return event_layer(*inputs, *settings, *masks)[:5]


# --- backward -----------------------------------------------------------------------------------


_N_SETTINGS = len(Settings._fields)


def _setup_context(ctx, inputs, output):
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zoneout_mask, *rest = inputs
    settings, masks = rest[:_N_SETTINGS], WeightMasks(*rest[_N_SETTINGS:])
    y, c_hat, _, _, _, gates, gh_n = output
    ctx.mark_non_differentiable(gates, gh_n)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, y0, c0, w_ih, w_hh, theta, lengths, zoneout_mask, gates, gh_n,
                          c_hat, y, *masks)
    ctx.settings = Settings(*settings)
    ctx.n_inputs = len(inputs)
    ctx.has_bias = (b_ih is not None, b_hh is not None)


def _backward(ctx, g_y, g_c_hat, g_e, g_y_last, g_c_last, _g_gates, _g_gh_n):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: autograd would silently drop the second-order terms
        raise RuntimeError(
            "egru backend 'event'/'auto': the event kernels' backward pass cannot be "
            "differentiated again (create_graph=True, double backward); use "
            "backend='reference' for gradient penalties and higher derivatives")
    need = ctx.needs_input_grad
    needs = [need[0], need[1], need[2], need[3], need[4], ctx.has_bias[0] and need[5],
             ctx.has_bias[1] and need[6], need[7]]
    saved, masks = ctx.saved_tensors[:12], ctx.saved_tensors[12:]
    # plain tensors run without the operator's dispatch, as inference does; traced ones (fake
    # or functional tensors while torch.compile builds the backward graph) need the operator
    plain = type(saved[0]) is torch.Tensor
    backward = _layer_backward if plain else event_layer_backward
    grads = backward(*saved, g_y, g_c_hat, g_e, g_y_last, g_c_last, needs, *ctx.settings, *masks)
    grads = tuple(g if n else None for g, n in zip(grads, needs))
    return grads + (None,) * (ctx.n_inputs - len(grads))


event_layer.register_autograd(_backward, setup_context=_setup_context)


class _Saved(NamedTuple):
    x: Tensor
    y0: Tensor
    c0: Tensor
    w_ih: Tensor
    w_hh: Tensor
    theta: Tensor
    lengths: Optional[Tensor]
    zoneout_mask: Optional[Tensor]
    gates: Tensor
    gh_n: Tensor
    c_hat: Tensor
    y: Tensor


class _Needs(NamedTuple):
    x: bool
    y0: bool
    c0: bool
    w_ih: bool
    w_hh: bool
    b_ih: bool
    b_hh: bool
    theta: bool


def _layer_backward(
        x: Tensor, y0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, theta: Tensor,
        lengths: Optional[Tensor], zoneout_mask: Optional[Tensor], gates: Tensor, gh_n: Tensor,
        c_hat: Tensor, y: Tensor, g_y: Optional[Tensor], g_c_hat: Optional[Tensor],
        g_e: Optional[Tensor], g_y_last: Optional[Tensor], g_c_last: Optional[Tensor],
        needs: list[bool], zoneout_p: float, gamma: float, k: float, dense_forward: bool,
        sparse_input_density: float, sparse_weight_grad_density: float,
        weight_grad_tile_bytes: int, thread_mode: str, sparse_weight_density: float = 0.0,
        w_ih_mask: Optional[Tensor] = None, w_hh_mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta)`` (empty where ``needs`` is
    false) from those of ``(y, c_hat, e, y_last, c_last)`` (None: zero); with a pruning mask,
    a weight's gradient only at the mask's nonzeros (zero elsewhere, see :class:`WeightMasks`)."""
    saved = _Saved(x, y0, c0, w_ih, w_hh, theta, lengths, zoneout_mask, gates, gh_n, c_hat, y)
    settings = Settings(zoneout_p, gamma, k, dense_forward, sparse_input_density,
                        sparse_weight_grad_density, weight_grad_tile_bytes, thread_mode,
                        sparse_weight_density)
    return _backward_impl(saved, (g_y, g_c_hat, g_e, g_y_last, g_c_last), _Needs(*needs),
                          settings, WeightMasks(w_ih_mask, w_hh_mask))


event_layer_backward = torch.library.custom_op(
    "egru::event_layer_backward", mutates_args=(), device_types="cpu")(_layer_backward)


@event_layer_backward.register_fake
def _event_layer_backward_fake(x, y0, c0, w_ih, w_hh, theta, lengths, zoneout_mask, gates,
                               gh_n, c_hat, y, g_y, g_c_hat, g_e, g_y_last, g_c_last, needs,
                               *settings_and_masks):
    T, B, I = x.shape
    H = y.shape[-1]
    G = 3 * H
    shapes = [(T, B, I), (B, H), (B, H), None, None, (G,), (G,), (H,)]
    out = [x.new_empty(shape) for shape in shapes[:3]]
    out += [x.new_empty(I, G).t(), x.new_empty(H, G).t()]  # column-major, as computed
    out += [x.new_empty(shape) for shape in shapes[5:]]
    return tuple(t if n else x.new_empty(0) for t, n in zip(out, needs))


def _backward_impl(saved: _Saved, output_grads, needs: _Needs, s: Settings,
                   masks: WeightMasks = WeightMasks()):
    K = runtime.kernels()
    x, y0, c0, w_ih, w_hh, theta, lengths, zoneout_mask, gates, gh_n, c_hat, y = saved
    T, B, I = x.shape
    H = y.shape[-1]
    G = 3 * H
    dtype = x.dtype
    g_y, g_c_hat, g_e, g_y_last, g_c_last = output_grads
    len_np = np.full(B, T, np.int64) if lengths is None else lengths.numpy()
    placeholder = np.zeros((1, 1, 1), gates.numpy().dtype)

    def given(g, shape):
        return (torch.zeros(shape, dtype=dtype) if g is None else g.contiguous()).numpy()

    grads = K.OutputGrads(given(g_y, (T, B, H)),
                          placeholder if g_e is None else g_e.contiguous().numpy(),
                          placeholder if g_c_hat is None else g_c_hat.contiguous().numpy(),
                          g_e is not None, g_c_hat is not None,
                          given(g_y_last, (B, H)), given(g_c_last, (B, H)))
    y0, c0 = y0.detach().contiguous(), c0.detach().contiguous()
    # the kernels write every valid step; padded ones must read as zero
    d_gi = (torch.empty if (len_np == T).all() else torch.zeros)(T, B, G, dtype=dtype)
    d_theta = torch.zeros(B, H, dtype=dtype)
    d_y0 = torch.empty(B, H, dtype=dtype)
    d_c0 = torch.empty_like(d_y0)
    out = K.InputGrads(d_gi.numpy(), d_theta.numpy(), d_y0.numpy(), d_c0.numpy())
    rec = K.Recurrence(runtime.transposed(w_hh).numpy(), np.zeros(0, placeholder.dtype),
                       theta.detach().contiguous().numpy(), len_np)
    zoneout = _zoneout(K, zoneout_mask, s.zoneout_p, placeholder.dtype)
    hh_rows, hh_finite = runtime.compressed_rows(w_hh, masks.w_hh, s)
    if hh_rows.used and not hh_finite:  # as the forward: non-finite weights go dense
        hh_rows = K.no_rows(placeholder.dtype)
    macs = np.zeros(H, np.int64)
    key = ("backward", B, H, dtype, hh_rows.used)
    with runtime.threads(key, T, s.thread_mode) as parallel:
        runtime.call(K.layer_backward if parallel else K.layer_backward_serial, dtype,
                     K.Saved(gates.numpy(), gh_n.numpy(), c_hat.numpy(), c0.numpy()), rec,
                     hh_rows, zoneout, K.Surrogate(float(s.gamma), float(s.k)), grads, out,
                     macs)
    counters = runtime.counters
    counters.backward_recurrent += int(macs.sum())

    def none():  # an output not asked for (each its own: outputs may not alias)
        return x.new_empty(0)

    d_gi2 = d_gi.view(T * B, G)
    x2 = x.detach().reshape(T * B, I)
    valid = (torch.from_numpy(len_np) > torch.arange(T).unsqueeze(1)).view(-1)
    ih_rows, ih_finite = K.no_rows(placeholder.dtype), None
    if needs.x or needs.w_ih:
        ih_rows, ih_finite = runtime.compressed_rows(w_ih, masks.w_ih, s)
    # dx is skipped when x needs no gradient (a first layer's input is data)
    dx = none()
    if needs.x:
        dx, input_macs = _input_grad(K, d_gi2, w_ih, ih_rows, ih_finite, parallel, s)
        dx = dx.view(T, B, I)
        counters.backward_input += input_macs
    d_w_ih = none()
    if needs.w_ih:
        d_w_ih = _weight_grad(K, x2, d_gi2, valid, parallel, s, masks.w_ih, ih_rows)[0]
    d_b_ih = d_gi2.sum(0) if needs.b_ih or needs.b_hh else none()
    # the gradient of W_hh y_{t-1} + b_hh equals d_gi but for the reset gate's factor on the n
    # rows: turn d_gi into it in place (it is not needed any more)
    d_gi[..., 2 * H:] *= gates[..., :H]
    d_w_hh = d_b_hh = None
    if needs.w_hh:
        y_prev = torch.cat([y0.unsqueeze(0), y.detach()[:-1]]).view(T * B, H)
        d_w_hh, weight_macs = _weight_grad(K, y_prev, d_gi2, valid, parallel, s, masks.w_hh,
                                           hh_rows)
        counters.backward_weight += weight_macs
    if needs.b_hh:  # the same as d_b_ih but for the n rows
        d_b_hh = torch.cat([d_b_ih[:2 * H], d_gi2[:, 2 * H:].sum(0)])
    return (dx, d_y0 if needs.y0 else none(), d_c0 if needs.c0 else none(), d_w_ih,
            none() if d_w_hh is None else d_w_hh, d_b_ih if needs.b_ih else none(),
            none() if d_b_hh is None else d_b_hh, d_theta.sum(0) if needs.theta else none())


def _all_finite(K, a: Tensor) -> bool:
    """Whether a contiguous tensor holds no NaN or infinity: one vectorised pass, without the
    boolean tensor of ``torch.isfinite`` (10⁷ entries at B = 32, H = 1024)."""
    return bool(runtime.call(K._all_finite, a.dtype, a.detach().contiguous().view(-1).numpy()))


def _input_grad(K, d_out2, w: Tensor, rows, finite, parallel, s: Settings):
    """``d_out2·w`` (N, I) from d_out2 (N, G) and w (G, I), and the MACs done: one dense
    matmul, or through the compressed rows of a sparse weight (rows, finite: as
    :meth:`Runtime.compressed_rows` gives them; one AXPY along N per nonzero of the weight, on
    the gate gradients transposed), unless a weight or gradient is not finite (the dense
    product's NaN from ``0·NaN``)."""
    N, G = d_out2.shape
    if not (rows.used and finite and _all_finite(K, d_out2)):
        return d_out2.mm(w.detach()), N * G * w.shape[1]
    d_t = d_out2.t().contiguous()
    dx_t = torch.empty(w.shape[1], N, dtype=d_out2.dtype)
    # tiles of the transposed gradients of about a third of the last-level cache (12 MiB)
    tile_cols = max(1, 12 * s.weight_grad_tile_bytes // (G * d_out2.element_size()))
    macs = runtime.call(K.compressed_input_grad, d_out2.dtype, rows, d_t.numpy(), dx_t.numpy(),
                        tile_cols, parallel)
    return dx_t.t().contiguous(), macs


def _weight_grad(K, x2, d_out2, valid, parallel, s: Settings, mask=None, rows=None):
    """``Σ_n d_out[n] ⊗ x[n]`` (G, I) from x2 (N, I) and d_out2 (N, G) over the rows where
    valid (N,) is true (d_out is zero at the others), and the MACs done: one dense matmul, or
    event-driven over the nonzeros of x when they are few, with the parallel kernels or their
    serial twins (as the backward pass chose).

    With a pruning mask (G, I) the gradient is zero wherever the mask is (see
    :class:`WeightMasks`); where the weight has compressed rows of the mask's nonzeros (rows,
    ``SparseRows`` of the transposed weight, used), the event-driven product computes it only
    at those, each nonzero of x costing the mask's nonzeros of its row."""
    N, I = x2.shape
    G = d_out2.shape[1]
    restricted = mask is not None and rows is not None and rows.used
    cost = float(torch.count_nonzero(x2)) / max(x2.numel(), 1)
    if restricted:
        cost *= _relative_cost(rows, I * G, s)
    sparse = cost < s.sparse_weight_grad_density
    # a NaN or infinite gradient times a zero input is NaN in the dense product, as in the
    # reference: the event-driven one would skip it (and at a mask's nonzeros only, the NaN
    # of a non-finite input at the others)
    if sparse:
        sparse = _all_finite(K, d_out2) and (not restricted or _all_finite(K, x2))
    if not sparse:
        # computed transposed: the gradient gets the weights' column-major layout
        d_w = x2.t().mm(d_out2).t()
        if mask is not None:  # (times 0, not set to 0: NaN stays NaN, as in orig·mask's)
            d_w.mul_(mask != 0)
        return d_w, G * N * I
    d_w_t = torch.empty(I, G, dtype=x2.dtype)
    tile_rows = max(1, s.weight_grad_tile_bytes // (G * x2.element_size()))
    macs = runtime.call(K.sparse_weight_grad, x2.dtype, x2.contiguous().numpy(),
                        d_out2.contiguous().numpy(), valid.numpy(), tile_rows, d_w_t.numpy(),
                        parallel, rows if restricted else None)
    d_w = d_w_t.t()
    if mask is not None and not restricted:
        d_w.mul_(mask != 0)
    return d_w, int(macs)
