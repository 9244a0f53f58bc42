"""egru.mcu.export_c: the generated C99 compiles warning-free with the system compiler and computes
what the Q15 engine computes, bit for bit, on random and on saturating inputs; export refuses what
it cannot represent."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from egru import mcu
from egru.mcu import q15
from egru.mcu.export import export_c, pack_codes

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def test_codes_pack_ten_to_a_word():
    codes = np.array([1, -1, 3, -3, 0, 2, -2, 0, 0, 1, -3])
    words = pack_codes(codes)
    assert len(words) == 2
    for k, c in enumerate(codes):
        bits = (words[k // 10] >> (3 * (k % 10))) & 7
        assert (-(bits & 3) if bits & 4 else bits & 3) == c


def make_engine(rule="authors", layers=2, I=5, H=7, scale=4.0, seed=0):
    torch.manual_seed(seed)
    layer = mcu.EmbeddedGRU(I, H, num_layers=layers, quantize=rule, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(scale)
    return q15.Q15Layers(layer)


def run_c(engine, inputs, tmp_path):
    """Compile the export with a main that runs each sequence of ``inputs`` (S, T, I) from the
    zero state and prints the last layer's state after every step."""
    paths = export_c(engine, tmp_path, name="model")
    S, T, I = inputs.shape
    values = ", ".join(str(int(v)) for v in inputs.ravel())
    (tmp_path / "main.c").write_text(f"""#include <stdio.h>
#include "model.h"
static const int16_t inputs[{S * T * I}] = {{{values}}};
int main(void) {{
    int16_t state[MODEL_LAYERS][MODEL_HIDDEN];
    int s, t, i;
    for (s = 0; s < {S}; s++) {{
        model_reset(state);
        for (t = 0; t < {T}; t++) {{
            model_step(&inputs[(s * {T} + t) * {I}], state);
            for (i = 0; i < MODEL_HIDDEN; i++) printf("%d ", state[MODEL_LAYERS - 1][i]);
            printf("\\n");
        }}
    }}
    return 0;
}}
""")
    binary = tmp_path / "model"
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-o", str(binary),
                    str(paths["source"]), str(tmp_path / "main.c")], check=True, capture_output=True, text=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    return np.array([[int(v) for v in line.split()] for line in out.splitlines()]).reshape(S, T, -1)


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")
@pytest.mark.parametrize("rule", ["paper", "authors"])
def test_c_equals_the_engine_bit_for_bit(rule, tmp_path):
    engine = make_engine(rule)
    rng = np.random.default_rng(0)
    random = rng.integers(-32768, 32768, size=(6, 20, 5))
    extreme = rng.choice([-32768, 32767], size=(2, 20, 5))  # saturating inputs
    inputs = np.concatenate([random, extreme])
    got = run_c(engine, inputs, tmp_path)
    expected = engine.run(inputs.transpose(1, 0, 2))[0].transpose(1, 0, 2)
    mismatches = int((got != expected).sum())
    assert mismatches == 0, f"{mismatches} of {got.size} values differ"


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")
def test_saturating_biases_and_a_single_layer(tmp_path):
    engine = make_engine("paper", layers=1, I=3, H=4, scale=1e4)  # biases far beyond Q15's range
    inputs = np.random.default_rng(1).integers(-32768, 32768, size=(3, 10, 3))
    got = run_c(engine, inputs, tmp_path)
    assert np.array_equal(got, engine.run(inputs.transpose(1, 0, 2))[0].transpose(1, 0, 2))


def test_export_refuses_what_it_cannot_represent(tmp_path):
    engine = make_engine()
    with pytest.raises(ValueError, match="C identifier"):
        export_c(engine, tmp_path, name="my-model")
    engine.hidden_size = 5000
    with pytest.raises(ValueError, match="hidden size 5000"):
        export_c(engine, tmp_path)
