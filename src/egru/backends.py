"""The one place that chooses how a layer is computed.

A backend is a callable with the signature of :func:`egru.functional.egru_layer`: one layer and
direction over a whole sequence, returning a :class:`~egru.functional.LayerOutput`. Every
backend is tested against ``"reference"``.

* ``"reference"``: plain PyTorch autograd over a time loop, the clearest statement of SPEC §1.
* ``"event"``: the event-driven numba kernels, forward and sparse BPTT
  (:mod:`egru.kernels.event`). Calls the kernels cannot compute (:func:`unsupported`) use the
  reference, with one warning per reason.
* ``"triton"``: the event-driven Triton kernels for GPUs, forward and sparse BPTT
  (:mod:`egru.kernels.triton_event`); on the CPU only under Triton's interpreter
  (``TRITON_INTERPRET=1``). Calls they cannot compute use the reference, with one warning per
  reason.
* ``"auto"`` (the default of :class:`egru.EGRU`): on the CPU the event kernels with, per call,
  the event-driven or a dense recurrent forward product (:meth:`Auto.prefers_dense`); on a GPU
  the Triton kernels where Triton is installed; calls the kernels cannot compute silently use
  the reference.

How the kernels decide what depends on the data (sparse or dense input products and weight
gradients, weights kept by rows of their nonzeros, parallel or serial kernels) is set by the
thresholds of :class:`Tuning`.

Pruning masks (:mod:`egru.prune`) reach a backend as ``weight_ih_mask`` / ``weight_hh_mask``:
the event kernels then take the masks' zeros as structural (compressed rows, gradients only at
unpruned weights; :class:`egru.kernels.event.WeightMasks`); the reference ignores them.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
import weakref
from typing import Optional

import numpy as np
import torch

from . import functional
from .functional import LayerOutput, reverse_padded
from .kernels import event
from .state import EGRUState
from .surrogate import Triangle


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The thresholds of the event backend's choices (measured on two cores, docs/speed.md).

    sparse_input_density: the input product is event-driven below this fraction of nonzeros in
        the input (a stacked layer's input is the events of the layer below).
    sparse_weight_grad_density: a weight gradient is event-driven below this fraction of
        nonzeros in its input (the dense matmul wins above it: crossover 0.27–0.33).
    weight_grad_tile_bytes: gate gradients per tile of the event-driven weight gradient, about
        a core's L2 cache.
    sparse_weight_density: a weight is kept by rows of its nonzeros (each event then costs
        the nonzeros of its row, forward and in ``W_hᵀδ``) below this fraction of nonzeros in
        the weight (of its pruning mask, when it has one); 0 turns it off. At H = 1024 and
        activity 0.1 the crossover was about 0.2 for a batch-1 forward and about 0.15 for a
        training step at B = 32 (an indexed update costs about ten times a vectorised one).
    auto_dense_min_batch, auto_activity_limit: ``"auto"`` computes the forward recurrent
        product densely (one matmul per step) from this many samples on, when the layer's
        activity at its previous call reached the limit.
    thread_mode: ``"measured"`` (the parallel or serial kernels, whichever runs faster on this
        machine now), ``"parallel"`` or ``"serial"``.
    """
    sparse_input_density: float = 0.3
    sparse_weight_grad_density: float = 0.25
    weight_grad_tile_bytes: int = 1 << 20
    sparse_weight_density: float = 0.15
    auto_dense_min_batch: int = 16
    auto_activity_limit: float = 0.75
    thread_mode: str = "measured"

    def __post_init__(self):
        if not self.sparse_weight_density >= 0:
            raise ValueError(f"sparse_weight_density must be a fraction >= 0 (0: never), "
                             f"got {self.sparse_weight_density!r}")
        if self.thread_mode not in ("measured", "parallel", "serial"):
            raise ValueError(f"thread_mode must be 'measured', 'parallel' or 'serial', "
                             f"got {self.thread_mode!r}")


