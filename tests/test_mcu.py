"""egru.mcu: the embedded eGRU's 3-bit quantiser (both rules), its straight-through gradient, and
the float cell and layer against a step computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

import egru
from egru import mcu

DTYPE = torch.float64

# |w| → the quantised magnitude under each rule, at and around every boundary
TABLE = [
    (0.0, 0.0, 0.0), (0.1, 0.0, 0.0), (0.17, 0.0, 0.0),
    (2 ** -2.5, 0.0, 0.25),           # the authors' zero bound: 0.25 from there on
    (0.2, 0.0, 0.25), (0.25, 0.0, 0.25),  # the paper's: ≤ 0.25 is zero
    (0.2501, 0.25, 0.25), (0.3, 0.25, 0.25), (0.35, 0.25, 0.25),
    (2 ** -1.5, 0.5, 0.5), (0.5, 0.5, 0.5), (0.7, 0.5, 0.5),
    (2 ** -0.5, 1.0, 1.0), (0.9, 1.0, 1.0), (1.0, 1.0, 1.0), (3.0, 1.0, 1.0),  # clipped to 1
]


@pytest.mark.parametrize("rule, column", [("paper", 1), ("authors", 2)])
def test_quantiser_maps_each_interval_to_its_code(rule, column):
    magnitudes = torch.tensor([row[0] for row in TABLE], dtype=DTYPE)
    expected = torch.tensor([row[column] for row in TABLE], dtype=DTYPE)
    for sign in (1, -1):
        got = mcu.quantize(sign * magnitudes, rule)
        assert torch.equal(got, sign * expected), (rule, sign, got)
    codes = mcu.quantization_codes(-magnitudes, rule)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 3  # sign and 2 bits
    assert torch.equal(mcu.dequantize(codes, DTYPE), -expected)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="paper"):
        mcu.quantize(torch.ones(2), "nearest")
    with pytest.raises(ValueError, match="authors"):
        mcu.EmbeddedGRUCell(2, 3, quantize="Paper")


def test_straight_through_gradient_reaches_the_stored_weights():
    w = torch.tensor([0.1, -0.3, 0.6, -2.0], dtype=DTYPE, requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)
    (mcu.quantize(w) * g).sum().backward()
    assert torch.equal(w.grad, g)  # identity, even where the weight quantises to 0 or is clipped


def softsign(v):
    return v / (1 + abs(v))


def test_cell_step_by_hand():
    """A 2-unit cell with one input, each unit computed with plain floats."""
    cell = mcu.EmbeddedGRUCell(1, 2, dtype=DTYPE)
    with torch.no_grad():  # columns: h_0, h_1, x
        cell.weight_z.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.25, 0.0, -0.5]]))
        cell.weight_h.copy_(torch.tensor([[1.0, 0.5, -1.0], [-0.25, 1.0, 0.75]]))
        cell.bias_z.copy_(torch.tensor([0.1, -0.2]))
        cell.bias_h.copy_(torch.tensor([0.0, 0.3]))
    h, x = [0.4, -0.6], 0.8
    expected = []
    for i in range(2):
        u = h + [x]
        a_z = sum(w * v for w, v in zip(cell.weight_z[i].tolist(), u)) + cell.bias_z[i].item()
        a_h = sum(w * v for w, v in zip(cell.weight_h[i].tolist(), u)) + cell.bias_h[i].item()
        z = (softsign(a_z) + 1) / 2
        expected.append((1 - z) * h[i] + z * softsign(a_h))
    got = cell(torch.tensor([x], dtype=DTYPE), torch.tensor(h, dtype=DTYPE))
    assert got.tolist() == pytest.approx(expected, abs=1e-15)


def test_quantised_cell_computes_with_the_codes():
    torch.manual_seed(0)
    cell = mcu.EmbeddedGRUCell(3, 4, quantize="authors", dtype=DTYPE)
    float_cell = mcu.EmbeddedGRUCell(3, 4, dtype=DTYPE)
    with torch.no_grad():
        cell.weight_z.mul_(3)  # past the zero bound, so that every code occurs
        cell.weight_h.mul_(3)
        float_cell.load_state_dict(cell.state_dict())
        float_cell.weight_z.copy_(mcu.quantize(cell.weight_z, "authors"))
        float_cell.weight_h.copy_(mcu.quantize(cell.weight_h, "authors"))
    x, h = torch.randn(5, 3, dtype=DTYPE), torch.rand(5, 4, dtype=DTYPE)
    assert torch.equal(cell(x, h), float_cell(x, h))
    assert set(mcu.quantization_codes(cell.weight_h, "authors").abs().unique().tolist()) <= {0, 1, 2, 3}


def test_layer_stacks_cells_and_follows_nn_gru_layouts():
    torch.manual_seed(1)
    layer = mcu.EmbeddedGRU(3, 5, num_layers=2, dtype=DTYPE)
    x, h0 = torch.randn(7, 2, 3, dtype=DTYPE), torch.rand(2, 2, 5, dtype=DTYPE)
    out, h_n = layer(x, h0)
    # by hand: the cells one step at a time, the first layer's outputs the second's input
    states, expected = list(h0), []
    for x_t in x:
        states[0] = layer.cells[0](x_t, states[0])
        states[1] = layer.cells[1](states[0], states[1])
        expected.append(states[1])
    assert torch.allclose(out, torch.stack(expected), atol=1e-15)
    assert torch.allclose(h_n, torch.stack(states), atol=1e-15)
    first = mcu.EmbeddedGRU(3, 5, num_layers=2, batch_first=True, dtype=DTYPE)
    first.load_state_dict(layer.state_dict())
    out_bf, h_bf = first(x.transpose(0, 1), h0)
    assert torch.equal(out_bf, out.transpose(0, 1)) and torch.equal(h_bf, h_n)
    out_u, h_u = layer(x[:, 0], h0[:, 0])  # unbatched
    assert torch.allclose(out_u, out[:, 0], atol=1e-15) and torch.allclose(h_u, h_n[:, 0], atol=1e-15)
    (out.sum() + h_n.sum()).backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_bad_shapes_are_refused():
    layer = mcu.EmbeddedGRU(3, 5, num_layers=2)
    with pytest.raises(ValueError, match="3 features, got 4"):
        layer(torch.randn(4, 2, 4))
    with pytest.raises(ValueError, match="h0"):
        layer(torch.randn(4, 2, 3), torch.zeros(1, 2, 5))
    with pytest.raises(ValueError, match="positive integer"):
        mcu.EmbeddedGRU(3, 0)
    with pytest.raises(ValueError, match="h of shape"):
        layer.cells[0](torch.randn(2, 3), torch.zeros(3, 5))


def raised(call):
    """The type and message of the error ``call()`` raises."""
    with pytest.raises(Exception) as error:
        call()
    return error.type, str(error.value)


# inputs refused by egru.EGRU, for a layer of input size 3 (B, T swapped with batch_first)
BAD_SEQUENCES = {
    "empty sequence": lambda bf: torch.zeros(2, 0, 3) if bf else torch.zeros(0, 2, 3),
    "empty unbatched sequence": lambda bf: torch.zeros(0, 3),
    "empty batch": lambda bf: torch.zeros(0, 4, 3) if bf else torch.zeros(4, 0, 3),
    "float64 input": lambda bf: torch.zeros(4, 2, 3, dtype=torch.float64),
    "float64 unbatched input": lambda bf: torch.zeros(4, 3, dtype=torch.float64),
    "4-d input": lambda bf: torch.zeros(4, 2, 3, 1),
    "1-d input": lambda bf: torch.zeros(4),
    "wrong features": lambda bf: torch.zeros(4, 2, 5),
    "wrong unbatched features": lambda bf: torch.zeros(4, 5),
    "meta device": lambda bf: torch.zeros(4, 2, 3, device="meta"),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("name", BAD_SEQUENCES)
def test_layer_refuses_the_inputs_egru_refuses_with_its_errors(name, batch_first):
    x = BAD_SEQUENCES[name](batch_first)
    layer = mcu.EmbeddedGRU(3, 5, num_layers=2, batch_first=batch_first)
    reference = egru.EGRU(3, 5, num_layers=2, batch_first=batch_first)
    assert raised(lambda: layer(x)) == raised(lambda: reference(x))


def test_layer_refuses_the_states_egru_refuses_with_its_errors():
    layer, reference = mcu.EmbeddedGRU(3, 5, num_layers=2), egru.EGRU(3, 5, num_layers=2)
    ok = torch.zeros(2, 2, 5)
    for x, h0 in [
        (torch.zeros(4, 2, 3), torch.zeros(1, 2, 5)),  # one layer's state for two
        (torch.zeros(4, 3), ok),  # batched state, unbatched input
        (torch.zeros(4, 2, 3), ok.double()),
        (torch.zeros(4, 2, 3), ok.to("meta")),
        (torch.zeros(4, 2, 3), ok.tolist()),
    ]:
        error, message = raised(lambda: reference(x, (h0, ok if x.dim() == 3 else ok[:, 0])))
        assert raised(lambda: layer(x, h0)) == (error, message.replace("y_0", "h0")), (x.shape, h0)
    with pytest.raises(TypeError, match="expected input to be a Tensor, got list"):
        layer([[0.0] * 3] * 4)


def test_cell_refuses_what_egru_cell_refuses_with_its_errors():
    cell, reference = mcu.EmbeddedGRUCell(3, 5), egru.EGRUCell(3, 5)
    for x in (torch.zeros(2, 3, 1), torch.zeros(2, 5), torch.zeros(5), torch.zeros(2, 3, dtype=torch.float64),
              torch.zeros(3, device="meta"), [0.0] * 3):
        assert raised(lambda: cell(x)) == raised(lambda: reference(x)), x
    ok = torch.zeros(2, 5)
    for x, h in [(torch.zeros(2, 3), torch.zeros(3, 5)), (torch.zeros(3), ok),
                 (torch.zeros(2, 3), ok.double()), (torch.zeros(2, 3), ok.to("meta"))]:
        error, message = raised(lambda: reference(x, (h, ok if x.dim() == 2 else ok[0])))
        assert raised(lambda: cell(x, h)) == (error, message.replace("state y", "h")), (x.shape, h)


def test_initial_weights_are_those_of_nn_gru():
    cell = mcu.EmbeddedGRUCell(4, 16)
    bound = 1 / math.sqrt(16)
    assert all(float(p.detach().abs().max()) <= bound for p in cell.parameters())
