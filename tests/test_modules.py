"""EGRU and EGRUCell against the independent oracle, and the torch.nn.GRU contract."""

import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import egru
from egru import EGRU, EGRUCell, EGRUState

import oracle

f64 = torch.float64


def make_layer(I=3, H=4, L=1, bidirectional=False, backend="reference", **kw):
    layer = EGRU(I, H, L, bidirectional=bidirectional, dtype=f64, backend=backend, **kw)
    with torch.no_grad():  # spread the thresholds so that some units fire and some do not
        for t in layer.thresholds():
            t.uniform_(0.0, 0.4)
    return layer


def random_state(layer, B):
    LD = layer.num_layers * layer.num_directions
    y0 = torch.randn(LD, B, layer.hidden_size, dtype=f64) * (torch.rand(LD, B, layer.hidden_size) < 0.5)
    return y0, torch.randn(LD, B, layer.hidden_size, dtype=f64) * 0.3


def oracle_batch(layer, x, y0, c0, **kw):
    """The oracle over each sample of a (T, B, I) batch."""
    params = dict(layer.named_parameters())
    outs = [oracle.run(params, x[:, b], y0[:, b], c0[:, b], layer.num_layers, layer.bidirectional,
                       layer.surrogate.dampening_factor, layer.surrogate.pseudo_derivative_support, **kw)
            for b in range(x.shape[1])]
    return (torch.stack([o[0] for o in outs], 1), torch.stack([o[1] for o in outs], 1),
            torch.stack([o[2] for o in outs], 1))


