"""C export of the event-based EGRU's fixed-point engine (:mod:`.egru_q15`): a self-contained,
event-driven C99 library.

``export_egru_c(engine, out_dir, name)`` writes ``<name>.h`` and ``<name>.c`` for an
:class:`.egru_q15.EGRUQ15`: the int16 weights (stored column by column: the ``3H`` weights one
input or one unit feeds are contiguous), int32 biases, Q15 thresholds and the sigmoid table as
constant arrays, and these functions (no floating point, no allocation, nothing beyond
``<stdint.h>``)::

    void <name>_reset(<name>_state *state);
    void <name>_step(const int16_t x[INPUT], <name>_state *state);
    int  <name>_classify(const <name>_state *state, int32_t logits[CLASSES]);  /* with a readout */

``<name>_state`` holds every layer's outputs ``y`` and internal states ``c`` (one layer after
the other), per layer the list of the units that fired at the last step, and the last layer's
output trace where the engine has one. A step applies the event rule unit by unit and appends
each unit that fires to its layer's list; the next step's recurrent product adds only the weight
columns of the units on that list, and a stacked layer's input product only those of the layer
below's list. The first layer's input product is dense. ``classify`` applies the readout to the
output trace (every unit) or to the last layer's outputs (only over its list) and returns the
predicted class (the first of equal logits).

Compiled with ``-DEGRU_DENSE``, the same source adds every column, fired or not: the results are
the same (a unit without an event adds zeros), and the instructions are those of the same model
computed densely, for comparison.

``write_egru_test_vectors(engine, inputs, out_dir, name)`` adds ``<name>_vectors.h`` (Q15 input
sequences and what the Python engine computes from them: the last layer's outputs and every
layer's number of events at every step, every layer's final internal state, the final output
trace where there is one and, with a readout, the final logits) and ``<name>_check.c``, a
program that counts the values that differ (host: ``cc -std=c99 <name>.c <name>_check.c``;
device: :mod:`.device`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import egru_q15, q15
from .export import ADD_SATURATED, MAX_HIDDEN, PRINTING, SATURATE16, SHIFT_RIGHT, _array

MAX_UNITS = 65_535  # unit indices are uint16_t

ENGINE = r"""
/* a / 2^s rounded to nearest, halves up; a itself when s = 0 */
static int32_t round_shift(int32_t a, int s) { return s > 0 ? shift_right(a + ((int32_t)1 << (s - 1)), s) : a; }

/* The logistic sigmoid of a Q15 value from the table, with linear interpolation. */
static int32_t sigmoid(int32_t v) {
    int32_t u, k, fraction;
    if (v < -TABLE_LIMIT) v = -TABLE_LIMIT;
    if (v > TABLE_LIMIT - 1) v = TABLE_LIMIT - 1;
    u = v + TABLE_LIMIT;
    k = u >> TABLE_STEP_BITS;
    fraction = u & ((1 << TABLE_STEP_BITS) - 1);
    return sigmoid_table[k] + round_shift((sigmoid_table[k + 1] - sigmoid_table[k]) * fraction, TABLE_STEP_BITS);
}

/* tanh(v) = 2 sigmoid(2v) - 1 */
static int32_t tanh_q15(int32_t v) {
    if (v < -TANH_LIMIT) v = -TANH_LIMIT;
    if (v > TANH_LIMIT - 1) v = TANH_LIMIT - 1;
    return 2 * sigmoid(2 * v) - 32768;
}

/* round_shift(gate * v, 15) for a gate in [0, 32767] and any int32 v, in 32 bits: with
   v = hi * 2^16 + lo (0 <= lo < 2^16), gate * v / 2^15 = 2 * gate * hi + gate * lo / 2^15, and
   gate * lo + 2^14 < 2^31 */
static int32_t scale(int32_t gate, int32_t v) {
    int32_t hi = shift_right(v, 16);
    uint32_t lo = (uint32_t)v & 0xFFFFu;
    return 2 * gate * hi + (int32_t)(((uint32_t)gate * lo + 16384u) >> 15);
}

