"""egru.mcu.egru_q15 and egru.mcu.egru_export: the event-based EGRU in fixed point. The integer
pieces on values checked by hand; the activation tables within their stated error; the engine
against the float model; the generated C equal to the engine bit for bit (host compiler, and a
Cortex-M0+ on QEMU when the toolchain is there); the MAC counts following the events; what the
converter and the exporter refuse."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from egru import EGRU, functional
from egru.mcu import EGRUQ15, device, export_egru_c, q15, write_egru_test_vectors
from egru.mcu import egru_q15 as eq
from egru.mcu.export import MAX_HIDDEN
from egru.state import EGRUState

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH")


def make_model(I=5, H=12, layers=2, scale=3.0, threshold_mean=0.1, seed=0, **kwargs) -> EGRU:
    """A float64 EGRU in evaluation mode, its weights and biases scaled by ``scale`` (a trained
    model's are larger than the initial ±1/√H), thresholds ~ Beta with mean ``threshold_mean``."""
    torch.manual_seed(seed)
    model = EGRU(I, H, num_layers=layers, dtype=torch.float64, threshold_mean=threshold_mean,
                 backend="reference", **kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("threshold"):
                p.mul_(scale)
    return model


def make_engine(classes=4, readout_bias=True, trace_alpha=None, input_exponent=0, **kwargs) -> EGRUQ15:
    model = make_model(**kwargs)
    readout = None
    if classes:
        readout = torch.nn.Linear(model.hidden_size, classes, bias=readout_bias, dtype=torch.float64)
    return EGRUQ15.from_module(model, readout, trace_alpha=trace_alpha, input_exponent=input_exponent)


def random_inputs(I, sequences=6, steps=20, extreme=2, seed=0) -> np.ndarray:
    """(S, T, I) Q15 inputs: random ones, then ``extreme`` sequences of ±full scale."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(-32768, 32768, size=(sequences, steps, I)),
                           rng.choice([-32768, 32767], size=(extreme, steps, I))])


# --- the integer pieces --------------------------------------------------------------------


def test_round_shift_rounds_halves_up():
    a = np.array([5, 6, 7, -5, -6, -7, 0, 4])
    assert eq.round_shift(a, 2).tolist() == [1, 2, 2, -1, -1, -2, 0, 1]  # 1.25, 1.5, 1.75, −1.25, −1.5, −1.75
    assert eq.round_shift(a, 0).tolist() == a.tolist()


def test_scale_and_mix_round_to_nearest():
    gate, v = np.array([16384, 32767, 0, 16384]), np.array([3, -(2 ** 31), 123456, -3])
    assert eq.scale(gate, v).tolist() == [2, -(2 ** 31) + 2 ** 16, 0, -1]  # 1.5 → 2, −1.5 → −1: halves up
    # (1 − w)·a + w·b: w = ½ is the mean, w = 0 leaves a, and the result saturates to int16
    assert eq.mix(np.array([100, 100, 32767]), np.array([300, -300, 32767]), np.array([16384, 0, 32767])).tolist() \
        == [200, 100, 32767]


def test_events_are_strict_and_the_reset_saturates():
    c_hat = np.array([100, 101, 32767, -5])
    threshold = np.array([100, 100, -32768, -10])
    y, c, e = eq.fire(c_hat, threshold)
    assert e.tolist() == [False, True, True, True]  # no event at ĉ == ϑ
    assert y.tolist() == [0, 101, 32767, -5]
    assert c.tolist() == [100, 1, 32767, 5]  # 32767 + 32768 saturates


def test_quantisation_round_trip_and_ranges():
    """Weights within half a step of their int16 value at the tensor's scale, biases within half a
    unit of 2^−F, thresholds within half a Q15 unit; every integer within its C type; the chosen F
    the largest whose worst case fits an int32, smaller for larger weights."""
    model = make_model(scale=3.0)
    for k, layer in enumerate(EGRUQ15.from_module(model).layers):
        w_ih, w_hh, b_ih, b_hh, threshold = (p.detach().numpy() for p in model._layer_params(k, ""))
        for w, values, shift in ((w_ih, layer.weight_ih, layer.shift_ih), (w_hh, layer.weight_hh, layer.shift_hh)):
            exponent = 30 - shift - layer.accumulator_bits
            assert np.abs(values * 2.0 ** (exponent - 15) - w).max() <= 2.0 ** (exponent - 16)
            assert values.min() >= -32768 and values.max() <= 32767 and shift >= 0
            assert np.abs(w).max() < 2.0 ** exponent
        for b, values in ((b_ih, layer.bias_ih), (b_hh, layer.bias_hh)):
            assert np.abs(values / 2.0 ** layer.accumulator_bits - b).max() <= 2.0 ** -(layer.accumulator_bits + 1)
        assert np.abs(q15.from_q15(layer.threshold) - threshold).max() <= 2.0 ** -16
        bound = (eq.worst_case_terms(layer.weight_ih, layer.shift_ih) + eq.worst_case_terms(layer.weight_hh, layer.shift_hh)
                 + np.abs(layer.bias_ih) + np.abs(layer.bias_hh))
        assert bound.max() + 2 ** (layer.accumulator_bits - 16) <= 2 ** 31 - 1
        assert 15 <= layer.accumulator_bits <= 30
    small = EGRUQ15.from_module(make_model(scale=1.0)).layers[0].accumulator_bits
    large = EGRUQ15.from_module(make_model(scale=300.0)).layers[0].accumulator_bits
    assert large < small
    x = np.linspace(-1, 1, 101)[:-1]
    assert np.abs(q15.from_q15(q15.to_q15(x)) - x).max() <= 2.0 ** -16


def test_weights_too_large_for_32_bit_sums_are_refused():
    model = make_model(I=200, H=200, layers=1, scale=10_000.0)  # Σ|w| of a row ≈ 10^5
    with pytest.raises(ValueError, match="too large for 32-bit gate sums"):
        EGRUQ15.from_module(model)


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("tensor", ["weight_hh_l1", "bias_ih_l0", "threshold_l1", "readout.weight"])
def test_non_finite_parameters_are_refused_by_name(tensor, value, word):
    """A NaN or infinite weight, bias, threshold or readout weight is refused, naming the tensor
    (rounded and saturated, it would become an arbitrary integer)."""
    model = make_model(I=3, H=4)
    readout = torch.nn.Linear(4, 2, dtype=torch.float64)
    parameter = readout.weight if tensor == "readout.weight" else getattr(model, tensor)
    with torch.no_grad():
        parameter[(0,) * parameter.dim()] = value
    with pytest.raises(ValueError, match=re.escape(f"{tensor} holds {word}")):
        EGRUQ15.from_module(model, readout)


def test_activation_tables_within_their_error_bound():
    """Over every Q15 input in [−64, 64) (the tables clip far inside it): σ within 2.2 units of
    2^−15 of the exact function, tanh within 4.4 (the module docstring's numbers); both monotone,
    exact at 0, and in range for any int32."""
    v = np.arange(-(1 << 21), 1 << 21)
    exact = v / q15.ONE
    sigmoid, tanh = eq.sigmoid(v), eq.tanh(v)
    sigmoid_error = np.abs(sigmoid - q15.ONE / (1 + np.exp(-exact))).max()
    tanh_error = np.abs(tanh - q15.ONE * np.tanh(exact)).max()
    assert sigmoid_error <= 2.2 and tanh_error <= 4.4, (sigmoid_error, tanh_error)
    assert np.all(np.diff(sigmoid) >= 0) and np.all(np.diff(tanh) >= 0)
    assert eq.sigmoid([0]).tolist() == [16384] and eq.tanh([0]).tolist() == [0]
    ends = [-(2 ** 31), 2 ** 31 - 1]
    assert eq.sigmoid(ends).tolist() == [0, 32767] and eq.tanh(ends).tolist() == [-32768, 32766]
    assert eq.SIGMOID_TABLE.size == 513 and eq.SIGMOID_TABLE.min() >= 0 and eq.SIGMOID_TABLE.max() <= 32767


# --- the engine against the float model -------------------------------------------------------


def candidate_states(run):
    """The engine's ĉ per layer: the output where a unit fired (ĉ > ϑ ≥ 0 there), else the state."""
    return [np.where(e, y, c) for y, c, e in zip(run.y, run.c, run.events)]


def previous_steps(values: np.ndarray) -> torch.Tensor:
    """(T, B, H) Q15 values of steps 0 … T−1 → the float values of steps −1 … T−2 (zeros first)."""
    return torch.from_numpy(q15.from_q15(np.concatenate([np.zeros_like(values[:1]), values[:-1]])))


@pytest.mark.parametrize("layers, zoneout, input_exponent", [(1, 0.0, 0), (2, 0.0, 0), (2, 0.3, 0), (1, 0.0, 2)])
def test_engine_against_the_float_model(layers, zoneout, input_exponent):
    """Two measures, on 60 steps of 16 random sequences in [−1, 1) (times 4 where the inputs
    enter divided by 2^2).

    One step: from the engine's own state at every step (dequantised, and for a stacked layer
    the engine's output of the layer below), the float cell's ĉ is within 12 units of 2^−15 of
    the engine's (measured: 5 to 6), and the events are equal wherever the float ĉ is further
    than that from the threshold.
    Free running: the events of the two runs agree on at least 99.5 % of all (step, sequence,
    unit) (measured: 99.98 to 100 %); once one differs, the two follow different states, but in
    the sequences whose events agree at every step (at least half; measured 13 to 16 of 16) the
    outputs stay within 32 units of 2^−15 (measured: 9 to 10)."""
    model = make_model(I=6, H=24, layers=layers, zoneout=zoneout)
    engine = EGRUQ15.from_module(model, input_exponent=input_exponent)
    x_q = engine.inputs((torch.rand(60, 16, 6, dtype=torch.float64).numpy() * 2 - 1) * 2 ** input_exponent)
    x = torch.from_numpy(q15.from_q15(x_q) * 2 ** input_exponent)
    run = engine.run(x_q)
    c_hat_q = candidate_states(run)
    bound = 12
    for k in range(layers):
        w_ih, w_hh, b_ih, b_hh, threshold = model._layer_params(k, "")
        inputs = x if k == 0 else torch.from_numpy(q15.from_q15(run.y[k - 1]))
        state = EGRUState(previous_steps(run.y[k]), previous_steps(run.c[k]))
        with torch.no_grad():
            step = functional.egru_cell(inputs, state, w_ih, w_hh, b_ih, b_hh, threshold, model.surrogate,
                                        zoneout_p=zoneout)
        c_hat = step.c_hat.numpy() * q15.ONE
        assert np.abs(c_hat_q[k] - c_hat).max() <= bound
        clear = np.abs(c_hat - threshold.detach().numpy() * q15.ONE) > bound
        assert np.array_equal(run.events[k][clear], step.e.numpy()[clear] != 0)
        assert 0.05 < run.events[k].mean() < 0.95  # a model with events, and silent units
    with torch.no_grad():
        output, _, records = model(x, record=True)
    for k, record in enumerate(records):
        assert ((record.e.numpy() != 0) == run.events[k]).mean() >= 0.995
    same = np.all([((r.e.numpy() != 0) == e).all(axis=(0, 2)) for r, e in zip(records, run.events)], axis=0)
    assert same.mean() >= 0.5
    assert np.abs(q15.from_q15(run.output) - output.numpy())[:, same].max() * q15.ONE <= 32


def test_the_output_trace_within_its_bound():
    """The integer trace against the float filter (egru.functional.output_trace) of the same
    outputs: within the docstring's (1/2 + 2^16·|α − A/2^15|) / (1 − α) units of 2^−15 (9 for
    α = 0.9), and it decays where no event fired."""
    engine = make_engine(classes=3, layers=1, trace_alpha=functional.TRACE_ALPHA)
    run = engine.run(random_inputs(engine.input_size, sequences=8, steps=80, extreme=2).transpose(1, 0, 2))
    exact = functional.output_trace(torch.from_numpy(q15.from_q15(run.output))).numpy() * q15.ONE
    alpha = functional.TRACE_ALPHA
    bound = (0.5 + 2 ** 16 * abs(alpha - engine.trace / q15.ONE)) / (1 - alpha)
    assert 8.5 < bound < 9.5
    error = np.abs(run.trace - exact)
    assert 0 < error.max() <= bound
    silent = run.output[1:] == 0
    assert (np.abs(run.trace[1:]) <= np.abs(run.trace[:-1]))[silent].all() and silent.any()
    assert np.array_equal(run.logits[-1], engine.logits(run.trace[-1]))
    assert np.all(run.macs.readout == 3 * engine.hidden_size) and run.macs.trace == engine.hidden_size


def test_the_state_carries_over_between_runs():
    engine = make_engine(classes=3)
    x = random_inputs(engine.input_size, sequences=3, steps=12, extreme=0).transpose(1, 0, 2)
    whole = engine.run(x)
    first = engine.run(x[:5])
    second = engine.run(x[5:], first.state)
    assert np.array_equal(np.concatenate([first.output, second.output]), whole.output)
    traced = make_engine(classes=3, trace_alpha=0.9)
    whole, first = traced.run(x), traced.run(x[:5])
    second = traced.run(x[5:], first.state, first.trace[-1])
    assert np.array_equal(np.concatenate([first.logits, second.logits]), whole.logits)
    assert np.array_equal(np.concatenate([first.logits, second.logits]), whole.logits)
    assert np.array_equal(np.concatenate([first.macs.total, second.macs.total]), whole.macs.total)


# --- the MAC counts --------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [2.0, None, -1.0])
def test_macs_follow_the_events(threshold):
    """Thresholds of 2 (no unit ever fires), as initialised, and −1 (every unit fires at
    nearly every step): the recurrent MACs are 3H per unit that fired at the previous step, the
    stacked layer's input MACs 3H per event of the layer below at the same step, the readout's
    one per class and event of the last layer, counted here step by step from the events."""
    I, H, classes = 5, 12, 4
    model = make_model(I=I, H=H)
    if threshold is not None:
        with torch.no_grad():
            for t in model.thresholds():
                t.fill_(threshold)
    engine = EGRUQ15.from_module(model, torch.nn.Linear(H, classes, dtype=torch.float64))
    run = engine.run(random_inputs(I, sequences=4, steps=15, extreme=0).transpose(1, 0, 2))
    T, B = run.output.shape[:2]
    for t in range(T):
        for b in range(B):
            fired = [int(e[t, b].sum()) for e in run.events]
            fired_before = [int(e[t - 1, b].sum()) if t else 0 for e in run.events]
            assert run.macs.recurrent[:, t, b].tolist() == [3 * H * n for n in fired_before]
            assert run.macs.input[:, t, b].tolist() == [3 * H * I, 3 * H * fired[0]]
            assert run.macs.readout[t, b] == classes * fired[1]
    assert run.macs.dense == 3 * H * (I + H) + 3 * H * (H + H) + classes * H
    activity = np.mean([e.mean() for e in run.events])
    if threshold == 2.0:
        assert activity == 0 and run.macs.recurrent.sum() == 0 and run.macs.readout.sum() == 0
        assert np.all(run.macs.total == 3 * H * I)
    elif threshold == -1.0:
        assert activity > 0.99
        assert run.macs.total[1:].mean() > 0.99 * run.macs.dense
    else:
        assert 0.05 < activity < 0.95
        assert run.macs.total.mean() < run.macs.dense


# --- the C export on the host ------------------------------------------------------------------


def run_c(engine, inputs, tmp_path, dense: bool = False):
    """Compile the export (with ``-DEGRU_DENSE`` if ``dense``) with a main that runs each
    sequence of ``inputs`` (S, T, I) from the reset state and prints after every step every
    layer's y, c, number of events and list of units that fired, the trace where there is one,
    and with a readout the logits and class. Returns the printed rows, parsed."""
    S, T, I = inputs.shape
    paths = export_egru_c(engine, tmp_path, "model")
    values = ", ".join(str(int(v)) for v in inputs.ravel())
    classify = ("""{ int32_t logits[MODEL_CLASSES]; int c = model_classify(&state, logits);
                    for (i = 0; i < MODEL_CLASSES; i++) printf("%ld ", (long)logits[i]);
                    printf("%d\\n", c); }""" if engine.readout is not None else "")
    trace = ("""for (i = 0; i < MODEL_HIDDEN; i++) printf("%d ", state.trace[i]);
            printf("\\n");""" if engine.trace is not None else "")
    (tmp_path / "main.c").write_text(f"""#include <stdio.h>
#include "model.h"
static const int16_t inputs[{S * T * I}] = {{{values}}};
int main(void) {{
    model_state state;
    int s, t, i, k;
    for (s = 0; s < {S}; s++) {{
        model_reset(&state);
        for (t = 0; t < {T}; t++) {{
            model_step(&inputs[(s * {T} + t) * {I}], &state);
            for (i = 0; i < MODEL_UNITS; i++) printf("%d ", state.y[i]);
            printf("\\n");
            for (i = 0; i < MODEL_UNITS; i++) printf("%d ", state.c[i]);
            printf("\\n");
            for (k = 0; k < MODEL_LAYERS; k++) {{
                printf("%d ", state.active_count[k]);
                for (i = 0; i < state.active_count[k]; i++) printf("%d ", state.active[k * MODEL_HIDDEN + i]);
                printf("\\n");
            }}
            {trace}
            {classify}
        }}
    }}
    return 0;
}}
""")
    binary = tmp_path / "model"
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", *(["-DEGRU_DENSE"] * dense),
                    "-o", str(binary), str(paths["source"]), str(tmp_path / "main.c")], check=True, capture_output=True, text=True)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    return [[int(v) for v in line.split()] for line in lines], paths


def expected_rows(engine, inputs):
    """What :func:`run_c` prints, from the Python engine."""
    run = engine.run(inputs.transpose(1, 0, 2))
    rows = []
    for s in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            rows.append(np.concatenate([y[t, s] for y in run.y]).tolist())
            rows.append(np.concatenate([c[t, s] for c in run.c]).tolist())
            for e in run.events:
                active = np.flatnonzero(e[t, s]).tolist()
                rows.append([len(active)] + active)
            if engine.trace is not None:
                rows.append(run.trace[t, s].tolist())
            if engine.readout is not None:
                logits = run.logits[t, s]
                rows.append(logits.tolist() + [int(logits.argmax())])
    return rows, run


SATURATING = {"scale": 40.0, "threshold_mean": 0.05, "zoneout": 0.2}  # tables clipped, c saturated, zoneout


@needs_cc
@pytest.mark.parametrize("options", [
    {"layers": 1, "classes": 0},
    {"layers": 2, "classes": 4},
    {"layers": 2, "classes": 3, "readout_bias": False, "bias": False, "I": 3, "H": 9},
    {"layers": 2, "classes": 5, **SATURATING},
    {"layers": 2, "classes": 4, "trace_alpha": 0.9, "input_exponent": 3},
    {"layers": 2, "classes": 4, "trace_alpha": 0.9, "dense": True},
], ids=["one-layer", "two-layers-readout", "no-biases", "saturating", "trace", "dense"])
def test_c_equals_the_engine_bit_for_bit(options, tmp_path):
    """Every layer's y and c, the lists of units that fired, the output trace and the logits at
    every step, on random and full-scale inputs; the saturating model has weights that clip the
    tables and negative thresholds whose reset saturates c (both checked to occur). Compiled to
    add every column (``-DEGRU_DENSE``), the C computes the same."""
    options = dict(options)
    dense = options.pop("dense", False)
    engine = make_engine(**options)
    if options.get("threshold_mean") == SATURATING["threshold_mean"]:
        for layer in engine.layers:
            layer.threshold[::3] = -30000  # ĉ − ϑ beyond int16
    inputs = random_inputs(engine.input_size)
    got, paths = run_c(engine, inputs, tmp_path, dense)
    expected, run = expected_rows(engine, inputs)
    assert len(got) == len(expected)
    mismatches = [k for k, (a, b) in enumerate(zip(got, expected)) if a != b]
    assert not mismatches, f"{len(mismatches)} of {len(got)} rows differ, the first: {got[mismatches[0]]} != " \
                           f"{expected[mismatches[0]]}"
    assert paths["stored_bytes"] == engine.stored_bytes
    assert 0 < np.mean([e.mean() for e in run.events]) < 1
    if options.get("threshold_mean") == SATURATING["threshold_mean"]:
        assert any((c == 32767).any() for c in run.c)
        h = engine.layers[0].hidden_size
        first = engine.layers[0]
        gi = eq.gate_sums(first.weight_ih, first.shift_ih, first.bias_ih, inputs[:, 0, :])
        assert np.abs(eq.round_shift(gi[:, :h], first.accumulator_bits - 15)).max() > eq.TABLE_LIMIT


@needs_cc
def test_scale_in_c_equals_the_engine(tmp_path):
    """The C's 32-bit form of round(gate · v / 2^15) against the engine's int64 one, at the
    extremes and on random values."""
    rng = np.random.default_rng(3)
    gates = np.concatenate([[0, 1, 16384, 32767, 32767, 32767], rng.integers(0, 32768, 2000)])
    values = np.concatenate([[2 ** 31 - 1, -(2 ** 31), -(2 ** 31), 2 ** 31 - 1, -1, 65535],
                             rng.integers(-(2 ** 31), 2 ** 31, 2000)])
    source = export_egru_c(make_engine(classes=0, layers=1), tmp_path, "model")["source"]
    text = source.read_text()
    (tmp_path / "main.c").write_text(text + f"""
#include <stdio.h>
static const int32_t gates[{gates.size}] = {{{", ".join(map(str, gates))}}};
static const int32_t values[{values.size}] = {{{", ".join(f"(int32_t){v}" for v in values)}}};
int main(void) {{
    int i;
    for (i = 0; i < {gates.size}; i++) printf("%ld\\n", (long)scale(gates[i], values[i]));
    return 0;
}}
""")
    binary = tmp_path / "scale"
    subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-O2", "-o", str(binary), str(tmp_path / "main.c")],
                   check=True, capture_output=True, text=True)
    got = [int(v) for v in subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.split()]
    assert got == eq.scale(gates, values).tolist()


