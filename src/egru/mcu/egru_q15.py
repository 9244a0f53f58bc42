"""The event-based EGRU (SPEC §1) in fixed point (numpy): the bit-exact statement of what the
exported C (:mod:`.egru_export`) computes, step by step, on a microcontroller.

A trained :class:`egru.EGRU` (unidirectional, any number of layers, or a list of such modules
stacked) and an optional linear readout become integers by :meth:`EGRUQ15.from_module`; the
readout reads the last layer's outputs ``y`` or, as the classification recipe's models do, their
output trace. Every number is an integer; the engine
computes in int64 numpy arrays but never holds a value that the C could not hold in the type
named here, and the converter checks the sizes that make this so.

Numbers.

* Activations and states (inputs ``x``, outputs ``y``, internal states ``c``, gates, thresholds)
  are Q15 int16: ``round(a · 2^15)`` saturated to [−32768, 32767] (:func:`.q15.to_q15`). Inputs
  larger than 1 enter divided by ``2^E`` (``input_exponent``, :meth:`EGRUQ15.inputs`), and the
  first layer's ``W_ih`` is multiplied by ``2^E`` before it is quantised, so the products are
  the same. A threshold of 1 or more saturates to
  32767, which no state exceeds: such a unit never fires, in float (where ``ĉ < 1``) as here.
* Weights are int16 with a per-tensor power-of-two scale (:func:`.q15.int16_weights`):
  ``W ≈ values · 2^(e − 15)``, ``e ≥ 0`` the smallest exponent for which the largest ``|w|``
  fits; ``W_ih`` and ``W_hh`` of each layer have their own ``e``.
* Gate sums are int32 at a per-layer accumulator scale ``2^−F``. A product ``w·u`` of an int16
  weight and a Q15 value is exact (``|w·u| ≤ 2^30``) at scale ``2^(e − 30)``; it enters the sum
  as ``round_shift(w·u, 30 − e − F)``. ``round_shift(a, s) = ⌊(a + 2^(s−1)) / 2^s⌋`` rounds
  halves up (``a`` itself when ``s = 0``); ``⌊·⌋`` is the arithmetic shift, which C must write
  portably for negative numbers (``~(~a >> s)``). Biases are ``round(b · 2^F)`` in int32.
  The converter takes the largest ``F`` (at most ``30 − e``, at least 15) for which the worst
  case of every gate row, ``Σ_k ⌈|w_k|·2^15 / 2^s⌉ + |b_ih| + |b_hh|`` plus the rounding term of
  the step below, fits an int32: the sums are never saturated because they cannot overflow, in
  any order of summation. A model whose sums would not fit even at ``F = 15`` is refused, as is
  one holding a NaN or infinite weight, bias or threshold (:func:`.q15.check_finite`).
* A gate's pre-activation goes to Q15 as ``round_shift(sum, F − 15)`` (an int32), then through
  the activation tables.

Activations. One table of the logistic sigmoid, ``σ(−16 + 16k/256)`` for k = 0 … 512 in Q15
(513 int16 entries, 1 KiB; ``σ(16) = 1`` saturates to 32767), read with linear interpolation:
``v`` clipped to [−16, 16) and offset by 16 gives ``u = k · 2^11 + f``, the result is
``T[k] + round_shift((T[k+1] − T[k]) · f, 11)``. ``tanh(v) = 2σ(2v) − 1``, read from the same
table at ``2v`` (``v`` first clipped to [−8, 8)). Over every Q15 input the error against the
exact functions is at most 2.2 units of 2^−15 for σ (6.7e-5) and 4.4 for tanh (1.3e-4); both
are monotone, σ(0) = 0.5 and tanh(0) = 0 exactly. σ gives [0, 32767], tanh [−32768, 32766].

One step of a layer, in ``torch.nn.GRU``'s gate order (r, z, n), rows ``[0, H)``, ``[H, 2H)``,
``[2H, 3H)``:

1. ``gi = b_ih + Σ_i round_shift(W_ih[:, i] · x_i, s_ih)``,
   ``gh = b_hh + Σ_j round_shift(W_hh[:, j] · y_j, s_hh)``. A unit without an event has
   ``y_j = 0`` and adds nothing, so the device sums only the columns of the units that fired
   at the previous step; a stacked layer's input is the layer below's ``y``, so likewise.
2. ``r = σ(q(gi_r + gh_r))``, ``z = σ(q(gi_z + gh_z))``,
   ``n = tanh(q(gi_n + round_shift(r · gh_n, 15)))`` with ``q`` the conversion to Q15.
   (``r · gh_n`` needs more than 32 bits; the C computes the same rounded value in 32-bit
   arithmetic by splitting ``gh_n`` into 16-bit halves.)
3. ``ĉ = mix(n, c_{t−1}, z)`` with ``mix(a, b, w) = sat16(a + round_shift(w · (b − a), 15))``,
   that is ``(1 − z)·n + z·c_{t−1}``; ``w · (b − a) + 2^14`` stays below 2^31. With zoneout
   ``p`` (its evaluation form, ``ĉ ← p·c_{t−1} + (1 − p)·ĉ``), then ``ĉ = mix(ĉ, c_{t−1}, P)``,
   ``P = round(p · 2^15)``.
4. The event ``e = ĉ > ϑ`` (strict, int16 against int16), ``y = e ? ĉ : 0``,
   ``c = e ? sat16(ĉ − ϑ) : ĉ``.

The output trace (with ``trace_alpha`` α, SPEC §1) of the last layer is
``tr_t = mix(y_t, tr_{t−1}, A)`` with ``A = round(α · 2^15)``, that is ``α·tr + (1 − α)·y``,
from ``tr_0 = 0``: one multiplication per unit and step (the trace decays where no event fired).
Each step rounds by at most half a unit of 2^−15 and its decay differs from α by
``|α − A/2^15|`` on a difference ``|tr − y| < 2``, and the filter forgets errors at the rate α:
the trace stays within ``(1/2 + 2^16·|α − A/2^15|) / (1 − α)`` units of the exact filter of the
same ``y`` (9 for α = 0.9).

The readout (an optional ``torch.nn.Linear``) is :func:`.q15.dense` without ReLU: int16 weights
with a power-of-two scale, floor-shifted products, int32 logits. On ``y`` it needs only the
units that fired; on the trace every unit.

Against the float model (same inputs, float64) the error of one step comes from the weight and
bias rounding, the tables and the final roundings: a few units of 2^−15 in ``ĉ`` for moderate
sizes. An event differs only where the float ``ĉ`` lies that close to the threshold, and once it
differs the two runs follow different states; tests measure both.
"""