/* (1 - weight) * a + weight * b for a Q15 weight in [0, 32767], saturated to int16 */
static int32_t mix(int32_t a, int32_t b, int32_t weight) {
    return saturate16(a + shift_right(weight * (b - a) + 16384, 15));
}

/* sums[row] += round_shift(column[row] * u, shift) for the ROWS weights that one input feeds.
   The exporter checked that no sum of a gate row can overflow, in any order. */
static void add_column(int32_t *sums, const int16_t *column, int32_t u, int shift) {
    int row;
    for (row = 0; row < ROWS; row++) sums[row] += round_shift((int32_t)column[row] * u, shift);
}

typedef struct {
    const int16_t *weight_ih, *weight_hh; /* column after column: ROWS weights per input, per unit */
    const int32_t *bias_ih, *bias_hh;     /* at the accumulator's scale; 0 without biases */
    const int16_t *threshold;
    int shift_ih, shift_hh, to_q15_shift;
    int32_t zoneout;
} layer_weights;

/* One layer's step. The input product runs over every input when `input_active` is 0 (the first
   layer) and otherwise over the `input_count` units of the layer below that fired at this step;
   the recurrent product over the units that fired at the previous step, whose list the event
   rule then rewrites. */
static void layer_step(const layer_weights *layer, const int16_t *input, const uint16_t *input_active,
                       int input_count, int16_t *y, int16_t *c, uint16_t *active, uint16_t *active_count) {
    int32_t gi[ROWS], gh[ROWS];
    int k, fired = 0;
    for (k = 0; k < ROWS; k++) {
        gi[k] = layer->bias_ih ? layer->bias_ih[k] : 0;
        gh[k] = layer->bias_hh ? layer->bias_hh[k] : 0;
    }
    for (k = 0; k < input_count; k++) {
        int i = input_active ? input_active[k] : k;
        add_column(gi, layer->weight_ih + i * ROWS, input[i], layer->shift_ih);
    }
#ifdef EGRU_DENSE
    for (k = 0; k < HIDDEN; k++) add_column(gh, layer->weight_hh + k * ROWS, y[k], layer->shift_hh);
#else
    for (k = 0; k < *active_count; k++)
        add_column(gh, layer->weight_hh + active[k] * ROWS, y[active[k]], layer->shift_hh);
#endif
    for (k = 0; k < HIDDEN; k++) {
        int32_t r = sigmoid(round_shift(gi[k] + gh[k], layer->to_q15_shift));
        int32_t z = sigmoid(round_shift(gi[HIDDEN + k] + gh[HIDDEN + k], layer->to_q15_shift));
        int32_t n = tanh_q15(round_shift(gi[2 * HIDDEN + k] + scale(r, gh[2 * HIDDEN + k]), layer->to_q15_shift));
        int32_t c_hat = mix(n, c[k], z);
        if (layer->zoneout) c_hat = mix(c_hat, c[k], layer->zoneout);
        if (c_hat > layer->threshold[k]) { /* an event: send the value, subtract the threshold */
            y[k] = (int16_t)c_hat;
            c[k] = saturate16(c_hat - layer->threshold[k]);
            active[fired++] = (uint16_t)k;
        } else {
            y[k] = 0;
            c[k] = (int16_t)c_hat;
        }
    }
    *active_count = (uint16_t)fired;
}
"""

READOUT = r"""
/* The readout: bias + sum of (w * u) >> shift (egru.mcu.q15.dense) over the `count` units of
   `u` listed in `active`, or over every unit when `active` is 0 (a unit without an event has
   y = 0 and adds nothing; the trace is read whole). */
