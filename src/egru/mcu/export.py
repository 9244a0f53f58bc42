"""C export of the embedded eGRU's Q15 engine (:mod:`.q15`): a self-contained C99 library.

``export_c(engine, out_dir, name="egru_mcu")`` writes ``<name>.h`` and ``<name>.c`` for a
:class:`.q15.Q15Layers` or a :class:`.q15.Q15Classifier`: the packed 3-bit weights, the dense
head's int16 weights and the biases as constant arrays, and these functions (no floating point,
no allocation, nothing beyond ``<stdint.h>``)::

    void <name>_reset(int16_t state[STATE]);
    void <name>_step(const int16_t x[INPUT], int16_t state[STATE]);
    int  <name>_classify(const int16_t state[STATE], int32_t logits[CLASSES]);  /* classifiers */

``state`` holds every layer's units one layer after the other, the last layer's ``OUTPUT``
units at its end; ``classify`` runs the dense head on them and returns the predicted class (the
first of equal logits).

``write_test_vectors(engine, inputs, out_dir, name)`` adds ``<name>_vectors.h`` (Q15 input
sequences and what the Python engine computes from them: each sequence's last-layer state and,
for a classifier, logits) and ``<name>_check.c``, a host program that runs them and prints how
many values differ::

    cc -std=c99 -O2 -o check <name>.c <name>_check.c && ./check The C computes what the Q15 engine computes, bit for bit (tests compile
it with the system compiler and compare). Recurrent weights are packed ten 3-bit codes to a
``uint32_t`` (bit 2 the sign, bits 0–1 the magnitude), row after row of each ``(H, H + I)``
matrix, so a layer's two matrices take ``2 · ceil(H·(H + I) / 10)`` words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import q15

CODES_PER_WORD = 10
MAX_HIDDEN = 1024  # the largest H exported (a limit of this exporter, not of the format)


def pack_codes(codes: np.ndarray) -> list:
    """3-bit codes (any shape, row-major) → uint32 words, ten codes each."""
    flat = np.asarray(codes, dtype=np.int64).ravel()
    bits = np.where(flat < 0, 4, 0) | np.abs(flat)
    words = []
    for start in range(0, len(bits), CODES_PER_WORD):
        word = 0
        for k, b in enumerate(bits[start:start + CODES_PER_WORD]):
            word |= int(b) << (3 * k)
        words.append(word)
    return words


def _array(ctype: str, name: str, values) -> str:
    values = [str(int(v)) + ("u" if ctype == "uint32_t" else "") for v in values]
    rows = [", ".join(values[i:i + 8]) for i in range(0, len(values), 8)] or ["0"]
    return f"static const {ctype} {name}[{max(len(values), 1)}] = {{\n    " + ",\n    ".join(rows) + "\n};\n"


# Integer helpers shared by the generated libraries (egru.mcu.egru_export uses them too), one C
# function each, so that a library includes only those it calls (-Wunused-function).
SHIFT_RIGHT = r"""
/* Floor shift of a signed value, the same for negative numbers on every compiler. */
static int32_t shift_right(int32_t a, int s) { return a >= 0 ? (a >> s) : ~((~a) >> s); }
"""

ADD_SATURATED = r"""
static int32_t add_saturated(int32_t a, int32_t b) {
    if (b > 0 && a > INT32_MAX - b) return INT32_MAX;
    if (b < 0 && a < INT32_MIN - b) return INT32_MIN;
    return a + b;
}
"""

SATURATE16 = r"""
static int16_t saturate16(int32_t a) { return (int16_t)(a > 32767 ? 32767 : (a < -32768 ? -32768 : a)); }
"""

ENGINE = SHIFT_RIGHT + ADD_SATURATED + SATURATE16 + r"""
/* sign(v) * min(2^15 - floor(2^30 / (2^15 + |v|)), 32767) */
static int32_t softsign(int32_t v) {
    uint32_t m = v < 0 ? 0u - (uint32_t)v : (uint32_t)v;
    int32_t r;
    if (m > 2147483647u - 32768u) m = 2147483647u - 32768u;
    r = 32768 - (int32_t)(1073741824u / (32768u + m));
    if (r > 32767) r = 32767;
    return v < 0 ? -r : r;
}