from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple

import numpy as np

from . import q15
from .q15 import INT16, INT32, ONE, to_q15

TABLE_INTERVALS_LOG2 = 9  # 512 intervals, 513 entries
TABLE_RANGE_LOG2 = 4  # the sigmoid table covers [−16, 16)
TABLE_LIMIT = 1 << (15 + TABLE_RANGE_LOG2)  # 16.0 in Q15
TABLE_STEP_BITS = 15 + TABLE_RANGE_LOG2 + 1 - TABLE_INTERVALS_LOG2  # Q15 units per interval: 2^11
TANH_LIMIT = TABLE_LIMIT >> 1  # tanh reads σ at 2v: v in [−8, 8)
MIN_ACCUMULATOR_BITS = 15


def sigmoid_table() -> np.ndarray:
    """``σ`` at the 513 table points, in Q15 (int16, ``σ(16)`` saturated to 32767)."""
    points = np.arange((1 << TABLE_INTERVALS_LOG2) + 1) * (TABLE_LIMIT >> (TABLE_INTERVALS_LOG2 - 1)) - TABLE_LIMIT
    return to_q15(1.0 / (1.0 + np.exp(-points / ONE)))


SIGMOID_TABLE = sigmoid_table()


def round_shift(a, s: int) -> np.ndarray:
    """``⌊(a + 2^(s−1)) / 2^s⌋``: ``a / 2^s`` rounded to nearest, halves up; ``a`` when ``s = 0``."""
    a = np.asarray(a, dtype=np.int64)
    return (a + (1 << (s - 1))) >> s if s > 0 else a


def saturate16(a) -> np.ndarray:
    return np.clip(a, *INT16)


def sigmoid(v) -> np.ndarray:
    """``σ`` of Q15 values (any int32) by the table, with linear interpolation → Q15 in [0, 32767]."""
    u = np.clip(np.asarray(v, dtype=np.int64), -TABLE_LIMIT, TABLE_LIMIT - 1) + TABLE_LIMIT
    k, fraction = u >> TABLE_STEP_BITS, u & ((1 << TABLE_STEP_BITS) - 1)
    low, high = SIGMOID_TABLE[k], SIGMOID_TABLE[k + 1]
    return low + round_shift((high - low) * fraction, TABLE_STEP_BITS)