@needs_cc
def test_the_check_program_finds_no_mismatch_and_catches_one(tmp_path):
    engine = make_engine(classes=3)
    inputs = random_inputs(engine.input_size, sequences=4, steps=10)
    export_egru_c(engine, tmp_path, "kws")
    paths = write_egru_test_vectors(engine, inputs, tmp_path, "kws")

    def check():
        binary = tmp_path / "check"
        subprocess.run([CC, "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2", "-o", str(binary),
                        str(tmp_path / "kws.c"), str(paths["check"])], check=True, capture_output=True, text=True)
        return subprocess.run([str(binary)], check=False, capture_output=True, text=True)

    S, T, H, L = 6, 10, engine.hidden_size, len(engine.layers)
    done = check()
    assert done.returncode == 0, done.stdout
    assert f"mismatches: 0 of {S * T * (H + L) + S * (L * H + 3)} values" in done.stdout
    classes = [int(line.split()[-1]) for line in done.stdout.splitlines() if line.startswith("sequence")]
    assert classes == engine.run(inputs.transpose(1, 0, 2)).logits[-1].argmax(1).tolist()
    text = paths["vectors"].read_text()
    value_at = text.index("{", text.index("kws_expected_logits")) + 6
    paths["vectors"].write_text(text[:value_at] + "1" + text[value_at:])  # one digit more in a logit
    done = check()
    assert done.returncode == 1 and "mismatches: 1 of" in done.stdout


