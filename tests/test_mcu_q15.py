"""egru.mcu.q15: the integer engine's pieces on values checked by hand, and the engine against the
float embedded eGRU with the same 3-bit weights, within a bound, on random inputs."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from egru import mcu
from egru.mcu import q15


def test_to_q15_rounds_and_saturates():
    assert q15.to_q15([0.0, 0.5, -1.0, 1.0, -2.0, 1 / 65536, 3 / 65536]).tolist() == \
        [0, 16384, -32768, 32767, -32768, 0, 2]  # halves to even, as np.rint
    assert q15.to_q15([100.0], bits=32).tolist() == [3_276_800]


def test_softsign_in_integers():
    v = np.array([0, 32768, -32768, 3 * 32768, 2 ** 31 - 1, -(2 ** 31), 1, -1])
    # ς(1) = ½, ς(3) = ¾; the largest magnitude is 32767; near 0, ς(v) ≈ v
    assert q15.softsign(v).tolist() == [0, 16384, -16384, 24576, 32767, -32767, 1, -1]
    grid = np.arange(-200_000, 200_000, 97)
    exact = grid / (q15.ONE + np.abs(grid)) * q15.ONE
    assert np.abs(q15.softsign(grid) - exact).max() <= 1.0
    assert np.all(np.diff(q15.softsign(grid)) >= 0)


def test_shift_product_floors_each_term():
    codes = np.array([[3, 2, 1, -1, 0]])  # weights 1, ½, ¼, −¼, 0
    u = np.array([[100, 101, -1, -1, 12345]])
    # 100 + ⌊101/2⌋ + ⌊−1/4⌋ − ⌊−1/4⌋ + 0 = 100 + 50 − 1 + 1
    assert q15.shift_product(codes, u).tolist() == [[150]]


def test_step_saturates_and_stays_in_range():
    H, I = 3, 2
    codes = np.full((H, H + I), 3)  # every weight 1
    big = np.full(H, 2 ** 31 - 1)
    x, h = np.full((1, I), 32767), np.full((1, H), 32767)
    out = q15.step(x, h, codes, big, codes, big)
    assert out.tolist() == [[32767] * H]
    out = q15.step(-x - 1, -h - 1, codes, -big - 1, codes, -big - 1)
    assert out.min() >= -32768 and out.max() <= 32767


def test_fan_in_beyond_what_int32_holds_is_refused():
    with pytest.raises(ValueError, match="65535"):
        q15.step(np.zeros((1, 65_535)), np.zeros((1, 1)), np.zeros((1, 65_536)), None, np.zeros((1, 65_536)), None)


@pytest.mark.parametrize("rule", ["paper", "authors"])
def test_engine_against_the_float_layer(rule):
    """Two stacked layers over 50 steps of random inputs in [−1, 1): within 64 Q15 units (2e-3)
    of the float layer computing with the same 3-bit weights (measured: a few units)."""
    torch.manual_seed(0)
    layer = mcu.EmbeddedGRU(8, 16, num_layers=2, quantize=rule, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(4)  # past the zero bounds, so that every code occurs
    x = torch.rand(50, 4, 8, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out, h_n = layer(x)
    engine = q15.Q15Layers(layer)
    assert engine.rule == rule
    q_out, q_h = engine.run(q15.to_q15(x.numpy()))
    error = np.abs(q15.from_q15(q_out) - out.numpy()).max() * q15.ONE
    assert error <= 64, error
    assert np.array_equal(q_h[-1], q_out[-1]) and len(q_h) == 2
    codes = engine.cells[0][0]
    assert set(np.unique(np.abs(codes))) == {0, 1, 2, 3}


def test_dense_weights_take_the_smallest_exponent_that_fits():
    values, exponent, bias = q15.dense_weights([[0.5, -0.25]], [0.125])
    assert (values.tolist(), exponent, bias.tolist()) == ([[16384, -8192]], 0, [4096])
    values, exponent, _ = q15.dense_weights([[3.0, -0.5]], None)
    assert exponent == 2 and values.tolist() == [[24576, -4096]]  # 3 = 24576 · 2^(2 − 15)
    with pytest.raises(ValueError, match="beyond"):
        q15.dense_weights([[70000.0]], None)
    with pytest.raises(ValueError, match="overflow"):
        q15.dense(np.zeros((1, 1 << 14), np.int64), np.zeros((1, 1 << 14), np.int64), 2, None, relu=False)


def test_dense_layer_in_integers():
    x = np.array([[16384, -16384, 32767]])  # ½, −½, ≈1
    values, exponent, bias = q15.dense_weights([[1.0, 1.0, 0.0], [2.0, 0.0, -1.0]], [0.0, 0.25])
    # unit 0: ½ − ½ = 0; unit 1: 2·½ − 1 + ¼ = ¼ (floors of the shifts: a unit or two below)
    out = q15.dense(x, values, exponent, bias, relu=False)
    assert out[0, 0] in (-1, 0) and abs(out[0, 1] - 8192) <= 2
    assert q15.dense(-x, values, exponent, bias, relu=True).min() >= 0  # ReLU


def test_classifier_against_the_float_model():
    """Recurrent layers and a two-layer head: logits within 1e-2 of the float model's with the
    same 3-bit recurrent weights, and the same predicted classes where the float margin is clear."""
    torch.manual_seed(3)
    recurrent = mcu.EmbeddedGRU(6, 12, num_layers=2, quantize="paper", dtype=torch.float64)
    head = [torch.nn.Linear(12, 8, dtype=torch.float64), torch.nn.Linear(8, 4, dtype=torch.float64)]
    with torch.no_grad():
        for p in recurrent.parameters():
            p.mul_(4)
    x = torch.rand(30, 64, 6, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        features = recurrent(x)[0][-1]
        logits = head[1](torch.relu(head[0](features))).numpy()
    engine = q15.Q15Classifier(recurrent, head)
    got = q15.from_q15(engine.logits(q15.to_q15(x.numpy())))
    assert np.abs(got - logits).max() < 1e-2
    sorted_logits = np.sort(logits, axis=1)
    clear = sorted_logits[:, -1] - sorted_logits[:, -2] > 2e-2
    assert clear.sum() > 32 and np.array_equal(got[clear].argmax(1), logits[clear].argmax(1))


def test_layers_of_different_sizes_and_their_checks():
    """The paper's shape (two layers of different sizes, from two modules) runs as one stack;
    a head that does not fit the features is refused."""
    torch.manual_seed(4)
    first, second = mcu.EmbeddedGRU(5, 7, dtype=torch.float64), mcu.EmbeddedGRU(7, 3, dtype=torch.float64)
    x = torch.rand(12, 2, 5, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        out = second(first(x)[0])[0]
    quantized = [mcu.EmbeddedGRU(5, 7, quantize="paper", dtype=torch.float64),
                 mcu.EmbeddedGRU(7, 3, quantize="paper", dtype=torch.float64)]
    for module, trained in zip(quantized, (first, second)):
        module.load_state_dict(trained.state_dict())
    with torch.no_grad():
        expected = quantized[1](quantized[0](x)[0])[0].numpy()
    engine = q15.Q15Layers([first, second])
    assert engine.hidden_sizes == [7, 3] and out.shape == expected.shape
    got, states = engine.run(q15.to_q15(x.numpy()))
    assert [s.shape for s in states] == [(2, 7), (2, 3)]
    assert np.abs(q15.from_q15(got) - expected).max() * q15.ONE <= 64
    with pytest.raises(ValueError, match="feeds one that expects"):
        q15.Q15Layers([second, first])
    with pytest.raises(ValueError, match="dense layer of 4 inputs follows 3"):
        q15.Q15Classifier([first, second], [torch.nn.Linear(4, 2)])


@pytest.mark.parametrize("value, word", [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "inf")])
@pytest.mark.parametrize("tensor", ["cells.1.weight_z", "cells.0.bias_h", "head[1].weight", "head[0].bias"])
def test_non_finite_parameters_are_refused_by_name(tensor, value, word):
    """A NaN or infinite recurrent weight (whose 3-bit code would be 0 or ±1 without a word), bias
    or head weight is refused, naming the tensor; as are such inputs."""
    torch.manual_seed(0)
    recurrent = mcu.EmbeddedGRU(3, 5, num_layers=2, dtype=torch.float64)
    head = [torch.nn.Linear(5, 4, dtype=torch.float64), torch.nn.Linear(4, 2, dtype=torch.float64)]
    parameters = {**dict(recurrent.named_parameters()),
                  **{f"head[{k}].{name}": p for k, layer in enumerate(head) for name, p in layer.named_parameters()}}
    with torch.no_grad():
        parameters[tensor][(0,) * parameters[tensor].dim()] = value
    with pytest.raises(ValueError, match=re.escape(f"{tensor} holds {word}")):
        q15.Q15Classifier(recurrent, head)
    with pytest.raises(ValueError, match=f"an input holds {word}"):
        q15.to_q15([0.5, value])