def grads(outputs, inputs, seed=1):
    """Gradients of a fixed random projection of ``outputs`` with respect to ``inputs``."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


CONFIGS = {
    "1layer": dict(L=1, bidirectional=False),
    "2layers": dict(L=2, bidirectional=False),
    "bidirectional": dict(L=1, bidirectional=True),
    "2layers-bidir-k2-gamma0.3": dict(L=2, bidirectional=True, dampening_factor=0.3,
                                      pseudo_derivative_support=2.0),
    "no-bias": dict(L=2, bias=False),
    "eval-zoneout": dict(L=1, zoneout=0.4),
}


@pytest.mark.parametrize("backend", ["reference", "event"])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_oracle_outputs_states_and_gradients(name, backend):
    cfg = dict(CONFIGS[name])
    layer = make_layer(I=3, H=5, backend=backend, **cfg).eval()
    x = torch.randn(6, 3, 3, dtype=f64, requires_grad=True)
    y0, c0 = (t.requires_grad_() for t in random_state(layer, 3))
    out, (y_n, c_n) = layer(x, (y0, c0))
    zoneout_p = cfg.get("zoneout", 0.0)
    o_out, o_y, o_c = oracle_batch(layer, x, y0, c0, zoneout_p=zoneout_p)
    torch.testing.assert_close(out, o_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y_n, o_y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_n, o_c, rtol=1e-10, atol=1e-12)
    assert (out != 0).any() and (out == 0).any(), "the test should see both events and silence"

    inputs = [x, y0, c0, *layer.parameters()]
    for got, want in zip(grads((out, y_n, c_n), inputs), grads((o_out, o_y, o_c), inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class SmoothStep:
    """A differentiable stand-in for ``H`` whose true derivative is the triangle.

    ``S(v) = ∫ γ·max(0, 1 − k|u|) du`` from −1/k: with it the layer is smooth, so ``gradcheck``
    can compare every gradient path through the events, the reset and the thresholds with
    finite differences.
    """

    support = 1.0
    dampening_factor, pseudo_derivative_support = 0.7, 1.0

    def derivative(self, v):
        return self.dampening_factor * torch.clamp(1 - v.abs(), min=0)

    def __call__(self, v):
        u = v.clamp(-1, 1)
        return self.dampening_factor * (u + 1 - u * u.abs() / 2 - 0.5)


@pytest.mark.parametrize("surrogate,backend", [("smooth-triangle", "reference"),
                                               ("hard-step-gamma0", "reference"),
                                               ("hard-step-gamma0", "event")])
def test_gradcheck_every_parameter(surrogate, backend):
    """float64 gradcheck with respect to input, every weight, bias and threshold, and the state.

    "smooth-triangle" exercises the surrogate's derivative wherever ``e`` is used; the hard
    step with γ = 0 checks that, apart from the surrogate, the gradients are exact.
    """
    kw = {"surrogate": SmoothStep()} if surrogate == "smooth-triangle" else {"dampening_factor": 0.0}
    layer = make_layer(I=2, H=3, L=2, bidirectional=True, backend=backend, **kw)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 2, 2, dtype=f64, requires_grad=True)
    y0, c0 = (t.requires_grad_() for t in random_state(layer, 2))
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]

    def f(x, y0, c0, *params):
        out, (y_n, c_n) = torch.func.functional_call(layer, dict(zip(names, params)), (x, (y0, c0)))
        return out, y_n, c_n

    assert torch.autograd.gradcheck(f, (x, y0, c0, *params), eps=1e-7, atol=1e-6)


def test_hand_computed_two_steps():
    """Pins the equations: events only through y, strict threshold, pre-reset output, reset by ϑ."""
    layer = EGRU(1, 2, dtype=f64)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        layer.weight_ih_l0[4, 0] = 1.0  # n-gate input of unit A
        layer.weight_hh_l0[5, 0] = 2.0  # n-gate recurrent input of unit B from unit A
        layer.threshold_l0.fill_(0.25)
    x = torch.tensor([[[2.0]], [[0.0]]], dtype=f64)
    y0 = torch.zeros(1, 1, 2, dtype=f64)
    c0 = torch.tensor([[[0.0, 0.5]]], dtype=f64)
    out, (y_n, c_n), rec = layer(x, (y0, c0), record=True)

    # step 1: r = z = 1/2. A: ĉ = tanh(2)/2 > ϑ fires. B: ĉ = 0 + 0.5·0.5 = 0.25 = ϑ, no event.
    cA1 = math.tanh(2.0) / 2
    assert out[0, 0].tolist() == pytest.approx([cA1, 0.0], abs=1e-15)
    assert rec[0].e[0, 0].tolist() == [1.0, 0.0]
    # step 2: A decays below ϑ without an event; B hears y_A (not c_A) and fires.
    cA2 = 0.5 * (cA1 - 0.25)
    cB2 = 0.5 * math.tanh(0.5 * 2.0 * cA1) + 0.5 * 0.25
    assert cB2 > 0.25 and 0.5 * math.tanh(cA1 - 0.25) + 0.125 < 0.25  # c_A would not have fired B
    assert out[1, 0].tolist() == pytest.approx([0.0, cB2], abs=1e-15)
    assert y_n[0, 0].tolist() == pytest.approx([0.0, cB2], abs=1e-15)
    assert c_n[0, 0].tolist() == pytest.approx([cA2, cB2 - 0.25], abs=1e-15)


def test_state_handover_two_layers():
    layer = make_layer(I=3, H=4, L=2)
    x = torch.randn(8, 2, 3, dtype=f64)
    hx = random_state(layer, 2)
    full, (y_n, c_n) = layer(x, hx)
    first, state = layer(x[:4], hx)
    second, (y_m, c_m) = layer(x[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y_m, y_n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(c_m, c_n, rtol=1e-12, atol=1e-14)


def test_state_handover_two_layers_bidirectional():
    """Halves with the state handed over in each direction's own order equal one call.

    The forward direction hands its state from the first half to the second, the reverse
    direction from the second to the first. Layer 2 depends on both directions of layer 1, so
    the handover is iterated; with L layers it settles after L + 1 rounds.
    """
    layer = make_layer(I=3, H=4, L=2, bidirectional=True)
    x = torch.randn(8, 2, 3, dtype=f64)
    hx = EGRUState(*random_state(layer, 2))
    full, (y_n, c_n) = layer(x, hx)
    fwd, rev = slice(0, None, 2), slice(1, None, 2)  # rows of each direction in (L*D, B, H)

    def mixed(f_state, r_state):
        y, c = hx.y.clone(), hx.c.clone()
        y[fwd], c[fwd] = f_state.y[fwd], f_state.c[fwd]
        y[rev], c[rev] = r_state.y[rev], r_state.c[rev]
        return EGRUState(y, c)

    second_state = hx
    for _ in range(layer.num_layers + 1):
        first, first_state = layer(x[:4], mixed(hx, second_state))
        second, second_state = layer(x[4:], mixed(first_state, hx))
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=1e-12, atol=1e-14)
    final = mixed(second_state, first_state)
    torch.testing.assert_close(final.y, y_n, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(final.c, c_n, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_equals_each_sequence_alone(enforce_sorted):
    layer = make_layer(I=3, H=4, L=2, bidirectional=True)
    lengths = torch.tensor([6, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1])
    x = torch.randn(6, 3, 3, dtype=f64)
    y0, c0 = random_state(layer, 3)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    out, (y_n, c_n) = layer(packed, (y0, c0))
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths.tolist()
    for b, n in enumerate(lengths.tolist()):
        alone, (y_b, c_b) = layer(x[:n, b], (y0[:, b], c0[:, b]))
        torch.testing.assert_close(padded[:n, b], alone, rtol=1e-12, atol=1e-14)
        assert (padded[n:, b] == 0).all()
        torch.testing.assert_close(y_n[:, b], y_b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c_n[:, b], c_b, rtol=1e-12, atol=1e-14)


def test_batch_first_and_unbatched_agree_with_time_major():
    layer = make_layer(I=3, H=4, L=2)
    x = torch.randn(5, 2, 3, dtype=f64)
    out, (y_n, c_n) = layer(x)
    layer.batch_first = True
    out_bf, (y_bf, _) = layer(x.transpose(0, 1))
    torch.testing.assert_close(out_bf.transpose(0, 1), out)
    torch.testing.assert_close(y_bf, y_n)
    layer.batch_first = False
    out_u, (y_u, c_u) = layer(x[:, 1])
    assert out_u.shape == (5, 4) and y_u.shape == (2, 4)
    torch.testing.assert_close(out_u, out[:, 1])
    torch.testing.assert_close(c_u, c_n[:, 1])


def test_zoneout_in_evaluation_follows_the_expectation():
    """Regression: evaluation uses ĉ ← p·c_{t-1} + (1 − p)·ĉ; it must not freeze the state."""
    p = 0.4
    layer = make_layer(I=3, H=4, zoneout=p).eval()
    x = torch.randn(6, 2, 3, dtype=f64)
    _, _, (rec,) = layer(x, record=True)
    plain = make_layer(I=3, H=4)
    plain.load_state_dict(layer.state_dict())
    # Recompute each step by hand from the recorded candidates of the zoned-out layer.
    c = torch.zeros(2, 4, dtype=f64)
    y = torch.zeros(2, 4, dtype=f64)
    for t in range(6):
        step = egru.functional.egru_cell(x[t], EGRUState(y, c), plain.weight_ih_l0, plain.weight_hh_l0,
                                         plain.bias_ih_l0, plain.bias_hh_l0, plain.threshold_l0,
                                         plain.surrogate)
        unzoned = step.c_hat
        expected = p * c + (1 - p) * unzoned
        torch.testing.assert_close(rec.c_hat[t], expected, rtol=1e-12, atol=1e-14)
        assert not torch.allclose(rec.c_hat[t], c), "the state must not be frozen"
        e = (expected > plain.threshold_l0).to(f64)
        y, c = e * expected, expected - e * plain.threshold_l0


def test_zoneout_in_training_uses_one_keep_mask_per_unit_and_step():
    layer = make_layer(I=3, H=4, L=2, bidirectional=True, zoneout=0.5).train()
    x = torch.randn(5, 2, 3, dtype=f64)
    y0, c0 = random_state(layer, 2)
    torch.manual_seed(7)
    out, (y_n, c_n) = layer(x, (y0, c0))
    torch.manual_seed(7)  # the module's documented order: per layer and direction, the zoneout mask
    keep = {}
    for layer_i, d in itertools.product(range(2), range(2)):
        keep[(layer_i, d)] = torch.empty(5, 2, 4, dtype=f64).bernoulli_(0.5)
    for b in range(2):
        o_out, o_y, o_c = oracle.run(dict(layer.named_parameters()), x[:, b], y0[:, b], c0[:, b], 2, True,
                                     0.7, 1.0, zoneout_keep={k: v[:, b] for k, v in keep.items()})
        torch.testing.assert_close(out[:, b], o_out, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c_n[:, b], o_c, rtol=1e-10, atol=1e-12)


def test_dropconnect_draws_one_mask_per_call_shared_over_time(monkeypatch):
    p = 0.5
    layer = make_layer(I=3, H=4, L=2, dropconnect=p).train()
    x = torch.randn(7, 2, 3, dtype=f64)
    calls = []
    original = egru.functional.dropconnect_mask
    monkeypatch.setattr(egru.functional, "dropconnect_mask",
                        lambda w, p: calls.append(w.shape) or original(w, p))
    torch.manual_seed(3)
    out, _ = layer(x)
    assert len(calls) == 2  # one per layer and direction, not one per step
    torch.manual_seed(3)
    masks = {(l, 0): torch.empty(12, 4, dtype=f64).bernoulli_(1 - p) / (1 - p) for l in range(2)}
    zeros = torch.zeros(2, 4, dtype=f64)
    for b in range(2):
        o_out, _, _ = oracle.run(dict(layer.named_parameters()), x[:, b], zeros, zeros, 2, False,
                                 0.7, 1.0, w_hh_masks=masks)
        torch.testing.assert_close(out[:, b], o_out, rtol=1e-10, atol=1e-12)
    layer.eval()  # no DropConnect in evaluation
    calls.clear()
    layer(x)
    assert calls == []


def test_dropout_between_layers_only_in_training():
    layer = make_layer(I=3, H=8, L=2, dropout=0.5)
    x = torch.randn(5, 2, 3, dtype=f64)
    eval_out = layer.eval()(x)[0]
    torch.testing.assert_close(layer(x)[0], eval_out)
    torch.manual_seed(0)
    train_a = layer.train()(x)[0]
    torch.manual_seed(0)
    train_b = layer(x)[0]
    torch.testing.assert_close(train_a, train_b)
    assert not torch.allclose(train_a, eval_out)


def test_gru_round_trip_and_gate_order():
    gru = nn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=f64)
    layer = EGRU.from_gru(gru, threshold=0.0)
    assert all(torch.equal(t, torch.zeros(4, dtype=f64)) for t in layer.thresholds())
    back = layer.to_gru()
    for name, value in gru.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    # From a zero state the first candidate state of an EGRU is the GRU's first hidden state.
    gru = nn.GRU(3, 4, dtype=f64)
    x = torch.randn(1, 2, 3, dtype=f64)
    h1, _ = gru(x)
    _, _, records = EGRU.from_gru(gru)(x, record=True)
    torch.testing.assert_close(records[0].c_hat[0], h1[0])


def test_thresholds_are_projected_after_the_step_not_in_forward():
    model = nn.Sequential()
    model.rnn = make_layer(I=2, H=3)
    with torch.no_grad():
        model.rnn.threshold_l0.copy_(torch.tensor([-0.5, 0.5, 1.5], dtype=f64))
    before = model.rnn.threshold_l0.detach().clone()
    model.rnn(torch.randn(3, 1, 2, dtype=f64))
    assert torch.equal(model.rnn.threshold_l0, before), "forward must not mutate parameters"
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    egru.keep_thresholds_in_range(opt, model)
    opt.step()
    assert model.rnn.threshold_l0.tolist() == [0.0, 0.5, 1.0]


def test_threshold_initialisation_has_the_requested_mean():
    layer = EGRU(2, 4000, threshold_mean=0.2, dtype=f64)
    assert layer.threshold_l0.mean().item() == pytest.approx(0.2, abs=0.01)
    assert 0 <= layer.threshold_l0.min() and layer.threshold_l0.max() <= 1


def test_cell_equals_one_step_of_the_layer():
    layer = make_layer(I=3, H=4)
    cell = EGRUCell(3, 4, dtype=f64)
    cell.load_state_dict({k[:-3]: v for k, v in layer.state_dict().items()})
    x = torch.randn(3, 2, 3, dtype=f64)
    out, (y_n, c_n) = layer(x)
    state = None
    for t in range(3):
        state = cell(x[t], state)
        torch.testing.assert_close(state.y, out[t])
    torch.testing.assert_close(state.c, c_n[0])
    y_u, c_u = cell(x[0, 0])  # unbatched
    torch.testing.assert_close(y_u, out[0, 0])


def test_record_events_match_outputs():
    layer = make_layer(I=3, H=4, L=2, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=f64)
    out, _, records = layer(x, record=True)
    assert len(records) == 2
    assert torch.equal(records[-1].e != 0, out != 0)
    assert records[0].e.shape == (5, 2, 8) and records[0].valid.all()


# --- bad input ------------------------------------------------------------------------------

BAD_CONSTRUCTORS = {
    "negative hidden size": (dict(input_size=3, hidden_size=-1), ValueError, "hidden_size"),
    "zero input size": (dict(input_size=0, hidden_size=4), ValueError, "input_size"),
    "float num_layers": (dict(input_size=3, hidden_size=4, num_layers=1.5), ValueError, "num_layers"),
    "dropout 1": (dict(input_size=3, hidden_size=4, dropout=1.0), ValueError, "dropout"),
    "negative zoneout": (dict(input_size=3, hidden_size=4, zoneout=-0.1), ValueError, "zoneout"),
    "dropconnect 1.5": (dict(input_size=3, hidden_size=4, dropconnect=1.5), ValueError, "dropconnect"),
    "zero support": (dict(input_size=3, hidden_size=4, pseudo_derivative_support=0.0), ValueError,
                     "pseudo_derivative_support"),
    "negative support": (dict(input_size=3, hidden_size=4, pseudo_derivative_support=-1.0), ValueError,
                         "pseudo_derivative_support"),
    "threshold mean 1": (dict(input_size=3, hidden_size=4, threshold_mean=1.0), ValueError, "threshold_mean"),
    "unknown backend": (dict(input_size=3, hidden_size=4, backend="magic"), ValueError, "backend"),
}


@pytest.mark.parametrize("name", BAD_CONSTRUCTORS)
def test_bad_constructor_arguments(name):
    kwargs, error, match = BAD_CONSTRUCTORS[name]
    with pytest.raises(error, match=match):
        EGRU(**kwargs)


def _bad_calls():
    H, L = 4, 2
    ok = torch.zeros(L, 2, H)
    return {
        "4-d input": ((torch.zeros(5, 2, 3, 1),), ValueError, r"3 dimensions|got 4 dimensions"),
        "1-d input": ((torch.zeros(5),), ValueError, "got 1 dimensions"),
        "wrong features": ((torch.zeros(5, 2, 7),), ValueError, "3 features, got 7"),
        "empty sequence": ((torch.zeros(0, 2, 3),), ValueError, "non-empty"),
        "wrong dtype": ((torch.zeros(5, 2, 3, dtype=f64),), TypeError, "dtype"),
        "half of hx": ((torch.zeros(5, 2, 3), ok), ValueError, "pair"),
        "hx of one": ((torch.zeros(5, 2, 3), (ok,)), ValueError, "pair"),
        "hx wrong shape": ((torch.zeros(5, 2, 3), (ok, torch.zeros(L, 3, H))), ValueError,
                           r"c_0 of shape \(2, 2, 4\)"),
        "hx wrong dtype": ((torch.zeros(5, 2, 3), (ok, ok.double())), TypeError, "c_0 of dtype"),
        "hx not broadcast": ((torch.zeros(5, 2, 3), (torch.zeros(1, 2, H), ok)), ValueError, "y_0 of shape"),
        "unbatched hx 3-d": ((torch.zeros(5, 3), (ok, ok)), ValueError, r"y_0 of shape \(2, 4\)"),
        "list input": (([[0.0]],), TypeError, "Tensor or PackedSequence"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_forward_arguments(name):
    args, error, match = _bad_calls()[name]
    layer = EGRU(3, 4, num_layers=2)
    with pytest.raises(error, match=match):
        layer(*args)


def test_meta_device_input_is_rejected():
    layer = EGRU(3, 4)
    with pytest.raises(ValueError, match="device"):
        layer(torch.zeros(5, 2, 3, device="meta"))


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(2, 3, 1),), r"\(B, I\) or \(I,\)"),
    ((torch.zeros(2, 5),), "3 features, got 5"),
    ((torch.zeros(2, 3), torch.zeros(2, 4)), "pair"),
    ((torch.zeros(2, 3), (torch.zeros(2, 4), torch.zeros(1, 4))), r"state c of shape \(2, 4\)"),
])
def test_cell_bad_arguments(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        EGRUCell(3, 4)(*args)


@pytest.mark.parametrize("backend", ["reference", "event", "auto"])
def test_weights_changed_in_place_are_used_by_the_next_call(backend):
    """However a weight is changed (optimiser step, ``.data``, ``copy_``), the next call sees it."""
    layer = make_layer(I=3, H=4, L=2, backend=backend)
    x = torch.randn(5, 2, 3, dtype=f64)
    layer(x)
    layer.weight_hh_l0.data.mul_(2.0)
    with torch.no_grad():
        layer.weight_ih_l1.add_(0.5)
    reference = make_layer(I=3, H=4, L=2)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x)[0], reference(x)[0], rtol=1e-10, atol=1e-12)