def tanh(v) -> np.ndarray:
    """``tanh(v) = 2σ(2v) − 1`` of Q15 values from the sigmoid table → Q15 in [−32768, 32766]."""
    return 2 * sigmoid(2 * np.clip(np.asarray(v, dtype=np.int64), -TANH_LIMIT, TANH_LIMIT - 1)) - ONE


def scale(gate, v) -> np.ndarray:
    """``round_shift(gate · v, 15)``: a Q15 gate in [0, 32767] times any int32 ``v``."""
    return round_shift(np.asarray(gate, dtype=np.int64) * v, 15)


def mix(a, b, weight) -> np.ndarray:
    """``(1 − w)·a + w·b`` as ``sat16(a + round_shift(w · (b − a), 15))`` for a Q15 ``w`` in
    [0, 32767] and int16 ``a``, ``b``."""
    return saturate16(a + round_shift(np.asarray(weight, dtype=np.int64) * (b - a), 15))


def gate_sums(weights: np.ndarray, shift: int, bias, u: np.ndarray) -> np.ndarray:
    """``bias + Σ_k round_shift(weights[:, k] · u_k, shift)`` for Q15 ``u`` (B, K) → (B, 3H)."""
    total = round_shift(u[:, None, :] * weights[None, :, :], shift).sum(axis=2)
    return total if bias is None else total + bias


def fire(c_hat: np.ndarray, threshold: np.ndarray):
    """The event rule and reset: ``e = ĉ > ϑ``, ``y = e ? ĉ : 0``, ``c = e ? sat16(ĉ − ϑ) : ĉ``.
    Returns ``(y, c, e)``."""
    e = c_hat > threshold
    return np.where(e, c_hat, 0), np.where(e, saturate16(c_hat - threshold), c_hat), e


def worst_case_terms(values: np.ndarray, shift: int) -> np.ndarray:
    """Per row, the largest ``Σ_k |round_shift(w_k · u_k, shift)|`` over Q15 inputs: each term
    is at most ``⌈|w_k| · 2^15 / 2^shift⌉``."""
    return (-((-np.abs(values) * ONE) >> shift)).sum(axis=1)


def quantize_bias(bias, bits: int, name: str = "bias"):
    """``round(b · 2^bits)`` in int32, saturated (None for None); ``name`` names it in errors."""
    if bias is None:
        return None
    return np.clip(np.rint(q15.check_finite(bias, name) * (1 << bits)), *INT32).astype(np.int64)


