"""The embedded eGRU in Q15 fixed point (numpy): the bit-exact statement of what a device computes.

Numbers. An activation ``a`` in [−1, 1) is the int16 ``round(a · 2^15)``, saturated to
[−32768, 32767] (Q15). A weight is its 3-bit code (:func:`egru.mcu.quantization_codes`): sign
and magnitude ``m``, value ``±2^(m−3)``. A bias is ``round(b · 2^15)`` in int32, saturated.

One step, every intermediate an int32 (the engine checks the sizes that keep it so):

1. ``u = [h, x]``; each gate's pre-activation ``v = bias + Σ_k w_k·u_k``, where a weight of
   magnitude ``m`` contributes ``±(u_k >> (3 − m))``: a shift, no multiplication. ``>>`` is
   the arithmetic shift, floor division by a power of two (C must write it so for negative
   numbers: ``~(~u >> s)``). The sum is saturated to int32 once, after the bias; before it, it
   cannot overflow while ``H + I ≤ 65,535``.
2. Softsign ``ς(v) = sign(v)·(1 − 1/(1 + |v|))``: in Q15
   ``sign(v)·min(2^15 − ⌊2^30 / (2^15 + |v|)⌋, 32767)`` (one 32-bit division per unit and gate;
   ``|v|`` is first saturated to ``2^31 − 1 − 2^15``).
3. The gate ``z = (ς_z + 2^15) >> 1`` in [0, 32767].
4. ``h_t = h + ((z · (h̃ − h) + 2^14) >> 15)``, saturated to int16: ``z·(h̃ − h) + 2^14`` is at
   most 32767 · 65535 + 2^14 < 2^31, and the ``2^14`` rounds to nearest.

Against the float cell with the same 3-bit weights, each step's error comes from rounding the
inputs and biases to Q15, the floors of the shifts (at most one unit per nonzero weight) and of
the division, and the final rounding: tests bound it on random inputs.
"""

from __future__ import annotations

import numpy as np

ONE = 1 << 15  # 1.0 in Q15
INT16 = (-(1 << 15), (1 << 15) - 1)
INT32 = (-(1 << 31), (1 << 31) - 1)
MAX_FAN_IN = 65_535  # H + I: the weighted sum of so many Q15 values fits an int32


def check_finite(values, name: str) -> np.ndarray:
    """``values`` as a float64 array; a ValueError naming them (``name``) if one is NaN or
    infinite. Every conversion to integers goes through here: rounding and saturating would turn
    such a value into an arbitrary integer without a word."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds {'NaN' if np.isnan(values).any() else 'inf'}")
    return values


def to_q15(values, bits: int = 16, name: str = "an input") -> np.ndarray:
    """Float values → Q15 integers (round to nearest, saturate to int16, or int32 for biases);
    ``name`` names them in the error for NaN or inf (:func:`check_finite`)."""
    low, high = INT16 if bits == 16 else INT32
    scaled = np.rint(check_finite(values, name) * ONE)
    return np.clip(scaled, low, high).astype(np.int64)


def from_q15(q) -> np.ndarray:
    return np.asarray(q, dtype=np.float64) / ONE


def check_fan_in(fan_in: int) -> None:
    if fan_in > MAX_FAN_IN:
        raise ValueError(f"H + I = {fan_in} is over {MAX_FAN_IN}: the weighted sum could overflow int32")


def shift_product(codes: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``Σ_k w_k · u_k`` for 3-bit weight codes (H, K) and Q15 inputs u (B, K): (B, H) int64,
    each term ``±(u_k >> (3 − m))``."""
    codes = np.asarray(codes, dtype=np.int64)
    m, sign = np.abs(codes), np.sign(codes)
    shift = np.where(m > 0, 3 - m, 0)
    terms = np.right_shift(u[:, None, :], shift[None, :, :]) * sign[None, :, :]  # floor shifts
    return terms.sum(axis=2)