def unsupported(x: torch.Tensor, weight_hh: torch.Tensor, surrogate) -> Optional[str]:
    """Why the event kernels cannot compute this call, or None when they can."""
    if type(surrogate) is not Triangle:
        return f"surrogate {type(surrogate).__name__} is not supported (only Triangle)"
    if x.device.type != "cpu" or weight_hh.device.type != "cpu":
        return f"device {x.device.type} is not supported (CPU only)"
    if x.dtype not in (torch.float32, torch.float64) or weight_hh.dtype != x.dtype:
        return (f"dtype {x.dtype} with weights of {weight_hh.dtype} is not supported "
                "(float32 or float64, one for both)")
    # (torch.compile traces with functorch's machinery active: not a user's transform)
    if not torch.compiler.is_compiling() and _in_functorch_transform():
        return "torch.func transforms (vmap, grad, ...) are not supported"
    if not _numba_available():
        return "numba is not installed"
    return None


@torch.compiler.assume_constant_result  # imported once, outside any graph being traced
def _numba_available() -> bool:
    return event.runtime.kernels() is not None


def _in_functorch_transform() -> bool:
    """Whether a ``torch.func`` transform is active: its wrapped tensors have no data that the
    kernels could read."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _outside_autocast(layer_fn):
    """``layer_fn`` run outside CPU autocast, on inputs in the weights' float type.

    Autocast would hand the kernels bfloat16 products they cannot take; the layer computes in
    its weights' type (float32 or float64) instead, as autocast itself leaves the elementwise
    cell and the recurrence in full precision.
    """

    @functools.wraps(layer_fn)
    def wrapped(self, x, state, weight_ih, weight_hh, *args, **kwargs):
        if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
            return layer_fn(self, x, state, weight_ih, weight_hh, *args, **kwargs)
        dtype = weight_hh.dtype
        with torch.autocast("cpu", enabled=False):
            state = EGRUState(state.y.to(dtype), state.c.to(dtype))
            return layer_fn(self, x.to(dtype), state, weight_ih, weight_hh, *args, **kwargs)

    return wrapped


class Reference:
    """``backend="reference"``: :func:`egru.functional.egru_layer`."""

    name = "reference"

    def __call__(self, *args, weight_ih_mask=None, weight_hh_mask=None, **kwargs) -> LayerOutput:
        # pruning masks change nothing here: the weights are the masked ones already
        return functional.egru_layer(*args, **kwargs)


class Event:
    """``backend="event"``: :func:`egru.functional.egru_layer` with event-driven kernels."""

    name = "event"
    unsupported = staticmethod(unsupported)  # why its kernels cannot compute a call (None: they can)

    def __init__(self, tuning: Tuning = Tuning()):
        self.tuning = tuning
        self._warned: set = set()  # reasons already warned about, so each warns once

    @_outside_autocast
    def __call__(self, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
                 lengths=None, zoneout_p=0.0, zoneout_mask=None, reverse=False,
                 weight_ih_mask=None, weight_hh_mask=None) -> LayerOutput:
        args = (x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate)
        kwargs = dict(lengths=lengths, zoneout_p=zoneout_p, zoneout_mask=zoneout_mask,
                      reverse=reverse)
        reason = self.unsupported(x, weight_hh, surrogate)
        if reason is not None:
            self._fallback(reason)
            return functional.egru_layer(*args, **kwargs)
        masks = event.WeightMasks(weight_ih_mask, weight_hh_mask)
        return self._run(*args, **kwargs, masks=masks,
                         dense_forward=self._dense_forward(x.shape[1], threshold))

    def _dense_forward(self, batch: int, threshold) -> bool:
        """Whether this call takes the dense recurrent forward product: never, here."""
        return False

    def _fallback(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"egru backend '{self.name}': {reason}; using the reference backend instead",
                          RuntimeWarning, stacklevel=5)

    def _run(self, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
             lengths, zoneout_p, zoneout_mask, reverse, masks, dense_forward) -> LayerOutput:
        T, B = x.shape[:2]
        lengths = _check_lengths(lengths, T, B)
        xp = reverse_padded(x, lengths) if reverse else x
        inputs = event.LayerInputs(xp.contiguous(), state.y, state.c, weight_ih, weight_hh,
                                   bias_ih, bias_hh, threshold, lengths, zoneout_mask)
        t = self.tuning
        settings = event.Settings(
            float(zoneout_p), float(surrogate.dampening_factor),
            float(surrogate.pseudo_derivative_support), dense_forward, t.sparse_input_density,
            t.sparse_weight_grad_density, t.weight_grad_tile_bytes, t.thread_mode,
            t.sparse_weight_density)
        y, c_hat, e, y_last, c_last = event.layer(inputs, settings, masks)
        if reverse:
            y, e, c_hat = (reverse_padded(a, lengths) for a in (y, e, c_hat))
        return LayerOutput(y, EGRUState(y_last, c_last), e, c_hat)

    def __getstate__(self):  # pickled modules keep the tuning, not what was remembered
        return {"tuning": self.tuning}

    def __setstate__(self, state):
        self.__init__(state["tuning"])


def triton_unsupported(x: torch.Tensor, weight_hh: torch.Tensor, surrogate) -> Optional[str]:
    """Why the Triton kernels cannot compute this call, or None when they can."""
    if type(surrogate) is not Triangle:
        return f"surrogate {type(surrogate).__name__} is not supported (only Triangle)"
    if not _triton_available():
        return "triton is not installed"
    from .kernels import triton_event

    interpreted = triton_event.interpreted()
    if x.device.type != "cuda" and not (interpreted and x.device.type == "cpu"):
        return (f"device {x.device.type} is not supported (CUDA, or the CPU under TRITON_INTERPRET=1, "
                "which must be set before triton is imported)")
    if weight_hh.device != x.device:
        return "the input and the weights are on different devices"
    if x.dtype not in (torch.float32, torch.float64) or weight_hh.dtype != x.dtype:
        return (f"dtype {x.dtype} with weights of {weight_hh.dtype} is not supported "
                "(float32 or float64, one for both)")
    if 0 in x.shape:
        return "empty sequences or batches are not supported"
    if not torch.compiler.is_compiling() and _in_functorch_transform():
        return "torch.func transforms (vmap, grad, ...) are not supported"
    return None


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class Triton(Event):
    """``backend="triton"``: :func:`egru.functional.egru_layer` with the event-driven Triton
    kernels (the event backend's dispatch, its own kernels)."""

    name = "triton"
    unsupported = staticmethod(triton_unsupported)

    def _run(self, *args, masks, dense_forward, **kwargs) -> LayerOutput:
        return run_triton(*args, **kwargs)  # the weights arrive masked: pruning needs nothing more


def run_triton(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, *,
               lengths=None, zoneout_p=0.0, zoneout_mask=None, reverse=False,
               weight_ih_mask=None, weight_hh_mask=None) -> LayerOutput:
    """One layer and direction through :func:`egru.kernels.triton_event.layer`."""
    from .kernels import triton_event

    T, B = x.shape[:2]
    lengths = _check_lengths(lengths, T, B)
    xp = reverse_padded(x, lengths) if reverse else x
    valid = None if lengths is None else functional.valid_steps(lengths, T, B, x.device).to(torch.int8)
    mask = None if zoneout_mask is None else zoneout_mask.to(x.dtype).contiguous()
    y, c_hat, e, y_last, c_last = triton_event.layer(
        xp.contiguous(), state.y.contiguous(), state.c.contiguous(), weight_ih, weight_hh, bias_ih, bias_hh,
        threshold, valid, mask, float(zoneout_p), float(surrogate.dampening_factor),
        float(surrogate.pseudo_derivative_support))
    if reverse:
        y, e, c_hat = (reverse_padded(a, lengths) for a in (y, e, c_hat))
    return LayerOutput(y, EGRUState(y_last, c_last), e, c_hat)


class Auto(Event):
    """``backend="auto"``: per call, the event-driven or a dense recurrent forward product.

    Both run in the event kernels (the same cell, the same backward); the choice uses the batch
    size and the activity this layer and direction had at its previous call, remembered per
    threshold parameter (unknown at the first call, and not remembered inside
    ``torch.compile``: event-driven). Calls the kernels cannot compute use the reference.
    """

    name = "auto"

    def __init__(self, tuning: Tuning = Tuning()):
        super().__init__(tuning)
        self._activity: dict = {}  # id(threshold) → (weak reference to it, activity)

    def prefers_dense(self, batch: int, activity: float) -> bool:
        """Whether a dense recurrent product (one ``(B, H) × (H, 3H)`` matmul per step) beats
        the event-driven one: with up to 8 samples events won at every activity measured (even
        1.0), with 32 they tie at activity 0.5–0.7 and lose at 1.0 (docs/speed.md)."""
        t = self.tuning
        return batch >= t.auto_dense_min_batch and activity >= t.auto_activity_limit

    def _fallback(self, reason: str) -> None:
        pass  # auto chooses silently

    def __call__(self, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, **kwargs):
        if x.device.type == "cuda" and triton_unsupported(x, weight_hh, surrogate) is None:
            return run_triton(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, **kwargs)
        return super().__call__(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate, **kwargs)

    def _dense_forward(self, batch: int, threshold) -> bool:
        if torch.compiler.is_compiling():  # no memory a compiled graph could read
            return False
        return self.prefers_dense(batch, self.activity(threshold))

    def _run(self, x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold, surrogate,
             **kwargs) -> LayerOutput:
        out = super()._run(x, state, weight_ih, weight_hh, bias_ih, bias_hh, threshold,
                           surrogate, **kwargs)
        if not torch.compiler.is_compiling():
            self._remember(threshold, out.e, kwargs["lengths"])
        return out

    def activity(self, threshold: torch.Tensor) -> float:
        """The activity of the layer with this threshold at its previous call (0 if none)."""
        ref, activity = self._activity.get(id(threshold), (None, 0.0))
        return activity if ref is not None and ref() is threshold else 0.0

    def _remember(self, threshold, e, lengths) -> None:
        # counted in numpy: a torch reduction of this size runs in torch's thread pool, whose
        # synchronisation stalls when another process takes a core
        T, B, H = e.shape
        fired = np.count_nonzero(e.detach().numpy())
        valid = T * B if lengths is None else int(np.minimum(np.asarray(lengths), T).sum())
        key = id(threshold)
        if key not in self._activity:  # forgotten with the parameter
            forget = weakref.ref(threshold, lambda _: self._activity.pop(key, None))
        else:
            forget = self._activity[key][0]
        self._activity[key] = (forget, fired / max(valid * H, 1))


def _check_lengths(lengths, T: int, B: int) -> Optional[torch.Tensor]:
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths).to("cpu", torch.int64).contiguous()
    if lengths.shape != (B,) or (lengths < 0).any() or (lengths > T).any():
        raise ValueError(f"expected lengths of shape ({B},) with values in [0, {T}], "
                         f"got {lengths.tolist()}")
    return lengths


_BACKENDS = {"reference": Reference, "event": Event, "auto": Auto, "triton": Triton}


def available() -> list[str]:
    return sorted(_BACKENDS)


def resolve(name, tuning: Tuning = Tuning()):
    """A new backend ``name`` (each layer module holds its own: ``auto`` remembers activity per
    layer), or ``name`` itself when it is a backend already (e.g. ``Event(Tuning(...))``); a
    clear error for an unknown name."""
    if isinstance(name, (Reference, Event)):
        return name
    try:
        kind = _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; expected one of {available()}") from None
    return kind() if kind is Reference else kind(tuning)