class Q15Layer(NamedTuple):
    """One layer's integers (see the module docstring): int16 weights, their sum shifts
    ``30 − e − F``, int32 biases at scale ``2^−F`` (or None), Q15 thresholds, ``F`` and the
    zoneout ``P`` (0 without zoneout)."""

    weight_ih: np.ndarray  # (3H, I) int16 values
    weight_hh: np.ndarray  # (3H, H)
    shift_ih: int
    shift_hh: int
    bias_ih: np.ndarray | None  # (3H,) int32 at scale 2^−F
    bias_hh: np.ndarray | None
    threshold: np.ndarray  # (H,) Q15
    accumulator_bits: int  # F
    zoneout: int  # P = round(p · 2^15)

    @property
    def hidden_size(self) -> int:
        return self.threshold.shape[0]

    @property
    def input_size(self) -> int:
        return self.weight_ih.shape[1]

    @classmethod
    def from_float(cls, weight_ih, weight_hh, bias_ih, bias_hh, threshold, zoneout: float = 0.0,
                   suffix: str = "") -> Q15Layer:
        """Quantise one layer given as float arrays (the module docstring's scheme). Errors name
        the arrays as the arguments, ``suffix`` appended (say ``"_l0"``)."""
        values_ih, exponent_ih = q15.int16_weights(weight_ih, f"weight_ih{suffix}")
        values_hh, exponent_hh = q15.int16_weights(weight_hh, f"weight_hh{suffix}")
        for bits in range(30 - max(exponent_ih, exponent_hh), MIN_ACCUMULATOR_BITS - 1, -1):
            shift_ih, shift_hh = 30 - exponent_ih - bits, 30 - exponent_hh - bits
            b_ih = quantize_bias(bias_ih, bits, f"bias_ih{suffix}")
            b_hh = quantize_bias(bias_hh, bits, f"bias_hh{suffix}")
            bound = worst_case_terms(values_ih, shift_ih) + worst_case_terms(values_hh, shift_hh)
            for b in (b_ih, b_hh):
                if b is not None:
                    bound = bound + np.abs(b)
            rounding = 1 << (bits - MIN_ACCUMULATOR_BITS - 1) if bits > MIN_ACCUMULATOR_BITS else 0
            if int(bound.max()) + rounding <= INT32[1]:
                return cls(values_ih, values_hh, shift_ih, shift_hh, b_ih, b_hh,
                           to_q15(threshold, name=f"threshold{suffix}"), bits, int(np.rint(zoneout * ONE)))
        largest = float(np.abs(weight_ih).sum(1).max() + np.abs(weight_hh).sum(1).max())
        raise ValueError(f"weights and biases too large for 32-bit gate sums: a gate row's sum of |w| reaches "
                         f"{largest:g}, and its worst case overflows an int32 even with 15 fractional bits")

    def step(self, x: np.ndarray, state: LayerState) -> tuple:
        """One step from the layer's input ``x`` (B, I) and ``state`` → ``(new state, events)``."""
        H = self.hidden_size
        gi = gate_sums(self.weight_ih, self.shift_ih, self.bias_ih, x)
        gh = gate_sums(self.weight_hh, self.shift_hh, self.bias_hh, state.y)
        to_q15_shift = self.accumulator_bits - MIN_ACCUMULATOR_BITS
        r = sigmoid(round_shift(gi[:, :H] + gh[:, :H], to_q15_shift))
        z = sigmoid(round_shift(gi[:, H:2 * H] + gh[:, H:2 * H], to_q15_shift))
        n = tanh(round_shift(gi[:, 2 * H:] + scale(r, gh[:, 2 * H:]), to_q15_shift))
        c_hat = mix(mix(n, state.c, z), state.c, self.zoneout)  # the second mix is zoneout (none at P = 0)
        y, c, e = fire(c_hat, self.threshold)
        return LayerState(y, c), e

    def stored_bytes(self) -> int:
        """Bytes of the layer's constant arrays on a device: int16 weights and thresholds, int32 biases."""
        biases = sum(b.size for b in (self.bias_ih, self.bias_hh) if b is not None)
        return 2 * (self.weight_ih.size + self.weight_hh.size + self.threshold.size) + 4 * biases


class LayerState(NamedTuple):
    """A layer's state, each (B, H) int16 values: the outputs ``y`` (zero where no event fired)
    and the internal states ``c``."""

    y: np.ndarray
    c: np.ndarray


class MacCount(NamedTuple):
    """Multiply-accumulates done, per layer, step and sample, by an implementation that sums
    only the columns of inputs that are events (as the exported C): the first layer's input
    product is dense (``3H·I``), a stacked layer's ``3H`` per event of the layer below at the
    same step, the recurrent product ``3H`` per event of the layer at the previous step, the
    readout ``classes`` per event of the last layer (when it is applied at that step; on the
    output trace ``classes · H``), the trace one per unit. Every weight of such a column is
    multiplied, zero or not. ``dense``: what computing every column costs per step and sample,
    for comparison."""

    input: np.ndarray  # (L, T, B)
    recurrent: np.ndarray  # (L, T, B)
    readout: np.ndarray  # (T, B)
    trace: int  # per step and sample: the last layer's units with an output trace, else 0
    dense: int

    @property
    def total(self) -> np.ndarray:
        """(T, B) all MACs of each step."""
        return self.input.sum(0) + self.recurrent.sum(0) + self.readout + self.trace


class Q15Run(NamedTuple):
    """A sequence through :meth:`EGRUQ15.run`, time-major: every layer's ``y``, ``c`` and events
    (lists of (T, B, H)), the output trace ((T, B, H) or None), the readout's int32 logits at
    every step ((T, B, classes) or None), the final state and the MACs done."""

    y: list
    c: list
    events: list
    trace: np.ndarray | None
    logits: np.ndarray | None
    state: list
    macs: MacCount

    @property
    def output(self) -> np.ndarray:
        """(T, B, H) the last layer's outputs."""
        return self.y[-1]


