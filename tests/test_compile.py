"""The event layer as ``torch.library`` operators: ``torch.compile(fullgraph=True)`` traces a
model through it (no graph breaks) to the eager outputs and gradients, and ``opcheck`` accepts
the registrations (schema, fake implementation, autograd formula)."""

from __future__ import annotations

import pytest
import torch

import egru
from egru.kernels import event

pytest.importorskip("numba")
f64 = torch.float64


def _model(backend, **kwargs):
    torch.manual_seed(0)
    model = egru.EGRU(4, 6, num_layers=2, bidirectional=True, dtype=f64, backend=backend,
                      zoneout=0.2, **kwargs)
    with torch.no_grad():
        for threshold in model.thresholds():
            threshold.uniform_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("backend", ["event", "auto"])
@pytest.mark.parametrize("batch", [1, 3])
def test_compiled_model_equals_eager(backend, batch):
    """(Eval mode, whose zoneout has no random mask: compiled code draws other random numbers.
    A PackedSequence input breaks the graph in PyTorch's own ``pad_packed_sequence``.)"""
    torch._dynamo.reset()
    model = _model(backend)
    x = torch.randn(6, batch, 4, dtype=f64, requires_grad=True)

    def loss_and_grads(fn):
        out, (y_n, c_n) = fn(x)
        data = out
        loss = (data * torch.linspace(-1, 1, data.shape[-1], dtype=f64)).sum() + y_n.sum() + c_n.sum()
        return [data, y_n, c_n, *torch.autograd.grad(loss, [x, *model.parameters()])]

    compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    eager = loss_and_grads(model)
    assert any(g.abs().sum() > 0 for g in eager[3:])
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_compiled_training_step_has_no_graph_break():
    """A whole step (forward, loss with an activity term, backward) in one graph: explain counts
    the graphs and breaks."""
    torch._dynamo.reset()
    model = _model("auto").train()
    x = torch.randn(5, 2, 4, dtype=f64)

    def step(x):
        out, _, records = model(x, record=True)
        return out.pow(2).mean() + 1e-3 * sum(r.e.sum() for r in records)

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def _op_inputs(lengths, mask, bias, grad):
    gen = torch.Generator().manual_seed(3)
    T, B, I, H = 5, 3, 4, 6

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=f64, generator=gen) * scale).requires_grad_(grad)

    y0 = (rand(B, H) * (torch.rand(B, H, generator=gen) < 0.5)).detach().requires_grad_(grad)
    b_ih, b_hh = (rand(3 * H, scale=0.1), rand(3 * H, scale=0.1)) if bias else (None, None)
    tensors = (rand(T, B, I), y0, rand(B, H, scale=0.3), rand(3 * H, I, scale=0.5),
               rand(3 * H, H, scale=0.5), b_ih, b_hh,
               torch.rand(H, dtype=f64, generator=gen).mul(0.3).requires_grad_(grad),
               torch.tensor([5, 2, 4]) if lengths else None,
               (torch.rand(T, B, H, generator=gen) > 0.3).to(f64) if mask else None)
    settings = event.Settings(0.3 if mask else 0.0, 0.7, 1.0, False, 0.3, 0.25, 1 << 20,
                              "measured")
    return tensors + tuple(settings)


@pytest.mark.parametrize("lengths,mask,bias", [(False, False, True), (True, True, False),
                                                (True, False, True)],
                         ids=["plain", "packed-zoneout-nobias", "packed"])
def test_opcheck_forward(lengths, mask, bias):
    for grad in (True, False):
        torch.library.opcheck(torch.ops.egru.event_layer.default,
                              _op_inputs(lengths, mask, bias, grad))


def test_opcheck_backward():
    args = _op_inputs(True, True, True, grad=False)
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, mask, *settings = args
    y, c_hat, e, y_last, c_last, gates, gh_n = torch.ops.egru.event_layer(*args)
    gen = torch.Generator().manual_seed(4)
    g = [torch.randn(t.shape, dtype=f64, generator=gen) for t in (y, c_hat, e, y_last, c_last)]
    for needs in ([True] * 8, [False, True, False, True, False, True, False, True]):
        torch.library.opcheck(
            torch.ops.egru.event_layer_backward.default,
            (x, y0, c0, w_ih, w_hh, theta, lengths, mask, gates, gh_n, c_hat, y, *g, needs,
             *settings))
