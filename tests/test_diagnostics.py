"""egru.diagnostics (unit health, the gradient reaching each time step) and the authors' options
(init="evnn", thresholds trained through a sigmoid)."""

import math

import pytest
import torch
from torch import nn

import egru
from egru import diagnostics, functional
from egru.state import EGRUState, LayerRecord


def record(e, c_hat, threshold, valid=None, support=1.0):
    T, B, H = e.shape
    zeros = torch.zeros(T, B, 1)
    return LayerRecord(e=e, c_hat=c_hat, threshold=threshold, valid=torch.ones(T, B, dtype=torch.bool)
                       if valid is None else valid, input_active=zeros[..., 0], recurrent_active=zeros,
                       input_size=1, hidden_size=H, support=support, forward_macs=zeros, backward_macs=zeros,
                       weight_density=torch.ones(2), input_grad=False)


def test_unit_health_counts_silent_and_saturated_units_and_the_support():
    T, B, H = 10, 2, 4
    e = torch.zeros(T, B, H)
    e[:, :, 1] = 1  # always: saturated
    e[:9, :, 2] = 1  # 90 % of the steps: saturated
    e[0, 0, 3] = 1  # once: neither
    threshold = torch.tensor([0.1, 0.2, 0.3, 0.4])
    c_hat = torch.full((T, B, H), 5.0)
    c_hat[:, :, 0] = 0.5  # |ĉ − ϑ| = 0.4 < 1: inside the support at every step
    health = diagnostics.unit_health(record(e, c_hat, threshold))
    assert health.silent_units == 0.25 and health.saturated_units == 0.5
    assert health.in_support == pytest.approx(0.25)
    assert health.threshold_quantiles == pytest.approx((0.1, 0.13, 0.25, 0.37, 0.4))


def test_unit_health_counts_only_valid_steps():
    e = torch.zeros(4, 1, 2)
    e[3, 0, 0] = 1  # only at a padded step
    valid = torch.tensor([[True], [True], [True], [False]])
    health = diagnostics.unit_health(record(e, torch.zeros(4, 1, 2), torch.full((2,), 0.5), valid))
    assert health.silent_units == 1.0


def state_gradients_by_hand(layer: egru.EGRU, x, loss_of):
    """‖∂L/∂c_t‖ of a one-layer EGRU through functional.egru_cell, one step at a time."""
    state = EGRUState(x.new_zeros(x.shape[1], layer.hidden_size), x.new_zeros(x.shape[1], layer.hidden_size))
    kept, outputs = [], []
    for x_t in x:
        state = functional.egru_cell(x_t, state, layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0,
                                     layer.bias_hh_l0, layer.threshold_l0, layer.surrogate).state
        state.c.retain_grad()
        kept.append(state.c)
        outputs.append(state.y)
    loss_of(torch.stack(outputs)).backward()
    return torch.stack([c.grad.norm(dim=-1).mean() if c.grad is not None else c.new_zeros(()) for c in kept])


@pytest.mark.parametrize("backend", ["reference", "event"])
def test_the_gradient_through_time_is_the_state_gradient_of_every_step(backend):
    torch.manual_seed(0)
    layer = egru.EGRU(3, 6, dtype=torch.float64, threshold_mean=0.1, backend=backend)
    x = torch.randn(12, 5, 3, dtype=torch.float64)
    target = torch.randn(5, 6, dtype=torch.float64)
    loss_of = lambda out: ((functional.output_trace(out)[-1] - target) ** 2).sum()  # noqa: E731
    for p in layer.parameters():
        p.grad = torch.full_like(p, 7.0)
    norms = diagnostics.gradient_through_time(layer, x, loss_of)
    assert norms.shape == (12, 1)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in layer.parameters())  # left alone
    for p in layer.parameters():
        p.grad = None
    expected = state_gradients_by_hand(layer, x, loss_of)
    torch.testing.assert_close(norms[:, 0], expected, rtol=1e-10, atol=1e-14)
    assert norms[-1, 0] == 0 and (norms[:-1, 0] > 0).all()  # the last state reaches no output


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM])
def test_the_gradient_through_time_of_torch_layers(rnn):
    torch.manual_seed(0)
    layer = rnn(3, 5, num_layers=2)
    x = torch.randn(8, 4, 3)
    norms = diagnostics.gradient_through_time(layer, x, lambda out: out[-1].pow(2).sum())
    assert norms.shape == (8, 2) and (norms[:-1] > 0).all()


def test_the_gradient_through_time_wants_a_sequence():
    with pytest.raises(ValueError, match=r"\(T, B, I\)"):
        diagnostics.gradient_through_time(nn.GRU(3, 5), torch.randn(4, 3), lambda out: out.sum())


# --- the authors' choices ---------------------------------------------------------------------

def test_evnn_init_draws_xavier_normal_weights_and_zero_biases():
    torch.manual_seed(0)
    layer = egru.EGRU(40, 200, num_layers=2, init="evnn")
    for name, p in layer.named_parameters():
        if name.startswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif name.startswith("weight"):
            fan_out, fan_in = p.shape
            assert p.std().item() == pytest.approx(math.sqrt(2 / (fan_in + fan_out)), rel=0.03), name
    x = torch.zeros(5, 3, 40)  # blank input: no unit leaves ĉ = 0, none fires
    output, state = layer(x)
    assert torch.count_nonzero(output) == 0 and torch.count_nonzero(state.c) == 0


