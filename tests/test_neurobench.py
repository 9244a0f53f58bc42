"""NeuroBench on egru models: the step-by-step copies compute what the originals do (float64),
and stock NeuroBench's figures equal egru.model_stats' where the definitions agree and differ by
exactly the stated amount where they do not (egru.neurobench's docs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import egru
from egru.neurobench import StepwiseEGRU, stepwise
from egru.recipes import classify

F64 = torch.float64


def egru_layer(num_layers=2, batch_first=False, seed=0):
    torch.manual_seed(seed)
    return egru.EGRU(3, 16, num_layers=num_layers, batch_first=batch_first, threshold_mean=0.1,
                     backend="reference").to(F64).eval()


@pytest.mark.parametrize("batch_first", [False, True])
def test_stepwise_egru_equals_the_layer(batch_first):
    layer = egru_layer(batch_first=batch_first)
    x = torch.randn(5, 12, 3, dtype=F64) if batch_first else torch.randn(12, 5, 3, dtype=F64)
    state = egru.EGRUState(torch.zeros(2, 5, 16, dtype=F64), 0.3 * torch.rand(2, 5, 16, dtype=F64))
    with torch.no_grad():
        out, final = layer(x, state)
    out_s, final_s = stepwise(layer)(x, state)
    assert out.ne(0).any() and out.eq(0).any()  # events, and silence
    torch.testing.assert_close(out_s, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(final_s.c, final.c, rtol=0, atol=1e-12)
    torch.testing.assert_close(final_s.y, final.y, rtol=0, atol=1e-12)


def test_stepwise_egru_computes_with_pruned_weights():
    layer = egru_layer(num_layers=1)
    egru.prune.magnitude(layer, 0.7, matrices="hh")
    x = torch.randn(10, 4, 3, dtype=F64)
    with torch.no_grad():
        expected = layer(x)[0]
    copy = stepwise(layer)
    assert float(copy.recurrents[0].weight.eq(0).double().mean()) == pytest.approx(0.7, abs=0.01)
    torch.testing.assert_close(copy(x)[0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rnn_class", [nn.GRU, nn.LSTM])
def test_stepwise_rnn_equals_the_module(rnn_class):
    torch.manual_seed(0)
    rnn = rnn_class(3, 8, num_layers=2).to(F64)
    x = torch.randn(9, 4, 3, dtype=F64)
    out, final = rnn(x)
    out_s, final_s = stepwise(rnn)(x)
    torch.testing.assert_close(out_s, out.detach(), rtol=0, atol=1e-12)
    for got, want in zip(final_s if rnn_class is nn.LSTM else [final_s], final if rnn_class is nn.LSTM else [final]):
        torch.testing.assert_close(got, want.detach(), rtol=0, atol=1e-12)


def test_what_has_no_step_by_step_form_is_refused():
    with pytest.raises(ValueError, match="bidirectional"):
        StepwiseEGRU(egru.EGRU(3, 4, bidirectional=True))
    with pytest.raises(ValueError, match="unidirectional"):
        stepwise(nn.GRU(3, 4, bidirectional=True))
    with pytest.raises(TypeError, match="no step-by-step form"):
        stepwise(nn.RNN(3, 4))


class FirstUnits(nn.Module):
    """Logits without a connection layer: the last step's first outputs (NeuroBench then counts
    the recurrent layers' operations only)."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, batch):
        return self.rnn(batch.transpose(0, 1))[0][-1][:, :4]


def test_neurobench_figures_equal_model_stats():
    neurobench = pytest.importorskip("egru.neurobench").measure
    pytest.importorskip("neurobench")
    layer = egru_layer()
    N, T = 6, 12
    x = torch.randn(N, T, 3, dtype=F64)
    x[:, ::3, 0] = 0  # zeros the first layer's input product still computes (egru) or skips (NeuroBench)
    with torch.no_grad():
        records = layer(x.transpose(0, 1), record=True)[2]
    stats = egru.model_stats(records)
    assert 0.05 < stats.activity < 0.95
    figures = neurobench(FirstUnits(stepwise(layer)), x, torch.zeros(N, dtype=torch.long), batch_size=4)
    ops = figures["SynapticOperations"]
    skipped_inputs = int(x.eq(0).sum()) * 3 * 16  # zero inputs × the 3H weights each would meet
    assert ops["Effective_MACs"] == pytest.approx((stats.effective_macs - skipped_inputs) / N, rel=1e-12)
    assert ops["Dense"] == pytest.approx(stats.dense_macs / N, rel=1e-12)
    assert ops["Effective_ACs"] == 0  # the outputs y = e·ĉ are not binary: MACs, not ACs
    assert figures["ActivationSparsity"] == pytest.approx(stats.activity_sparsity, rel=1e-12)
    assert figures["ConnectionSparsity"] == 0


def test_a_classifier_measured_by_neurobench_counts_its_readout_too():
    pytest.importorskip("neurobench")
    cfg = classify.ClassifyConfig(hidden_size=8, num_layers=2, pseudo_derivative_support=1.0)
    torch.manual_seed(1)
    model = classify.Classifier(cfg, input_size=1, num_classes=10).eval()
    x, y = torch.randn(5, 20, 1), torch.arange(5)
    with torch.no_grad():
        logits, records = model(x.transpose(0, 1), record=True)
    figures = classify.neurobench_figures(model, x, y, batch_size=5)
    stats = egru.model_stats(records)
    # one Linear on the last step's trace, nonzero for the units that have fired
    assert figures["SynapticOperations"]["Dense"] == pytest.approx(stats.dense_macs / 5 + cfg.hidden_size * 10)
    readout = int(records[1].e.ne(0).any(0).sum()) * 10 / 5
    # the second core is a separate egru.EGRU: egru counts its input product densely, NeuroBench
    # only the first layer's events that reach it (the first core's input has no zeros)
    first_core_events = int(records[0].e.ne(0).sum())
    dense_input_products = (records[1].e.shape[0] * 5 * cfg.hidden_size - first_core_events) * 3 * cfg.hidden_size
    expected = (stats.effective_macs - dense_input_products) / 5 + readout
    assert figures["SynapticOperations"]["Effective_MACs"] == pytest.approx(expected)
    assert figures["ClassificationAccuracy"] == pytest.approx(float((logits.argmax(-1) == y).double().mean()))