/* bias + sum_k w_k u_k for row `row` of packed codes over fan_in inputs. The codes are read
   word by word: one division per row, none per weight (a Cortex-M0 divides in software). */
static int32_t preactivation(const uint32_t *codes, const int32_t *bias, int row, int fan_in, const int16_t *u) {
    uint32_t index = (uint32_t)row * (uint32_t)fan_in;
    const uint32_t *word = codes + index / 10u;
    uint32_t slot = index % 10u, bits = *word >> (3u * slot);
    int32_t total = 0;
    int k;
    for (k = 0; k < fan_in; k++) {
        uint32_t code = bits & 7u, m = code & 3u;
        if (m != 0u) {
            int32_t term = shift_right((int32_t)u[k], (int)(3u - m));
            total += (code & 4u) ? -term : term;
        }
        if (++slot == 10u) {
            slot = 0u;
            if (k + 1 < fan_in) bits = *++word; /* never past the array's last word */
        } else {
            bits >>= 3;
        }
    }
    return bias ? add_saturated(total, bias[row]) : total;
}

static void layer_step(const uint32_t *codes_z, const int32_t *bias_z, const uint32_t *codes_h,
                       const int32_t *bias_h, int hidden, int inputs, const int16_t *x, int16_t *h,
                       int16_t *u) {
    int i;
    for (i = 0; i < hidden; i++) u[i] = h[i];
    for (i = 0; i < inputs; i++) u[hidden + i] = x[i];
    for (i = 0; i < hidden; i++) {
        int32_t z = (softsign(preactivation(codes_z, bias_z, i, hidden + inputs, u)) + 32768) >> 1;
        int32_t candidate = softsign(preactivation(codes_h, bias_h, i, hidden + inputs, u));
        int32_t update = shift_right(z * (candidate - (int32_t)u[i]) + 16384, 15);
        h[i] = saturate16((int32_t)u[i] + update);
    }
}
"""


DENSE = r"""
/* bias + sum_k (w_k x_k >> shift) for row `row` of a dense layer: each product fits an int32,
   and the exporter checked that their sum does */