def test_the_default_init_is_unchanged_by_the_option():
    torch.manual_seed(3)
    a = egru.EGRU(4, 8)
    torch.manual_seed(3)
    b = egru.EGRU(4, 8, init="gru")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match="init must be one of"):
        egru.EGRU(4, 8, init="xavier")
    with pytest.raises(ValueError, match="threshold_parametrization must be one of"):
        egru.EGRUCell(4, 8, threshold_parametrization="tanh")


@pytest.mark.parametrize("backend", ["reference", "event"])
def test_sigmoid_thresholds_are_trained_through_theta(backend):
    torch.manual_seed(0)
    projected = egru.EGRU(3, 6, num_layers=2, dtype=torch.float64, backend=backend)
    torch.manual_seed(0)
    sigmoid = egru.EGRU(3, 6, num_layers=2, dtype=torch.float64, backend=backend,
                        threshold_parametrization="sigmoid")
    # the same initial thresholds, so the same outputs
    torch.testing.assert_close(sigmoid.threshold_l1, projected.threshold_l1, rtol=0, atol=1e-12)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    out_p, out_s = projected(x)[0], sigmoid(x)[0]
    torch.testing.assert_close(out_s, out_p, rtol=0, atol=1e-12)
    out_p.sum().backward()
    out_s.sum().backward()
    theta = sigmoid.parametrizations.threshold_l1.original
    chain = projected.threshold_l1.grad * sigmoid.threshold_l1 * (1 - sigmoid.threshold_l1)  # dϑ/dθ = σ(1 − σ)
    torch.testing.assert_close(theta.grad, chain.detach(), rtol=1e-10, atol=1e-14)
    assert sigmoid.thresholds() == []  # nothing to project: σ keeps it in (0, 1)


def test_sigmoid_thresholds_survive_a_checkpoint_and_stay_in_range():
    torch.manual_seed(0)
    layer = egru.EGRU(3, 6, threshold_parametrization="sigmoid")
    optimizer = torch.optim.SGD(layer.parameters(), lr=100.0)
    egru.keep_thresholds_in_range(optimizer, layer)
    layer(torch.randn(5, 2, 3))[0].sum().backward()
    optimizer.step()
    theta = layer.parametrizations.threshold_l0.original
    assert (theta.abs() > 1).any()  # θ itself is not projected
    assert ((layer.threshold_l0 >= 0) & (layer.threshold_l0 <= 1)).all()
    copy = egru.EGRU(3, 6, threshold_parametrization="sigmoid")
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.threshold_l0, layer.threshold_l0)


def test_rtrl_refuses_a_parametrised_threshold():
    with pytest.raises(ValueError, match="must not be parametrised"):
        egru.rtrl.RTRL(egru.EGRUCell(3, 4, threshold_parametrization="sigmoid"))


# --- in the recipes' logs ---------------------------------------------------------------------

def pixel_sequences(data_dir=None, download=False):
    """Sequential-MNIST-shaped: 24 training and 8 test sequences of 784 one-pixel steps."""
    from egru.recipes import classify

    generator = torch.Generator().manual_seed(0)
    split = lambda n: (torch.rand(n, 784, 1, generator=generator), torch.randint(10, (n,), generator=generator))  # noqa: E731
    return classify.Sequences({"train": split(24), "test": split(8)}, num_classes=10)


def test_a_classification_run_logs_health_gradients_and_draws_them(tmp_path, monkeypatch):
    import json

    from egru.recipes import classify

    monkeypatch.setitem(classify.TASKS, "smnist", pixel_sequences)
    cfg = classify.ClassifyConfig(task="smnist", pixels_per_step=28, hidden_size=8, batch_size=8, epochs=1,
                                  valid_size=8, eval_every=1, log_every=1, max_steps=2, neurobench=0)
    classify.train_and_evaluate(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert len(train) == 2 and len(valid) == 2
    for r in train:
        layer = r["layers"]["layer0"]
        assert 0 <= layer["silent_units"] <= 1 and 0 <= layer["saturated_units"] <= 1
        assert layer["threshold_q10"] <= layer["threshold_q50"] <= layer["threshold_q90"]
        assert set(r["grad_norms"]) >= {"layers.0.weight_hh_l0", "readout.weight", "total"}
    for r in valid:  # 784 pixels, 28 per step: 28 steps
        curve = r["gradient_through_time"]["layer0"]
        assert len(curve) == 28 and curve[-1] == 0 and all(v > 0 for v in curve[:-1])
    assert (tmp_path / "health.png").exists() and (tmp_path / "gradient.png").exists()


def test_pixels_per_step_needs_a_pixel_task_and_a_divisor():
    from egru.recipes import classify

    with pytest.raises(ValueError, match="pixels_per_step must be a divisor of 784"):
        classify.ClassifyConfig(task="smnist", pixels_per_step=5)
    with pytest.raises(ValueError, match="with task smnist or psmnist"):
        classify.ClassifyConfig(task="mnist1d", pixels_per_step=4)