# --- what is refused ---------------------------------------------------------------------------


def test_conversion_and_export_refuse_what_they_cannot_represent(tmp_path):
    with pytest.raises(ValueError, match="bidirectional"):
        EGRUQ15.from_module(EGRU(3, 4, bidirectional=True))
    with pytest.raises(TypeError, match="egru.EGRU"):
        EGRUQ15.from_module(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match="readout of 5 inputs"):
        EGRUQ15.from_module(EGRU(3, 4), torch.nn.Linear(5, 2))
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        EGRUQ15.from_module(EGRU(3, 4), torch.nn.Sequential(torch.nn.Linear(4, 2)))
    engine = make_engine(classes=2, I=3, H=4)
    with pytest.raises(ValueError, match="Q15 integers"):
        engine.run(np.zeros((4, 1, 3)))
    with pytest.raises(ValueError, match="one at a time"):
        engine.run(np.zeros((4, 3), np.int64))
    with pytest.raises(ValueError, match=r"\[-32768, 32767\]"):
        engine.run(np.full((2, 1, 3), 40000))
    with pytest.raises(ValueError, match="C identifier"):
        export_egru_c(engine, tmp_path, name="my-model")
    with pytest.raises(TypeError, match="EGRUQ15"):
        export_egru_c(object(), tmp_path)
    engine.layers = [layer._replace(threshold=np.zeros(MAX_HIDDEN + 1, np.int64)) for layer in engine.layers]
    with pytest.raises(ValueError, match=f"hidden size {MAX_HIDDEN + 1}"):
        export_egru_c(engine, tmp_path)


