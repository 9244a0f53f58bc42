"""The one place that chooses: backend names, the tuning knobs, and the ``auto`` policy's
choices (read from the MACs the kernels report: a dense forward step counts 3H·H)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import egru
from egru import backends
from egru.kernels import event
from egru.state import EGRUState
from egru.surrogate import Triangle

pytest.importorskip("numba")


def test_resolve_names_and_instances():
    assert backends.available() == ["auto", "event", "reference", "triton"]
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.resolve("fast")
    a, b = backends.resolve("auto"), backends.resolve("auto")
    assert a is not b  # each layer module remembers its own activity
    tuned = backends.Event(backends.Tuning(thread_mode="serial"))
    assert backends.resolve(tuned) is tuned
    assert egru.EGRU(3, 4, backend=tuned).backend == "event"


def test_tuning_is_frozen_and_checked():
    tuning = backends.Tuning()
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuning.auto_activity_limit = 0.1
    with pytest.raises(ValueError, match="thread_mode"):
        backends.Tuning(thread_mode="fast")


@pytest.mark.parametrize("min_batch,limit", [(16, 0.75), (4, 0.5), (1, 0.0), (64, 0.2)])
def test_prefers_dense_follows_the_knobs(min_batch, limit):
    auto = backends.Auto(backends.Tuning(auto_dense_min_batch=min_batch, auto_activity_limit=limit))
    for batch in (1, 4, 8, 16, 32, 64):
        for activity in (0.0, 0.1, 0.2, 0.5, 0.75, 1.0):
            expected = batch >= min_batch and activity >= limit
            assert auto.prefers_dense(batch, activity) == expected, (batch, activity)


def _layer(B, fire_all, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T, I, H = 4, 3, 5
    x = torch.randn(T, B, I, dtype=torch.float64, generator=gen)
    state = EGRUState(torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, H, dtype=torch.float64))
    w_ih = torch.randn(3 * H, I, dtype=torch.float64, generator=gen)
    w_hh = torch.randn(3 * H, H, dtype=torch.float64, generator=gen)
    theta = torch.full((H,), -1.0 if fire_all else 0.3, dtype=torch.float64)
    return (x, state, w_ih, w_hh, None, None, theta, Triangle()), T * B * 3 * H * H


@pytest.mark.parametrize("limit,min_batch,B,dense_second",
                         [(0.75, 16, 16, True), (0.75, 16, 8, False), (1.5, 1, 16, False),
                          (0.5, 2, 2, True)])
def test_auto_chooses_from_the_previous_call(limit, min_batch, B, dense_second):
    """The first call of a layer is event-driven; the next one is dense where the knobs say the
    activity it had (here: every unit fires) and the batch call for it."""
    auto = backends.Auto(backends.Tuning(auto_dense_min_batch=min_batch, auto_activity_limit=limit))
    args, dense_macs = _layer(B, fire_all=True)
    counters = event.runtime.counters
    counters.reset()
    out = auto(*args)
    assert auto.activity(args[6]) == 1.0
    first = counters.recurrent
    assert first == 3 * 5 * int(out.e[:-1].sum())  # event-driven: 3H per event of t-1
    counters.reset()
    auto(*args)
    assert (counters.recurrent == dense_macs) == dense_second
    assert counters.recurrent == (dense_macs if dense_second else first)


def test_auto_forgets_with_the_layer_and_pickles_without_memory():
    model = egru.EGRU(3, 4, num_layers=2)
    model(torch.randn(5, 2, 3))
    assert len(model._layer_fn._activity) == 2
    copy = pickle.loads(pickle.dumps(model))
    assert copy._layer_fn._activity == {} and copy._layer_fn.tuning == model._layer_fn.tuning
    torch.testing.assert_close(copy(torch.ones(5, 2, 3))[0], model(torch.ones(5, 2, 3))[0])


def test_auto_memory_ends_with_the_parameter():
    auto = backends.Auto()
    args, _ = _layer(2, fire_all=False)
    auto(*args)
    assert len(auto._activity) == 1
    theta = args[6]
    del args
    del theta
    assert auto._activity == {}