static void readout(const int16_t *u, const uint16_t *active, int count, int32_t *logits) {
    int o, k;
    for (o = 0; o < CLASSES; o++) {
        int32_t total = 0;
        for (k = 0; k < count; k++) {
            int i = active ? active[k] : k;
            total += shift_right((int32_t)readout_weight[o * HIDDEN + i] * u[i], READOUT_SHIFT);
        }
        logits[o] = LOGIT;
    }
}
"""


def _check(engine) -> None:
    if not isinstance(engine, egru_q15.EGRUQ15):
        raise TypeError(f"expected an egru.mcu.egru_q15.EGRUQ15, got {type(engine).__name__}")
    sizes = {layer.hidden_size for layer in engine.layers}
    if len(sizes) != 1:
        raise ValueError(f"every layer must have the same number of units, got {sorted(sizes)}")
    H = engine.hidden_size
    if H > MAX_HIDDEN:
        raise ValueError(f"hidden size {H} is over the {MAX_HIDDEN} units this exporter supports")
    if engine.input_size > MAX_UNITS:
        raise ValueError(f"input size {engine.input_size} is over the {MAX_UNITS} inputs this exporter supports")


def export_egru_c(engine, out_dir, name: str = "egru_events") -> dict:
    """Write ``<name>.h`` and ``<name>.c`` for ``engine`` (an :class:`.egru_q15.EGRUQ15`) into
    ``out_dir``; returns their paths and ``stored_bytes``, the bytes of the constant arrays
    (weights, biases, thresholds, the sigmoid table, the readout), equal to the engine's."""
    if not name.isidentifier():
        raise ValueError(f"name must be a C identifier, got {name!r}")
    _check(engine)
    H, L, upper = engine.hidden_size, len(engine.layers), name.upper()
    defines = {"LAYERS": L, "INPUT": engine.input_size, "HIDDEN": H, "UNITS": L * H,
               "INPUT_EXPONENT": engine.input_exponent}
    declarations = [f"void {name}_reset({name}_state *state);",
                    f"void {name}_step(const int16_t x[{upper}_INPUT], {name}_state *state);"]
    if engine.readout is not None:
        defines["CLASSES"] = engine.classes
        declarations.append(f"int {name}_classify(const {name}_state *state, int32_t logits[{upper}_CLASSES]);")
    trace_field = (f"\n    int16_t trace[{upper}_HIDDEN];     /* the last layer's output trace */"
                   if engine.trace is not None else "")
    header = (f"/* {name}: an event-based EGRU in fixed point, generated by egru.mcu.export_egru_c.\n"
              f"   Inputs are Q15 values of x / 2^{upper}_INPUT_EXPONENT. */\n"
              f"#ifndef {upper}_H\n#define {upper}_H\n#include <stdint.h>\n\n"
              + "".join(f"#define {upper}_{key} {value}\n" for key, value in defines.items())
              + f"""
typedef struct {{
    int16_t y[{upper}_UNITS];       /* outputs: the value where a unit fired, 0 elsewhere; layer after layer */
    int16_t c[{upper}_UNITS];       /* internal states after the reset */
    uint16_t active[{upper}_UNITS]; /* per layer, the units that fired at the last step, in increasing order */
    uint16_t active_count[{upper}_LAYERS];{trace_field}
}} {name}_state;

""" + "\n".join(declarations) + "\n\n#endif\n")

    body = [(f'/* Generated by egru.mcu.export_egru_c: edit the model, not this file. */\n#include "{name}.h"\n\n'
             f"enum {{ HIDDEN = {H}, ROWS = {3 * H}, TABLE_STEP_BITS = {egru_q15.TABLE_STEP_BITS} }};\n"
             f"#define TABLE_LIMIT ((int32_t){egru_q15.TABLE_LIMIT}) /* 16 in Q15: the sigmoid table covers [-16, 16) */\n"
             f"#define TANH_LIMIT ((int32_t){egru_q15.TANH_LIMIT})\n\n")]
    stored = 0

    def array(ctype, array_name, values):
        nonlocal stored
        values = np.asarray(values).ravel()
        body.append(_array(ctype, array_name, values))
        stored += {"int32_t": 4, "int16_t": 2}[ctype] * values.size
        return array_name

    array("int16_t", "sigmoid_table", egru_q15.SIGMOID_TABLE)
    descriptors = []
    for k, layer in enumerate(engine.layers):
        fields = [array("int16_t", f"weight_ih{k}", layer.weight_ih.T),  # transposed: a column per input
                  array("int16_t", f"weight_hh{k}", layer.weight_hh.T),
                  "0" if layer.bias_ih is None else array("int32_t", f"bias_ih{k}", layer.bias_ih),
                  "0" if layer.bias_hh is None else array("int32_t", f"bias_hh{k}", layer.bias_hh),
                  array("int16_t", f"threshold{k}", layer.threshold),
                  layer.shift_ih, layer.shift_hh,
                  layer.accumulator_bits - egru_q15.MIN_ACCUMULATOR_BITS, layer.zoneout]
        descriptors.append("    {" + ", ".join(map(str, fields)) + "}")
    readout_bias = engine.readout is not None and engine.readout[2] is not None
    if engine.readout is not None:
        values, exponent, bias = engine.readout
        body.append(f"\nenum {{ CLASSES = {engine.classes}, READOUT_SHIFT = {15 - exponent} }};\n")
        array("int16_t", "readout_weight", values)
        if readout_bias:
            array("int32_t", "readout_bias", bias)
    body.append(SHIFT_RIGHT + (ADD_SATURATED if readout_bias else "") + SATURATE16 + ENGINE)
    body.append(f"\nstatic const layer_weights layers[{upper}_LAYERS] = {{\n" + ",\n".join(descriptors) + "\n};\n")
    trace_reset = ("\n    for (i = 0; i < HIDDEN; i++) state->trace[i] = 0;" if engine.trace is not None else "")
    trace_step = ("" if engine.trace is None else f"""
    for (k = 0; k < HIDDEN; k++) /* the output trace: alpha * trace + (1 - alpha) * y */
        state->trace[k] = (int16_t)mix(state->y[({upper}_LAYERS - 1) * HIDDEN + k], state->trace[k], TRACE_ALPHA);""")
    if engine.trace is not None:
        body.append(f"\nenum {{ TRACE_ALPHA = {engine.trace} }};\n")
    body.append(f"""
void {name}_reset({name}_state *state) {{
    int i;
    for (i = 0; i < {upper}_UNITS; i++) state->y[i] = state->c[i] = 0;
    for (i = 0; i < {upper}_LAYERS; i++) state->active_count[i] = 0;{trace_reset}
}}

void {name}_step(const int16_t x[{upper}_INPUT], {name}_state *state) {{
    int k;
    layer_step(&layers[0], x, 0, {upper}_INPUT, state->y, state->c, state->active, &state->active_count[0]);
    for (k = 1; k < {upper}_LAYERS; k++)
#ifdef EGRU_DENSE
        layer_step(&layers[k], state->y + (k - 1) * HIDDEN, 0, HIDDEN,
#else
        layer_step(&layers[k], state->y + (k - 1) * HIDDEN, state->active + (k - 1) * HIDDEN,
                   state->active_count[k - 1],
#endif
                   state->y + k * HIDDEN, state->c + k * HIDDEN, state->active + k * HIDDEN, &state->active_count[k]);{trace_step}
}}
""")
    if engine.readout is not None:
        read = ("readout(state->trace, 0, HIDDEN, logits);" if engine.trace is not None else
                f"readout(state->y + LAST, state->active + LAST, state->active_count[{upper}_LAYERS - 1], logits);"
                .replace("LAST", f"({upper}_LAYERS - 1) * HIDDEN"))
        body.append(READOUT.replace("LOGIT", "add_saturated(total, readout_bias[o])" if readout_bias else "total"))
        body.append(f"""
int {name}_classify(const {name}_state *state, int32_t logits[{upper}_CLASSES]) {{
    int o, best = 0;
    {read}
    for (o = 1; o < CLASSES; o++) if (logits[o] > logits[best]) best = o;
    return best;
}}
""")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"header": out / f"{name}.h", "source": out / f"{name}.c"}
    paths["header"].write_text(header)
    paths["source"].write_text("".join(body))
    return {**paths, "stored_bytes": stored}


