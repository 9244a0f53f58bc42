"""The recipes' recurrent cores: one interface for the EGRU, GRU, LSTM and embedded eGRU."""

import pytest
import torch

import egru
from egru.recipes.cores import MODELS, CoreConfig, make_core


@pytest.mark.parametrize("model", MODELS)
def test_two_halves_with_the_state_handed_over_equal_one_call(model):
    core = make_core(CoreConfig(model=model, threshold_mean=0.2), 3, 5).eval()
    x = torch.randn(7, 2, 3)
    state = core.initial_state(2, x)
    out, final, _ = core(x, state)
    first, middle, _ = core(x[:4], state)
    second, end, _ = core(x[4:], middle)
    assert out.shape == (7, 2, 5) and core.features(out).shape == (7, 2, 5)
    torch.testing.assert_close(torch.cat([first, second]), out)
    for a, b in zip(tensors(end), tensors(final), strict=True):
        torch.testing.assert_close(a, b)


def tensors(state) -> list:
    """A GRU's h, an LSTM's (h, c) or an EGRU's (y, c) as a list."""
    return [state] if isinstance(state, torch.Tensor) else list(state)


@pytest.mark.parametrize("model", MODELS)
def test_every_core_accounts_its_macs(model):
    core = make_core(CoreConfig(model=model, threshold_mean=0.2), 3, 5)
    x = torch.randn(7, 2, 3)
    _, _, record = core(x, core.initial_state(2, x), record=True)
    stats = core.stats(record)
    assert stats.steps == 7 * 2
    if model == "egru":
        assert stats == egru.layer_stats(record)
        assert stats.effective_macs < stats.dense_macs
    else:  # a dense layer does one MAC per weight entry per step
        rnn = core.rnn
        if model == "embedded":
            entries = sum(c.weight_z.numel() + c.weight_h.numel() for c in rnn.cells)
        else:
            entries = rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()
        assert stats.effective_macs == stats.dense_macs == entries * 7 * 2
        assert stats.activity == stats.backward_activity == 1


def test_a_quantised_embedded_core_counts_only_its_nonzero_weights():
    core = make_core(CoreConfig(model="embedded", quantize="paper"), 3, 5)  # ±1/√5: some below ¼
    x = torch.randn(7, 2, 3)
    stats = core.stats(core(x, core.initial_state(2, x), record=True)[2])
    weight_z, weight_h = core.rnn.cells[0].weights()
    nonzero = int(weight_z.ne(0).sum() + weight_h.ne(0).sum())
    assert 0 < nonzero < 2 * 5 * 8
    assert stats.effective_macs == nonzero * 7 * 2 < stats.dense_macs


@pytest.mark.parametrize("model", ["gru", "lstm"])
def test_dropconnect_masks_the_dense_cores_recurrent_weights_in_training_only(model):
    torch.manual_seed(0)
    core = make_core(CoreConfig(model=model, dropconnect=0.5), 3, 5)
    weight = core.rnn.weight_hh_l0.detach().clone()
    x = torch.randn(4, 2, 3)
    state = core.initial_state(2, x)
    trained = core.train()(x, state)[0]
    evaluated = core.eval()(x, state)[0]
    assert not torch.allclose(trained, evaluated)
    torch.testing.assert_close(evaluated, core.rnn(x, state)[0])
    assert torch.equal(core.rnn.weight_hh_l0, weight)


def test_unknown_cores_and_values_are_refused():
    with pytest.raises(ValueError, match="unknown model 'rnn'"):
        CoreConfig(model="rnn")
    with pytest.raises(ValueError, match="dropconnect must be a number in"):
        CoreConfig(dropconnect=1.0)