static int32_t dense_unit(const int16_t *w, const int32_t *bias, int shift, int row, int inputs, const int16_t *x) {
    int32_t total = 0;
    int k;
    for (k = 0; k < inputs; k++) total += shift_right((int32_t)w[row * inputs + k] * (int32_t)x[k], shift);
    return bias ? add_saturated(total, bias[row]) : total;
}
"""


def export_c(engine, out_dir, name: str = "egru_mcu") -> dict:
    """Write ``<name>.h`` and ``<name>.c`` for ``engine`` (a :class:`.q15.Q15Layers` or
    :class:`.q15.Q15Classifier`) into ``out_dir``; returns their paths and ``stored_bytes``,
    the bytes of the constant arrays (weights and biases) the library stores."""
    if not name.isidentifier():
        raise ValueError(f"name must be a C identifier, got {name!r}")
    head = getattr(engine, "head", None)
    layers = engine.recurrent if head is not None else engine
    if not isinstance(layers, q15.Q15Layers):
        raise TypeError(f"export_c takes a Q15Layers or a Q15Classifier (egru.mcu.q15), got {type(engine).__name__}")
    sizes, I = layers.hidden_sizes, layers.input_size
    for H in sizes:
        if H > MAX_HIDDEN:
            raise ValueError(f"hidden size {H} is over the {MAX_HIDDEN} units this exporter supports")
    inputs = [I] + sizes[:-1]
    for H, width in zip(sizes, inputs):
        q15.check_fan_in(H + width)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    upper, state = name.upper(), sum(sizes)
    defines = {"LAYERS": len(sizes), "INPUT": I, "STATE": state, "OUTPUT": sizes[-1]}
    declarations = [f"void {name}_reset(int16_t state[{upper}_STATE]);",
                    f"void {name}_step(const int16_t x[{upper}_INPUT], int16_t state[{upper}_STATE]);"]
    if head is not None:
        defines["CLASSES"] = head[-1][0].shape[0]
        declarations.append(f"int {name}_classify(const int16_t state[{upper}_STATE], int32_t logits[{upper}_CLASSES]);")
    header = (f"/* {name}: an embedded eGRU in Q15 fixed point, generated by egru.mcu.export_c. */\n"
              f"#ifndef {upper}_H\n#define {upper}_H\n#include <stdint.h>\n\n"
              + "".join(f"#define {upper}_{key} {value}\n" for key, value in defines.items())
              + "\n" + "\n".join(declarations) + "\n\n#endif\n")
    body = [f'/* Generated by egru.mcu.export_c: edit the model, not this file. */\n#include "{name}.h"\n']
    stored = 0

    def array(ctype, array_name, values):
        nonlocal stored
        body.append(_array(ctype, array_name, values))
        stored += {"uint32_t": 4, "int32_t": 4, "int16_t": 2}[ctype] * max(len(values), 1)
        return array_name

    steps, offset = [], 0
    for k, ((codes_z, bias_z, codes_h, bias_h), H, width) in enumerate(zip(layers.cells, sizes, inputs)):
        names = []
        for gate, codes, bias in (("z", codes_z, bias_z), ("h", codes_h, bias_h)):
            names.append(array("uint32_t", f"codes_{gate}{k}", pack_codes(codes)))
            names.append("0" if bias is None else array("int32_t", f"bias_{gate}{k}", bias))
        source = "x" if k == 0 else f"state + {offset - inputs[k]}"
        steps.append(f"    layer_step({', '.join(names)}, {H}, {width}, {source}, state + {offset}, u);")
        offset += H
    body.append(ENGINE)
    body.append(f"\nvoid {name}_reset(int16_t state[{upper}_STATE]) {{\n"
                f"    int i;\n    for (i = 0; i < {upper}_STATE; i++) state[i] = 0;\n}}\n")
    body.append(f"\nvoid {name}_step(const int16_t x[{upper}_INPUT], int16_t state[{upper}_STATE]) {{\n"
                f"    int16_t u[{max(H + w for H, w in zip(sizes, inputs))}];\n" + "\n".join(steps) + "\n}\n")
    if head is not None:
        body.append(DENSE)
        body.append(_classify(name, upper, head, sizes[-1], array))
    paths = {"header": out / f"{name}.h", "source": out / f"{name}.c"}
    paths["header"].write_text(header)
    paths["source"].write_text("".join(body))
    return {**paths, "stored_bytes": stored}


def _classify(name: str, upper: str, head: list, features: int, array) -> str:
    """The classify function: dense layers with ReLU (saturated to int16) between them, int32
    logits from the last, then their argmax."""
    widest = max(values.shape[0] for values, _, _ in head)
    lines, source, width = [], f"state + {upper}_STATE - {upper}_OUTPUT", features
    for k, (values, exponent, bias) in enumerate(head):
        q15.check_dense(width, exponent)
        w = array("int16_t", f"dense_w{k}", values.ravel())
        b = "0" if bias is None else array("int32_t", f"dense_b{k}", bias)
        outputs, last = values.shape[0], k == len(head) - 1
        call = f"dense_unit({w}, {b}, {15 - exponent}, o, {width}, {source})"
        if last:
            lines.append(f"    for (o = 0; o < {outputs}; o++) logits[o] = {call};")
        else:
            target = "a" if k % 2 == 0 else "b"
            lines.append(f"    for (o = 0; o < {outputs}; o++) {{ int32_t v = {call}; "
                         f"{target}[o] = saturate16(v > 0 ? v : 0); }}")
            source = target
        width = outputs
    return (f"\nint {name}_classify(const int16_t state[{upper}_STATE], int32_t logits[{upper}_CLASSES]) {{\n"
            f"    int16_t a[{widest}], b[{widest}];\n    int o, best = 0;\n    (void)a; (void)b;\n"
            + "\n".join(lines)
            + f"\n    for (o = 1; o < {upper}_CLASSES; o++) if (logits[o] > logits[best]) best = o;\n"
            f"    return best;\n}}\n")


# How a check program prints: stdio on a host, the device's semihosting with -DEGRU_DEVICE
# (egru.mcu.device), and numbers without printf (no C library on the device).
PRINTING = r"""#ifdef EGRU_DEVICE
void device_print(const char *text);
#define print device_print
#else
#include <stdio.h>
static void print(const char *text) { fputs(text, stdout); }
#endif