def softsign(v: np.ndarray) -> np.ndarray:
    """Integer softsign of int32 pre-activations (Q15) → Q15 in [−32767, 32767]."""
    magnitude = np.minimum(np.abs(v), INT32[1] - ONE)
    return np.sign(v) * np.minimum(ONE - (1 << 30) // (ONE + magnitude), INT16[1])


def gate_preactivation(codes, bias, u) -> np.ndarray:
    total = shift_product(codes, u)
    if bias is not None:
        total = total + np.asarray(bias, dtype=np.int64)
    return np.clip(total, *INT32)


def step(x: np.ndarray, h: np.ndarray, codes_z, bias_z, codes_h, bias_h) -> np.ndarray:
    """One Q15 step: x (B, I), h (B, H) Q15 integers; codes (H, H + I); biases (H,) Q15 or None."""
    u = np.concatenate([h, x], axis=1).astype(np.int64)
    check_fan_in(u.shape[1])
    z = (softsign(gate_preactivation(codes_z, bias_z, u)) + ONE) >> 1
    candidate = softsign(gate_preactivation(codes_h, bias_h, u))
    update = (z * (candidate - h) + (1 << 14)) >> 15
    return np.clip(h + update, *INT16)


class Q15Layers:
    """Stacked embedded eGRU layers converted from float: ``layers`` is an
    :class:`egru.mcu.EmbeddedGRU` or a sequence of them (each feeding the next, so that layers
    may differ in size, as the paper's 30 → 20). Weights become their 3-bit codes under
    ``rule`` (default: the first cell's training rule, ``"paper"`` when it trained in float),
    biases Q15 int32.

    ``run(x)``: Q15 inputs (T, B, I) → the last layer's state at every step (T, B, H_last) and
    every layer's final state (a list of (B, H_k))."""

    def __init__(self, layers, rule: str | None = None):
        from .functional import quantization_codes  # torch only for the conversion

        modules = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        cells = [cell for module in modules for cell in module.cells]
        for before, cell in zip(cells, cells[1:]):
            if cell.input_size != before.hidden_size:
                raise ValueError(f"a layer of {before.hidden_size} units feeds one that expects "
                                 f"{cell.input_size} inputs")
        self.rule = rule or getattr(cells[0], "quantize", None) or "paper"

        def codes(weight, name):
            check_finite(weight.detach().cpu().numpy(), name)  # NaN would get code 0 and inf ±3, silently
            return quantization_codes(weight, self.rule).cpu().numpy().astype(np.int64)

        def bias(b, name):
            return None if b is None else to_q15(b.detach().cpu().numpy(), bits=32, name=name)

        self.cells = []
        for m, module in enumerate(modules):
            of_module = f" of module {m}" if len(modules) > 1 else ""
            for k, cell in enumerate(module.cells):
                check_fan_in(cell.hidden_size + cell.input_size)
                # a tensor's name in errors: its key in its module's state dict (and which module)
                name = {kind: f"cells.{k}.{kind}{of_module}" for kind in ("weight_z", "bias_z", "weight_h", "bias_h")}
                self.cells.append((codes(cell.weight_z, name["weight_z"]), bias(cell.bias_z, name["bias_z"]),
                                   codes(cell.weight_h, name["weight_h"]), bias(cell.bias_h, name["bias_h"])))
        self.input_size = cells[0].input_size
        self.hidden_sizes = [cell.hidden_size for cell in cells]

    def run(self, x: np.ndarray, h0: list | None = None):
        x = np.asarray(x, dtype=np.int64)
        T, B, _ = x.shape
        states = [np.zeros((B, H), np.int64) if h0 is None else np.asarray(h0[k], np.int64)
                  for k, H in enumerate(self.hidden_sizes)]
        outputs = []
        for x_t in x:
            inp = x_t
            for k, cell in enumerate(self.cells):
                states[k] = step(inp, states[k], *cell)
                inp = states[k]
            outputs.append(inp)
        return np.stack(outputs), states


# --- the dense head: Linear → ReLU → … → Linear, weights in int16 with a power-of-two scale ---

def scale_exponent(largest: float, name: str = "an input") -> int:
    """The smallest ``e ≥ 0`` for which ``largest / 2^e`` is below Q15's largest value, 32767/32768:
    values up to ``largest`` in magnitude, divided by ``2^e``, are Q15 without saturating.
    ``name`` names the values in the error for NaN or inf."""
    check_finite(largest, name)
    exponent = 0
    while largest >= (1 << exponent) * (INT16[1] / ONE):
        exponent += 1
    return exponent


def int16_weights(weight, name: str = "weight") -> tuple:
    """A float weight tensor as ``(int16 values, exponent e)``: ``w ≈ values · 2^(e − 15)`` with
    the smallest ``e ≥ 0`` for which every |w| fits; ``name`` names it in errors."""
    weight = check_finite(weight, name)
    largest = float(np.abs(weight).max(initial=0.0))
    exponent = scale_exponent(largest)
    if exponent > 15:
        raise ValueError(f"{name} holds a value of magnitude {largest:g}, beyond what int16 with a scale holds")
    return np.clip(np.rint(weight * (1 << (15 - exponent))), *INT16).astype(np.int64), exponent


def dense_weights(weight, bias, name: str = "linear") -> tuple:
    """A float Linear layer's weights as ``(int16 values, exponent e, int32 bias in Q15)``
    (:func:`int16_weights`); ``name`` names the layer in errors (``<name>.weight``, ``<name>.bias``)."""
    values, exponent = int16_weights(weight, f"{name}.weight")
    return values, exponent, None if bias is None else to_q15(bias, bits=32, name=f"{name}.bias")


def check_dense(inputs: int, exponent: int) -> None:
    if inputs >= 1 << (16 - exponent):  # that many shifted products of up to 2^(15 + e) each
        raise ValueError(f"{inputs} inputs with weights scaled by 2^{exponent}: the sum could overflow int32")


def dense(x: np.ndarray, values: np.ndarray, exponent: int, bias, relu: bool) -> np.ndarray:
    """A dense layer in Q15: each product ``w·x`` (at most 2^30) floor-shifted by ``15 − e``,
    summed in int32 (fewer than ``2^(16 − e)`` inputs, so the sum cannot overflow), the bias
    added with saturation; ReLU layers saturate to int16 (their outputs feed the next layer as
    Q15 activations), the last one gives int32 logits."""
    check_dense(x.shape[1], exponent)
    products = np.right_shift(x[:, None, :] * values[None, :, :], 15 - exponent)
    total = products.sum(axis=2) + (0 if bias is None else np.asarray(bias, dtype=np.int64))
    total = np.clip(total, *INT32)
    return np.clip(np.maximum(total, 0), *INT16) if relu else total


class Q15Classifier:
    """A classifier (recurrent layers, then dense layers with ReLU between them) in Q15: the
    recurrent layers (an :class:`egru.mcu.EmbeddedGRU` or a sequence of them) as
    :class:`Q15Layers`, each ``torch.nn.Linear`` of ``head`` by :func:`dense_weights`.
    ``logits(x)``: Q15 inputs (T, B, I) → int32 logits (B, classes) read from the last layer's
    state at the last step; ``classify(x)`` their argmax (the first of equal ones)."""

    def __init__(self, recurrent, head: list, rule: str | None = None):
        self.recurrent = Q15Layers(recurrent, rule)
        self.head = [dense_weights(layer.weight.detach().cpu().numpy(),
                                   None if layer.bias is None else layer.bias.detach().cpu().numpy(), f"head[{k}]")
                     for k, layer in enumerate(head)]
        width = self.recurrent.hidden_sizes[-1]
        for values, exponent, _ in self.head:
            if values.shape[1] != width:
                raise ValueError(f"a dense layer of {values.shape[1]} inputs follows {width} features")
            check_dense(width, exponent)
            width = values.shape[0]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.head_logits(self.recurrent.run(x)[0][-1])

    def head_logits(self, features: np.ndarray) -> np.ndarray:
        for k, (values, exponent, bias) in enumerate(self.head):
            features = dense(features, values, exponent, bias, relu=k < len(self.head) - 1)
        return features

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self.logits(x).argmax(axis=1)