class EGRUQ15:
    """An event-based EGRU (and an optional linear readout) in fixed point; see the module
    docstring for the numbers and the step. Build it with :meth:`from_module`; run it with
    :meth:`step` or :meth:`run` on Q15 inputs (:meth:`inputs`).

    ``trace``: ``A``, the Q15 decay of the last layer's output trace, which the readout then
    reads (None: no trace, the readout reads ``y``). ``input_exponent``: ``E``, inputs enter
    divided by ``2^E``."""

    def __init__(self, layers: list, readout: tuple | None = None, trace: int | None = None,
                 input_exponent: int = 0):
        for below, layer in pairwise(layers):
            if layer.input_size != below.hidden_size:
                raise ValueError(f"a layer of {below.hidden_size} units feeds one that expects {layer.input_size} inputs")
        if trace is not None and not 0 <= trace < ONE:
            raise ValueError(f"the trace's decay must be a Q15 value in [0, 32767], got {trace}")
        self.layers = list(layers)
        self.readout = readout  # (int16 values (classes, H), exponent, int32 bias in Q15 or None)
        self.trace = trace
        self.input_exponent = input_exponent
        if readout is not None:
            if readout[0].shape[1] != self.hidden_size:
                raise ValueError(f"a readout of {readout[0].shape[1]} inputs follows {self.hidden_size} units")
            q15.check_dense(self.hidden_size, readout[1])

    @classmethod
    def from_module(cls, module, readout=None, trace_alpha: float | None = None,
                    input_exponent: int = 0) -> EGRUQ15:
        """Convert a trained :class:`egru.EGRU` (unidirectional), or a list of them of which each
        feeds the next, and optionally a ``torch.nn.Linear`` readout on the last layer's output
        or, with ``trace_alpha``, on its output trace. ``input_exponent``: see the class.
        Training-only parts (dropout, DropConnect) do not exist at inference; zoneout takes its
        evaluation form."""
        from torch import nn  # torch only for the conversion

        from ..modules import EGRU

        modules = list(module) if isinstance(module, (list, tuple, nn.ModuleList)) else [module]
        layers = []
        for m, module in enumerate(modules):
            if not isinstance(module, EGRU):
                raise TypeError(f"expected an egru.EGRU, got {type(module).__name__}")
            if module.bidirectional:
                raise ValueError("bidirectional EGRUs are not supported: a device runs forward in time, one step "
                                 "as each input arrives, and the reverse direction needs the whole sequence first")
            for k in range(module.num_layers):
                params = [None if p is None else p.detach().cpu().double().numpy() for p in module._layer_params(k, "")]
                if not layers:
                    params[0] = params[0] * 2.0 ** input_exponent  # the inputs enter divided by 2^E
                suffix = f"_l{k}" + (f" of module {m}" if len(modules) > 1 else "")  # as in the state dict
                layers.append(Q15Layer.from_float(*params, zoneout=module.zoneout, suffix=suffix))
        head = None
        if readout is not None:
            if not isinstance(readout, nn.Linear):
                raise TypeError(f"the readout must be a torch.nn.Linear, got {type(readout).__name__}")
            if readout.in_features != layers[-1].hidden_size:
                raise ValueError(f"a readout of {readout.in_features} inputs cannot follow {layers[-1].hidden_size} units")
            bias = None if readout.bias is None else readout.bias.detach().cpu().double().numpy()
            head = q15.dense_weights(readout.weight.detach().cpu().double().numpy(), bias, "readout")
        trace = None if trace_alpha is None else int(np.rint(trace_alpha * ONE))
        return cls(layers, head, trace, input_exponent)

    def inputs(self, x) -> np.ndarray:
        """Float inputs → the engine's Q15 inputs: ``x / 2^E``, rounded and saturated."""
        return to_q15(np.asarray(x, dtype=np.float64) / 2.0 ** self.input_exponent)

    @property
    def input_size(self) -> int:
        return self.layers[0].input_size

    @property
    def hidden_size(self) -> int:
        """The last layer's units (the readout's inputs)."""
        return self.layers[-1].hidden_size

    @property
    def classes(self) -> int:
        return 0 if self.readout is None else self.readout[0].shape[0]

    @property
    def stored_bytes(self) -> int:
        """Bytes of constant arrays a device stores: every layer's, the sigmoid table and the readout."""
        total = sum(layer.stored_bytes() for layer in self.layers) + 2 * SIGMOID_TABLE.size
        if self.readout is not None:
            values, _, bias = self.readout
            total += 2 * values.size + (0 if bias is None else 4 * bias.size)
        return total

    def initial_state(self, batch: int) -> list:
        """Zero outputs and states for every layer."""
        return [LayerState(np.zeros((batch, layer.hidden_size), np.int64), np.zeros((batch, layer.hidden_size), np.int64))
                for layer in self.layers]

    def step(self, x: np.ndarray, state: list) -> tuple:
        """One step of every layer, each feeding the next: Q15 ``x`` (B, I) and a state (a list of
        :class:`LayerState`) → ``(new state, events)``, events a list of (B, H) booleans."""
        new_state, events = [], []
        for layer, layer_state in zip(self.layers, state):
            layer_state, e = layer.step(x, layer_state)
            new_state.append(layer_state)
            events.append(e)
            x = layer_state.y
        return new_state, events

    def logits(self, features: np.ndarray) -> np.ndarray:
        """The readout of what it reads (B, H), the last layer's outputs ``y`` or their trace
        → int32 logits (B, classes)."""
        if self.readout is None:
            raise ValueError("this engine has no readout")
        return q15.dense(np.asarray(features, dtype=np.int64), *self.readout, relu=False)

    def classify(self, x) -> np.ndarray:
        """Q15 inputs (T, B, I) → the readout's class at the last step (B,), the first of equal
        logits."""
        return self.run(x).logits[-1].argmax(axis=1)

    @property
    def layer_sizes(self) -> list:
        return [layer.hidden_size for layer in self.layers]

    def update_trace(self, trace: np.ndarray, y: np.ndarray) -> np.ndarray:
        """One step of the output trace: ``α·trace + (1 − α)·y`` as ``mix(y, trace, A)``."""
        return mix(y, trace, self.trace)

    def run(self, x, state: list | None = None, trace: np.ndarray | None = None) -> Q15Run:
        """Q15 inputs (T, B, I), from ``state`` (zeros if omitted) and, with a trace, from
        ``trace`` (B, H) (zeros if omitted) → :class:`Q15Run`."""
        x = np.asarray(x)
        if x.dtype.kind not in "iu":
            raise ValueError(f"expected Q15 integers (egru.mcu.q15.to_q15), got {x.dtype}")
        if x.ndim != 3 or x.shape[2] != self.input_size or 0 in x.shape[:2]:
            raise ValueError(f"expected non-empty inputs (T, B, {self.input_size}), got shape {x.shape}: "
                             "sequences of different lengths (padded or packed) run one at a time, as on a device")
        if x.min(initial=0) < INT16[0] or x.max(initial=0) > INT16[1]:
            raise ValueError("inputs must be Q15 integers in [-32768, 32767]")
        x = x.astype(np.int64)
        state = self.initial_state(x.shape[1]) if state is None else [LayerState(*s) for s in state]
        fired_before = [s.y != 0 for s in state]
        if self.trace is not None and trace is None:
            trace = np.zeros((x.shape[1], self.hidden_size), np.int64)
        ys, cs, events, traces, logits = [], [], [], [], []
        for x_t in x:
            state, e = self.step(x_t, state)
            ys.append([s.y for s in state])
            cs.append([s.c for s in state])
            events.append(e)
            if self.trace is not None:
                trace = self.update_trace(trace, state[-1].y)
                traces.append(trace)
            if self.readout is not None:
                logits.append(self.logits(state[-1].y if self.trace is None else trace))
        events = _by_layer(events)
        return Q15Run(_by_layer(ys), _by_layer(cs), events, np.stack(traces) if traces else None,
                      np.stack(logits) if logits else None, state, self.count_macs(events, fired_before))

    def count_macs(self, events: list, fired_before: list | None = None) -> MacCount:
        """:class:`MacCount` from every layer's events (T, B, H) and the units with a nonzero
        output in the initial state (``fired_before``, (B, H) each; none if omitted)."""
        T, B = events[0].shape[:2]
        inputs, recurrent = [], []
        for k, (layer, e) in enumerate(zip(self.layers, events)):
            rows = 3 * layer.hidden_size
            before = np.zeros((B, layer.hidden_size), bool) if fired_before is None else fired_before[k]
            previous = np.concatenate([before[None], e[:-1]])
            recurrent.append(rows * previous.sum(-1))
            inputs.append(np.full((T, B), rows * layer.input_size) if k == 0 else rows * events[k - 1].sum(-1))
        if self.trace is None:
            readout, trace = self.classes * events[-1].sum(-1), 0
        else:
            readout, trace = np.full((T, B), self.classes * self.hidden_size), self.hidden_size
        dense = sum(3 * layer.hidden_size * (layer.input_size + layer.hidden_size) for layer in self.layers)
        return MacCount(np.stack(inputs), np.stack(recurrent), readout, trace,
                        dense + self.classes * self.hidden_size + trace)


def _by_layer(steps: list) -> list:
    """Per step a list over layers → per layer an array over steps."""
    return [np.stack(per_layer) for per_layer in zip(*steps)]
