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


def make_engine(rule="authors", layers=2, I=5, H=7, scale=4.0, seed=0, head=None):
    """Recurrent layers of sizes ``H`` (an int for ``layers`` equal ones, or a list), with their
    weights scaled past the zero bounds; a classifier when ``head`` lists dense sizes."""
    torch.manual_seed(seed)
    sizes = H if isinstance(H, list) else [H] * layers
    modules = [mcu.EmbeddedGRU(i, h, quantize=rule, dtype=torch.float64) for i, h in zip([I] + sizes, sizes)]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.mul_(scale)
    if head is None:
        return q15.Q15Layers(modules)
    widths = [sizes[-1]] + head
    dense = [torch.nn.Linear(a, b, dtype=torch.float64) for a, b in zip(widths, widths[1:])]
    return q15.Q15Classifier(modules, dense)


def compile_c(engine, main: str, tmp_path, cc=None, flags=("-O2",)):
    paths = export_c(engine, tmp_path, name="model")
    (tmp_path / "main.c").write_text(main)
    binary = tmp_path / "model"
    subprocess.run([cc or CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", *flags, "-o", str(binary),
                    str(paths["source"]), str(tmp_path / "main.c")], check=True, capture_output=True, text=True)
    return binary


def run_c(engine, inputs, tmp_path):
    """Compile the export with a main that runs each sequence of ``inputs`` (S, T, I) from the
    zero state and prints the last layer's state after every step, and for a classifier its
    logits and class after the last step."""
    S, T, I = inputs.shape
    values = ", ".join(str(int(v)) for v in inputs.ravel())
    classify = ("""{ int32_t logits[MODEL_CLASSES]; int c = model_classify(state, logits);
                  for (i = 0; i < MODEL_CLASSES; i++) printf("%ld ", (long)logits[i]);
                  printf("%d\\n", c); }""" if hasattr(engine, "head") else "")
    binary = compile_c(engine, f"""#include <stdio.h>
#include "model.h"
static const int16_t inputs[{S * T * I}] = {{{values}}};
int main(void) {{
    int16_t state[MODEL_STATE];
    int s, t, i;
    for (s = 0; s < {S}; s++) {{
        model_reset(state);
        for (t = 0; t < {T}; t++) {{
            model_step(&inputs[(s * {T} + t) * {I}], state);
            for (i = MODEL_STATE - MODEL_OUTPUT; i < MODEL_STATE; i++) printf("%d ", state[i]);
            printf("\\n");
        }}
        {classify}
    }}
    return 0;
}}
""", tmp_path)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    rows = [[int(v) for v in line.split()] for line in lines]
    if not hasattr(engine, "head"):
        return np.array(rows).reshape(S, T, -1), None
    per = T + 1
    states = np.array([r for k, r in enumerate(rows) if k % per < T]).reshape(S, T, -1)
    return states, np.array([r for k, r in enumerate(rows) if k % per == T])


def expected_states(engine, inputs):
    layers = getattr(engine, "recurrent", engine)
    return layers.run(inputs.transpose(1, 0, 2))[0].transpose(1, 0, 2)


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")
@pytest.mark.parametrize("rule", ["paper", "authors"])
def test_c_equals_the_engine_bit_for_bit(rule, tmp_path):
    engine = make_engine(rule)
    rng = np.random.default_rng(0)
    random = rng.integers(-32768, 32768, size=(6, 20, 5))
    extreme = rng.choice([-32768, 32767], size=(2, 20, 5))  # saturating inputs
    inputs = np.concatenate([random, extreme])
    got, _ = run_c(engine, inputs, tmp_path)
    expected = expected_states(engine, inputs)
    mismatches = int((got != expected).sum())
    assert mismatches == 0, f"{mismatches} of {got.size} values differ"


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")
def test_saturating_biases_and_a_single_layer(tmp_path):
    engine = make_engine("paper", layers=1, I=3, H=4, scale=1e4)  # biases far beyond Q15's range
    inputs = np.random.default_rng(1).integers(-32768, 32768, size=(3, 10, 3))
    got, _ = run_c(engine, inputs, tmp_path)
    assert np.array_equal(got, expected_states(engine, inputs))


@pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")
@pytest.mark.parametrize("head", [[6, 4], [4], [8, 6, 3]])
def test_classifier_in_c_equals_the_engine(head, tmp_path):
    """Layers of different sizes (as the paper's 30 → 20) and dense heads of one to three
    layers: states, logits and classes equal, on random and saturating inputs."""
    engine = make_engine("paper", I=5, H=[9, 6], head=head, seed=2)
    rng = np.random.default_rng(2)
    inputs = np.concatenate([rng.integers(-32768, 32768, size=(10, 12, 5)),
                             rng.choice([-32768, 32767], size=(2, 12, 5))])
    states, logits = run_c(engine, inputs, tmp_path)
    assert np.array_equal(states, expected_states(engine, inputs))
    expected = engine.logits(inputs.transpose(1, 0, 2))
    assert np.array_equal(logits[:, :-1], expected)
    assert np.array_equal(logits[:, -1], expected.argmax(1))


def test_export_refuses_what_it_cannot_represent(tmp_path):
    engine = make_engine()
    with pytest.raises(ValueError, match="C identifier"):
        export_c(engine, tmp_path, name="my-model")
    engine.hidden_sizes = [7, 5000]
    with pytest.raises(ValueError, match="hidden size 5000"):
        export_c(engine, tmp_path)
    with pytest.raises(TypeError, match="Q15Layers or a Q15Classifier"):
        export_c(mcu.EmbeddedGRU(3, 4), tmp_path)