# --- on an emulated Cortex-M0 ------------------------------------------------------------------

needs_device = pytest.mark.skipif(not device.available(), reason="no arm-none-eabi-gcc or qemu-system-arm: "
                                                                  "run scripts/install-arm-toolchain.sh")


@needs_device
def test_test_vectors_on_the_emulated_cortex_m0(tmp_path):
    engine = make_engine(classes=4, I=5, H=12)
    inputs = random_inputs(engine.input_size, sequences=4, steps=10)
    export_egru_c(engine, tmp_path, "ev")
    write_egru_test_vectors(engine, inputs, tmp_path, "ev")
    elf = device.build([tmp_path / "ev.c", tmp_path / "ev_check.c"], tmp_path / "check.elf")
    status, printed = device.run(elf, timeout=60)
    S, T, H, L = 6, 10, 12, 2
    assert status == 0 and f"mismatches: 0 of {S * T * (H + L) + S * (L * H + 4)} values" in printed, printed
    classes = [int(line.split()[-1]) for line in printed.splitlines() if line.startswith("sequence")]
    assert classes == engine.run(inputs.transpose(1, 0, 2)).logits[-1].argmax(1).tolist()


@needs_device
def test_instructions_on_the_device_follow_the_events(tmp_path):
    """The same model with every threshold at 2 (no events) and at −1 (nearly every unit fires
    at every step): three steps cost far more instructions with events, at least a few per
    recurrent and stacked-input MAC that the events add."""
    counts, macs = {}, {}
    for threshold in (2.0, -1.0):
        model = make_model(I=4, H=8)
        with torch.no_grad():
            for t in model.thresholds():
                t.fill_(threshold)
        engine = EGRUQ15.from_module(model)
        out = tmp_path / str(threshold)
        export_egru_c(engine, out, "m")
        (out / "main.c").write_text("""#include "m.h"
static const int16_t x[M_INPUT] = {1000, -2000, 3000, 32767};
int main(void) { m_state state; int t;
    m_reset(&state); for (t = 0; t < STEPS; t++) m_step(x, &state); return state.y[0] == 12345; }
""")
        counts[threshold] = [device.count_instructions(device.build([out / "m.c", out / "main.c"],
                                                                    out / f"s{n}.elf", {"STEPS": n}))
                             for n in (0, 3)]
        macs[threshold] = int(engine.run(np.array([[[1000, -2000, 3000, 32767]]] * 3)).macs.total.sum())
    silent = counts[2.0][1] - counts[2.0][0]
    busy = counts[-1.0][1] - counts[-1.0][0]
    assert macs[-1.0] > macs[2.0]
    assert busy - silent >= 3 * (macs[-1.0] - macs[2.0]), (silent, busy, macs)