static void print_number(long value) {
    char digits[24];
    int n = 23;
    unsigned long magnitude = value < 0 ? 0ul - (unsigned long)value : (unsigned long)value;
    digits[n] = 0;
    do { digits[--n] = (char)('0' + magnitude % 10u); magnitude /= 10u; } while (magnitude);
    if (value < 0) digits[--n] = '-';
    print(&digits[n]);
}
"""


def write_test_vectors(engine, inputs: np.ndarray, out_dir, name: str = "egru_mcu") -> dict:
    """Q15 ``inputs`` (S, T, I), each sequence run from the zero state: write
    ``<name>_vectors.h`` (the inputs; the Python engine's last-layer state after each sequence
    and, for a classifier, its logits) and ``<name>_check.c``; return their paths."""
    inputs = np.asarray(inputs, dtype=np.int64)
    if inputs.min(initial=0) < q15.INT16[0] or inputs.max(initial=0) > q15.INT16[1]:
        raise ValueError("test inputs must be Q15 integers in [-32768, 32767]")
    head = getattr(engine, "head", None)
    layers = engine.recurrent if head is not None else engine
    S, T, _ = inputs.shape
    by_time = inputs.transpose(1, 0, 2)
    outputs = layers.run(by_time)[0][-1]
    upper = name.upper()
    text = [f"/* Test vectors for {name}: inputs and what egru.mcu.q15 computes from them. */\n"
            f"#ifndef {upper}_VECTORS_H\n#define {upper}_VECTORS_H\n#include \"{name}.h\"\n\n"
            f"#define {upper}_VECTORS {S}\n#define {upper}_STEPS {T}\n\n",
            _array("int16_t", f"{name}_inputs", inputs.ravel()),
            _array("int16_t", f"{name}_expected_output", outputs.ravel())]
    if head is not None:
        text.append(_array("int32_t", f"{name}_expected_logits", engine.head_logits(outputs).ravel()))
    text.append("\n#endif\n")
    out = Path(out_dir)
    paths = {"vectors": out / f"{name}_vectors.h", "check": out / f"{name}_check.c"}
    paths["vectors"].write_text("".join(text))
    compare_logits = (f"""
        {{ int32_t logits[{upper}_CLASSES]; int c = {name}_classify(state, logits);
          for (i = 0; i < {upper}_CLASSES; i++, checked++)
              mismatches += logits[i] != {name}_expected_logits[s * {upper}_CLASSES + i];
          print("sequence "); print_number(s); print(": class "); print_number(c); print("\\n"); }}"""
                      if head is not None else "")
    paths["check"].write_text(f"""/* Runs {name} on its test vectors and counts the values that differ from the
   Python engine's. Generated by egru.mcu.write_test_vectors. Prints with stdio, or with the
   device's device_print when compiled with -DEGRU_DEVICE. */
#include "{name}_vectors.h"
{PRINTING}
int main(void) {{
    int16_t state[{upper}_STATE];
    long mismatches = 0, checked = 0;
    int s, t, i;
    for (s = 0; s < {upper}_VECTORS; s++) {{
        {name}_reset(state);
        for (t = 0; t < {upper}_STEPS; t++) {name}_step(&{name}_inputs[(s * {upper}_STEPS + t) * {upper}_INPUT], state);
        for (i = 0; i < {upper}_OUTPUT; i++, checked++)
            mismatches += state[{upper}_STATE - {upper}_OUTPUT + i] != {name}_expected_output[s * {upper}_OUTPUT + i];{compare_logits}
    }}
    print("mismatches: "); print_number(mismatches); print(" of "); print_number(checked); print(" values\\n");
    return mismatches != 0;
}}
""")
    return paths
