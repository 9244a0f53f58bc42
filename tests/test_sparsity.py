import pytest
import torch

from egru import EGRU, layer_stats, model_stats, prune
from egru.sparsity import dense_layer_stats, dense_macs
from torch.nn.utils.rnn import pack_padded_sequence


def count_by_hand(layer, x, records, lengths=None):
    """Activity, backward activity and MACs counted with explicit loops."""
    T, B, I = x.shape
    H = layer.hidden_size
    results = []
    for l, rec in enumerate(records):
        fired = back = units = eff = dense = 0
        for b in range(B):
            n = T if lengths is None else int(lengths[b])
            for t in range(n):
                e = rec.e[t, b]
                fired += int((e != 0).sum())
                back += int(((e != 0) | ((rec.c_hat[t, b] - rec.threshold).abs() < rec.support)).sum())
                units += e.numel()
                in_active = I if l == 0 else int((records[l - 1].e[t, b] != 0).sum())
                prev = 0 if t == 0 else int((rec.e[t - 1, b] != 0).sum())  # one direction, y0 = 0
                eff += 3 * H * (in_active + prev)
                dense += 3 * H * (rec.input_size + H)
        results.append((fired / units, back / units, eff, dense))
    return results


@pytest.mark.parametrize("packed", [False, True])
def test_statistics_match_hand_counts(packed):
    layer = EGRU(3, 6, num_layers=2, threshold_mean=0.2, pseudo_derivative_support=3.0)
    x = torch.randn(7, 3, 3)
    lengths = torch.tensor([7, 5, 2]) if packed else None
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
    _, _, records = layer(inp, record=True)
    hand = count_by_hand(layer, x, records, lengths)
    for rec, (activity, backward, eff, dense) in zip(records, hand):
        s = layer_stats(rec)
        assert s.activity == pytest.approx(activity)
        assert s.backward_activity == pytest.approx(backward)
        assert (s.effective_macs, s.dense_macs) == (eff, dense)
        assert 0 < s.activity < s.backward_activity < 1
    total = model_stats(records)
    assert total.effective_macs == sum(h[2] for h in hand)
    assert total.activity == pytest.approx(sum(h[0] for h in hand) / 2)


def test_silent_layer_costs_only_its_dense_input_product():
    layer = EGRU(3, 4, threshold_mean=0.3)
    with torch.no_grad():
        layer.threshold_l0.fill_(1.0)  # |ĉ| < 1: nothing can fire
    _, _, (rec,) = layer(torch.randn(5, 2, 3), record=True)
    s = layer_stats(rec)
    assert s.activity == 0 and s.effective_macs == 3 * 4 * 3 * 5 * 2


@pytest.mark.parametrize("rnn_class,gates", [(torch.nn.GRU, 3), (torch.nn.LSTM, 4)])
def test_dense_macs_are_the_weight_entries_of_a_dense_layer(rnn_class, gates):
    rnn = rnn_class(7, 5)
    entries = rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()
    assert dense_macs(7, 5, gates) == entries
    stats = dense_layer_stats(7, 5, steps=11, gates=gates)
    assert (stats.effective_macs, stats.dense_macs, stats.steps) == (11 * entries, 11 * entries, 11)
    assert stats.activity_sparsity == stats.backward_sparsity == 0


def test_an_egru_layer_costs_densely_what_a_gru_of_its_shape_does():
    layer = EGRU(3, 4)
    _, _, (rec,) = layer(torch.randn(5, 2, 3), record=True)
    assert layer_stats(rec).dense_macs == dense_macs(3, 4) * 5 * 2 == sum(
        p.numel() for p in layer.to_gru().parameters() if p.dim() == 2) * 5 * 2


def count_pruned_by_hand(layer, x, records):
    """Forward and backward effective MACs with pruned weights, one direction, no padding,
    y_0 = 0: every event costs the nonzero weights of its unit's (or input's) column."""
    T, B, _ = x.shape
    results = []
    for l, rec in enumerate(records):
        w_ih, w_hh = (getattr(layer, f"weight_{m}_l{l}") for m in ("ih", "hh"))
        ih_cost, hh_cost = (w_ih != 0).sum(0), (w_hh != 0).sum(0)
        forward = backward = 0
        for b in range(B):
            for t in range(T):
                inputs = int(ih_cost.sum()) if l == 0 else sum(
                    int(ih_cost[j]) for j in range(w_ih.shape[1]) if records[l - 1].e[t, b, j] != 0)
                prev = 0 if t == 0 else sum(int(hh_cost[j]) for j in range(w_hh.shape[1])
                                            if rec.e[t - 1, b, j] != 0)
                in_g = 0 if t == 0 else sum(
                    int(hh_cost[j]) for j in range(w_hh.shape[1])
                    if rec.e[t - 1, b, j] != 0 or abs(rec.c_hat[t - 1, b, j] - rec.threshold[j]) < rec.support)
                forward += inputs + prev
                backward += in_g + prev + inputs + (int(ih_cost.sum()) if l > 0 else 0)
        density = (float((w_ih != 0).float().mean()), float((w_hh != 0).float().mean()))
        results.append((forward, backward, density))
    return results


def test_pruned_weights_cost_nothing_forward_or_backward():
    torch.manual_seed(1)
    layer = EGRU(4, 6, num_layers=2, threshold_mean=0.2, pseudo_derivative_support=3.0)
    prune.magnitude(layer, 0.6)
    with torch.no_grad():
        layer.weight_hh_l1_orig[:, 2] = 0  # a unit that sends nothing
    x = torch.randn(6, 3, 4)
    _, _, records = layer(x, record=True)
    for rec, (forward, backward, density) in zip(records, count_pruned_by_hand(layer, x, records)):
        s = layer_stats(rec)
        assert 0 < s.effective_macs == forward
        assert s.backward_effective_macs == backward
        assert (s.weight_density_ih, s.weight_density_hh) == pytest.approx(density)
        assert s.weight_density_ih == pytest.approx(0.4, abs=0.02)
    first, second = (layer_stats(r) for r in records)
    assert first.backward_dense_macs == 3 * 6 * (4 + 2 * 6) * 18  # no input gradient for data
    assert second.backward_dense_macs == 3 * 6 * (2 * 6 + 2 * 6) * 18


def test_a_pruned_dense_layer_costs_its_nonzero_weights():
    stats = dense_layer_stats(7, 5, steps=10, gates=3, input_grad=True, weight_density=(0.5, 0.2))
    assert stats.effective_macs == round(3 * 5 * (7 * 0.5 + 5 * 0.2)) * 10
    assert stats.backward_effective_macs == round(3 * 5 * (2 * 7 * 0.5 + 2 * 5 * 0.2)) * 10
    assert stats.dense_macs == dense_macs(7, 5) * 10
    assert (stats.weight_density_ih, stats.weight_density_hh) == (0.5, 0.2)