def write_egru_test_vectors(engine, inputs: np.ndarray, out_dir, name: str = "egru_events") -> dict:
    """Q15 ``inputs`` (S, T, I), each sequence run from the zero state: write
    ``<name>_vectors.h`` and ``<name>_check.c`` (see the module docstring); return their paths."""
    _check(engine)
    inputs = np.asarray(inputs, dtype=np.int64)
    if inputs.min(initial=0) < q15.INT16[0] or inputs.max(initial=0) > q15.INT16[1]:
        raise ValueError("test inputs must be Q15 integers in [-32768, 32767]")
    S, T, _ = inputs.shape
    result = engine.run(inputs.transpose(1, 0, 2))
    events = np.stack([e.sum(-1) for e in result.events], axis=-1)  # (T, S, L)
    final_c = np.concatenate([state.c for state in result.state], axis=1)  # (S, L·H)
    upper = name.upper()
    text = [(f"/* Test vectors for {name}: inputs and what egru.mcu.egru_q15 computes from them. */\n"
             f"#ifndef {upper}_VECTORS_H\n#define {upper}_VECTORS_H\n#include \"{name}.h\"\n\n"
             f"#define {upper}_VECTORS {S}\n#define {upper}_STEPS {T}\n\n"),
            _array("int16_t", f"{name}_inputs", inputs.ravel()),
            _array("int16_t", f"{name}_expected_output", result.output.swapaxes(0, 1).ravel()),
            _array("int16_t", f"{name}_expected_events", events.swapaxes(0, 1).ravel()),
            _array("int16_t", f"{name}_expected_c", final_c.ravel())]
    if engine.trace is not None:
        text.append(_array("int16_t", f"{name}_expected_trace", result.trace[-1].ravel()))
    if engine.readout is not None:
        text.append(_array("int32_t", f"{name}_expected_logits", result.logits[-1].ravel()))
    text.append("\n#endif\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"vectors": out / f"{name}_vectors.h", "check": out / f"{name}_check.c"}
    paths["vectors"].write_text("".join(text))
    compare_logits = (f"""
        {{ int32_t logits[{upper}_CLASSES]; int c = {name}_classify(&state, logits);
          for (i = 0; i < {upper}_CLASSES; i++, checked++)
              mismatches += logits[i] != {name}_expected_logits[s * {upper}_CLASSES + i];
          print("sequence "); print_number(s); print(": class "); print_number(c); print("\\n"); }}"""
                      if engine.readout is not None else "")
    compare_trace = (f"""
        for (i = 0; i < {upper}_HIDDEN; i++, checked++)
            mismatches += state.trace[i] != {name}_expected_trace[s * {upper}_HIDDEN + i];"""
                     if engine.trace is not None else "")
    paths["check"].write_text(f"""/* Runs {name} on its test vectors and counts the values that differ from the
   Python engine's. Generated by egru.mcu.write_egru_test_vectors. Prints with stdio, or with the
   device's device_print when compiled with -DEGRU_DEVICE. */
#include "{name}_vectors.h"
{PRINTING}
int main(void) {{
    {name}_state state;
    long mismatches = 0, checked = 0;
    int s, t, i;
    for (s = 0; s < {upper}_VECTORS; s++) {{
        {name}_reset(&state);
        for (t = 0; t < {upper}_STEPS; t++) {{
            long at = (long)s * {upper}_STEPS + t;
            {name}_step(&{name}_inputs[at * {upper}_INPUT], &state);
            for (i = 0; i < {upper}_HIDDEN; i++, checked++)
                mismatches += state.y[({upper}_LAYERS - 1) * {upper}_HIDDEN + i] != {name}_expected_output[at * {upper}_HIDDEN + i];
            for (i = 0; i < {upper}_LAYERS; i++, checked++)
                mismatches += state.active_count[i] != {name}_expected_events[at * {upper}_LAYERS + i];
        }}
        for (i = 0; i < {upper}_UNITS; i++, checked++)
            mismatches += state.c[i] != {name}_expected_c[s * {upper}_UNITS + i];{compare_trace}{compare_logits}
    }}
    print("mismatches: "); print_number(mismatches); print(" of "); print_number(checked); print(" values\\n");
    return mismatches != 0;
}}
""")
    return paths
