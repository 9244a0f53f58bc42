"""The event-driven backend against the reference: outputs, final state, events, every gradient.

Shapes are tiny so that the suite also runs quickly with ``NUMBA_DISABLE_JIT=1``.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import egru
from egru import backends, functional
from egru.kernels import event
from egru.state import EGRUState
from egru.surrogate import FastSigmoid, Triangle

numba = pytest.importorskip("numba")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# name -> (module kwargs, run options)
CONFIGS = {
    "I3-H5-1layer": (dict(input_size=3, hidden_size=5), {}),
    "I4-H6-2layers-bidir": (dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True), {}),
    "I3-H5-packed": (dict(input_size=3, hidden_size=5), dict(lengths=[5, 2, 4])),
    "I3-H4-packed-2layers-bidir": (
        dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True), dict(lengths=[3, 5, 1])),
    "I3-H5-given-state": (dict(input_size=3, hidden_size=5, num_layers=2), dict(state=True)),
    "I3-H5-zoneout-train": (dict(input_size=3, hidden_size=5, zoneout=0.3), dict(train=True)),
    "I3-H5-zoneout-eval": (dict(input_size=3, hidden_size=5, zoneout=0.3), {}),
    "I3-H5-dropconnect-dropout": (
        dict(input_size=3, hidden_size=5, num_layers=2, dropconnect=0.4, dropout=0.2), dict(train=True)),
    "I3-H5-no-bias-surrogate-k2": (
        dict(input_size=3, hidden_size=5, bias=False, dampening_factor=1.3, pseudo_derivative_support=2.0), {}),
    "I3-H6-batch6-parallel-packed-zoneout": (
        dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=True, zoneout=0.2),
        dict(batch=6, lengths=[5, 1, 3, 5, 2, 4], train=True, state=True)),
}


# modes of the event layer's kernels, forced through the backend's tuning thresholds
# name -> egru.backends.Tuning
TUNINGS = {
    # event-driven weight gradients, reading the gate gradients in tiles of one row
    "event-dw": dataclasses.replace(backends.Tuning(), sparse_weight_grad_density=2.0,
                                    weight_grad_tile_bytes=1),
    # dense weight gradients
    "dense-dw": dataclasses.replace(backends.Tuning(), sparse_weight_grad_density=0.0),
    # backend "auto" choosing the dense forward product always
    "auto-dense": dataclasses.replace(backends.Tuning(), auto_activity_limit=-1.0,
                                      auto_dense_min_batch=0),
}


def layer_fn(backend, mode="event-dw"):
    """A backend with the tuning of ``mode`` (``"dense"``: the event layer with the dense
    recurrent forward product, as "auto" uses it)."""
    if backend == "dense":
        return backends.Auto(dataclasses.replace(TUNINGS[mode], auto_activity_limit=-1.0,
                                                 auto_dense_min_batch=0))
    return backends.resolve(backend, TUNINGS[mode])


def run_module(backend, module_kwargs, options, dtype):
    """One forward and backward pass; returns (output, final state, records, gradients)."""
    torch.manual_seed(0)
    model = egru.EGRU(**module_kwargs, backend=backend, dtype=dtype)
    with torch.no_grad():  # thresholds spread over the candidates' range: some units fire
        for threshold in model.thresholds():
            threshold.uniform_(-0.1, 0.4)
    return forward_backward(model, options, dtype)


def forward_backward(model, options, dtype):
    """One forward and backward pass of ``model`` on data drawn from fixed seeds: (output,
    final state, records, gradients of the input, the initial state and every parameter)."""
    model.train(options.get("train", False))
    T, B = 5, options.get("batch", 3)
    D = 2 if model.bidirectional else 1
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, model.input_size, dtype=dtype, generator=gen).requires_grad_()
    hx = None
    if options.get("state"):
        shape = (model.num_layers * D, B, model.hidden_size)
        y0 = torch.randn(shape, dtype=dtype, generator=gen) * (torch.rand(shape, generator=gen) < 0.5)
        hx = (y0.requires_grad_(), torch.randn(shape, dtype=dtype, generator=gen).requires_grad_())
    lengths = options.get("lengths")
    torch.manual_seed(2)  # the same DropConnect, zoneout and dropout masks for every backend
    if lengths is not None:
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        out, state, records = model(packed, hx, record=True)
        out = pad_packed_sequence(out)[0]
    else:
        out, state, records = model(x, hx, record=True)
    # a loss that reaches every output: sequence, final state, events and candidate states
    weights = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, dtype=dtype, generator=weights)).sum()
    loss = loss + (state.y * torch.randn(state.y.shape, dtype=dtype, generator=weights)).sum()
    loss = loss + (state.c * torch.randn(state.c.shape, dtype=dtype, generator=weights)).sum()
    for r in records:
        valid = r.valid.unsqueeze(-1)
        loss = loss + functional.activity_penalty(r.e, target=0.1)
        loss = loss + (r.c_hat * valid * torch.randn(r.c_hat.shape, dtype=dtype, generator=weights)).sum()
    inputs = [x] + (list(hx) if hx is not None else []) + list(model.parameters())
    grads = torch.autograd.grad(loss, inputs)
    names = ["x"] + (["y0", "c0"] if hx is not None else []) + [n for n, _ in model.named_parameters()]
    return out, state, records, dict(zip(names, grads))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend,mode", [("event", "event-dw"), ("event", "dense-dw"),
                                          ("auto", "event-dw"), ("auto", "auto-dense")])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_module_parity(name, backend, mode, dtype):
    module_kwargs, options = CONFIGS[name]
    ref = run_module("reference", module_kwargs, options, dtype)
    got = run_module(layer_fn(backend, mode), module_kwargs, options, dtype)
    assert any(float(r.e.detach().mean()) > 0 for r in ref[2]), "configuration without events"
    assert_same(got, ref, dtype)


def assert_same(got, ref, dtype):
    """Outputs, final state, identical events, candidate states at valid steps, MACs and every
    gradient of two :func:`forward_backward` results agree."""
    tol = TOL[dtype]
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1].y, ref[1].y, **tol)
    torch.testing.assert_close(got[1].c, ref[1].c, **tol)
    for r_got, r_ref in zip(got[2], ref[2]):
        assert torch.equal(r_got.e, r_ref.e), "events differ"
        valid = r_ref.valid.unsqueeze(-1)
        torch.testing.assert_close(r_got.c_hat * valid, r_ref.c_hat * valid, **tol)
        assert torch.equal(r_got.recurrent_active, r_ref.recurrent_active)
        assert torch.equal(r_got.forward_macs, r_ref.forward_macs)
    assert got[3].keys() == ref[3].keys()
    for key in ref[3]:
        torch.testing.assert_close(got[3][key], ref[3][key], **tol, msg=lambda m: f"d{key}: {m}")


def random_layer(T, B, I, H, dtype, seed, y0_density=0.5):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    y0 = r(B, H) * (torch.rand(B, H, generator=gen) < y0_density)
    tensors = [r(T, B, I), y0, r(B, H), r(3 * H, I) * 0.6, r(3 * H, H) * 0.6, r(3 * H) * 0.2,
               r(3 * H) * 0.2, torch.rand(H, dtype=dtype, generator=gen) * 0.4]
    return [t.requires_grad_() for t in tensors]


def layer_with_grads(fn, tensors, surrogate, **kwargs):
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta = tensors
    out = fn(x, EGRUState(y0, c0), w_ih, w_hh, b_ih, b_hh, theta, surrogate, **kwargs)
    gen = torch.Generator().manual_seed(7)
    loss = sum((a * torch.randn(a.shape, dtype=a.dtype, generator=gen)).sum()
               for a in (out.y, out.state.y, out.state.c, out.e))
    return out, torch.autograd.grad(loss, tensors)


@settings(max_examples=40, deadline=None, derandomize=True)  # the same examples on every run
@given(T=st.integers(1, 5), B=st.integers(1, 5), I=st.integers(1, 4), H=st.integers(1, 6),
       reverse=st.booleans(), packed=st.booleans(), zoneout=st.sampled_from(["none", "mask", "eval"]),
       mode=st.sampled_from(["event-dw", "dense-dw"]),
       forward=st.sampled_from(["event", "event-serial", "dense"]),
       seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_layer_parity_random(T, B, I, H, reverse, packed, zoneout, mode, forward, seed, dtype):
    """The backend function itself on random shapes and options (the cell computes in the
    data's float type)."""
    tensors = random_layer(T, B, I, H, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    kwargs = dict(reverse=reverse)
    if packed:
        kwargs["lengths"] = torch.randint(1, T + 1, (B,), generator=gen)
    if zoneout == "mask":
        kwargs.update(zoneout_p=0.3, zoneout_mask=(torch.rand(T, B, H, generator=gen) > 0.3).to(dtype))
    elif zoneout == "eval":
        kwargs.update(zoneout_p=0.3)
    surrogate = Triangle(0.7, 1.5)
    ref, ref_grads = layer_with_grads(functional.egru_layer, tensors, surrogate, **kwargs)
    layer = layer_fn("dense" if forward == "dense" else "event", mode)
    # "event": whole samples per thread (one sample serially); "event-serial": the forward
    # kernel's serial twin for every batch size, as with a single numba thread
    threads = numba.get_num_threads()
    if forward == "event-serial":
        numba.set_num_threads(1)
    try:
        got, got_grads = layer_with_grads(layer, tensors, surrogate, **kwargs)
    finally:
        numba.set_num_threads(threads)
    assert torch.equal(got.e, ref.e)
    tol = TOL[dtype]
    for a, b in [(got.y, ref.y), (got.state.y, ref.state.y), (got.state.c, ref.state.c)]:
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def test_sparse_input_path_and_mac_counter():
    """Work follows events: the recurrent MACs done are 3H·Σ|A_{t-1}|, as the record counts."""
    torch.manual_seed(0)
    H, I = 8, 4
    model = egru.EGRU(I, H, num_layers=2, backend="event", dtype=torch.float64)
    with torch.no_grad():
        for threshold in model.thresholds():
            threshold.fill_(0.25)  # sparse enough that layer 1 takes the event-driven input path
    x = torch.randn(6, 3, I, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), enforce_sorted=False)
    event.runtime.counters.reset()
    _, _, records = model(packed, record=True)
    stats = [egru.layer_stats(r) for r in records]
    assert 0 < stats[1].activity and stats[0].activity < backends.Tuning().sparse_input_density
    dense_input = 3 * H * I * stats[0].steps  # the first layer's input product is dense
    assert event.runtime.counters.recurrent + event.runtime.counters.input == sum(s.effective_macs for s in stats) - dense_input
    assert event.runtime.counters.input == 3 * H * int((records[1].input_active * records[1].valid).sum())
    assert event.runtime.counters.recurrent < 3 * H * H * (stats[0].steps + stats[1].steps)


def test_inference_without_a_graph_equals_the_reference():
    """With nothing to differentiate (no_grad, or no tensor that needs a gradient) the forward
    runs outside autograd: the same outputs, state and events as the reference."""
    torch.manual_seed(3)
    kw = dict(num_layers=2, bidirectional=True, dtype=torch.float64, zoneout=0.2)
    reference = egru.EGRU(4, 6, backend="reference", **kw).eval()
    with torch.no_grad():
        for threshold in reference.thresholds():
            threshold.uniform_(0.0, 0.4)
    layer = egru.EGRU(4, 6, backend="event", **kw).eval()
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([7, 3, 5]), enforce_sorted=False)
    expected = reference(packed, record=True)
    with torch.no_grad():
        under_no_grad = layer(packed, record=True)
    layer.requires_grad_(False)
    without_grads = layer(packed, record=True)
    for out, state, records in (under_no_grad, without_grads):
        assert not out.data.requires_grad
        torch.testing.assert_close(out.data, expected[0].data, **TOL[torch.float64])
        for a, b in zip(state, expected[1]):
            torch.testing.assert_close(a, b, **TOL[torch.float64])
        for got, want in zip(records, expected[2]):
            assert torch.equal(got.e, want.e.detach())


def test_backward_reads_each_block_of_units_for_the_samples_that_need_it():
    """Backward cross-unit products only for units that fired or lie in the surrogate's support,
    four units at a time for every sample that has one of the four in G_{t-1} (all samples at
    the first step, for dy_0), and the recurrent weight gradient from the units that fired;
    the MACs done say so."""
    T, B, I, H = 6, 9, 3, 10  # H = 10: two blocks of four and one of two units
    tensors = random_layer(T, B, I, H, torch.float64, seed=5, y0_density=0.0)
    surrogate = Triangle(0.7, 4.0)  # a narrow support: few units inside it
    event.runtime.counters.reset()
    # the event-driven weight gradient at any activity
    out, grads = layer_with_grads(layer_fn("event", "event-dw"), tensors, surrogate)
    ref, ref_grads = layer_with_grads(functional.egru_layer, tensors, surrogate)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    with torch.no_grad():
        in_g = (out.e != 0) | ((out.c_hat - tensors[7]).abs() < surrogate.support)  # (T, B, H)
    expected = 3 * H * H * B  # the first step
    for lo in range(0, H, 4):
        block = in_g[:-1, :, lo:lo + 4]
        expected += 3 * H * block.shape[-1] * int(block.any(-1).sum())
    assert 0 < event.runtime.counters.backward_recurrent - 3 * H * H * B < 3 * H * H * B * (T - 1)
    assert event.runtime.counters.backward_recurrent == expected
    assert event.runtime.counters.backward_weight == 3 * H * int((out.e[:-1] != 0).sum())  # y_0 = 0


def test_wide_support_takes_every_unit_and_auto_the_dense_forward():
    """With every unit firing, all are in G: W_hᵀδ does the dense product's MACs. "auto" with
    many samples at high activity computes the forward product densely too."""
    T, B, I, H = 5, 16, 3, 6
    tensors = random_layer(T, B, I, H, torch.float64, seed=8)
    with torch.no_grad():
        tensors[7].fill_(-1.0)  # every unit fires at every step
    event.runtime.counters.reset()
    ref, ref_grads = layer_with_grads(functional.egru_layer, tensors, Triangle())
    got, got_grads = layer_with_grads(backends.Event(), tensors, Triangle())
    assert event.runtime.counters.backward_recurrent == 3 * H * H * T * B  # every unit
    fired = int((got.y[:-1] != 0).sum()) + int((tensors[1] != 0).sum())  # A_{t-1}, y_0 included
    assert event.runtime.counters.recurrent == 3 * H * fired
    auto_layer = backends.Auto()
    layer_with_grads(auto_layer, tensors, Triangle())  # first call: event-driven
    event.runtime.counters.reset()
    auto, auto_grads = layer_with_grads(auto_layer, tensors, Triangle())
    assert event.runtime.counters.recurrent == 3 * H * H * T * B  # dense forward
    for a, b in zip(auto_grads + got_grads, ref_grads + ref_grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    torch.testing.assert_close(auto.y, ref.y, **TOL[torch.float64])


def test_weights_changed_through_data_are_seen():
    """Writes through ``.data`` (as gradcheck perturbs) do not bump ``_version``; the cached
    transpose of W_hh must not go stale."""
    tensors = random_layer(4, 2, 3, 5, torch.float64, seed=9)
    state = EGRUState(*tensors[1:3])
    backends.Event()(tensors[0], state, *tensors[3:], Triangle())
    tensors[4].data[1, 2] += 0.5
    got = backends.Event()(tensors[0], state, *tensors[3:], Triangle())
    ref = functional.egru_layer(tensors[0], state, *tensors[3:], Triangle())
    torch.testing.assert_close(got.y, ref.y, **TOL[torch.float64])


def test_module_weights_are_read_transposed_without_a_copy():
    """EGRU stores its weights column by column, so the kernels read ``w.t()`` in place (no
    transposed copy to keep or to check), in every dtype and after a ``state_dict`` load; a
    row-major weight (the functional tests' random tensors) goes through the cache instead."""
    layer = egru.EGRU(3, 4, num_layers=2, bidirectional=True)
    layer.load_state_dict(egru.EGRU(3, 4, num_layers=2, bidirectional=True).state_dict())
    layer.double()
    for name, w in layer.named_parameters():
        if name.startswith("weight"):
            assert event.runtime.transposed(w).data_ptr() == w.data_ptr(), name
    row_major = torch.randn(12, 4, dtype=torch.float64)
    assert event.runtime.transposed(row_major).data_ptr() != row_major.data_ptr()


def test_padded_steps_emit_nothing_and_hold_state():
    tensors = random_layer(4, 2, 3, 5, torch.float64, seed=5)
    lengths = torch.tensor([4, 2])
    out, _ = layer_with_grads(backends.Event(), tensors, Triangle(), lengths=lengths)
    assert not out.y[2:, 1].any() and not out.e[2:, 1].any()
    ref = functional.egru_layer(*tensors[:1], EGRUState(*tensors[1:3]), *tensors[3:], Triangle(), lengths=lengths)
    torch.testing.assert_close(out.state.c, ref.state.c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["event", "auto"])
def test_double_backward_is_an_error_not_a_dropped_term(backend):
    """A gradient penalty through the event kernels raises where the graph is requested; the
    penalty's term is never silently dropped (it used to give ``g`` without a graph)."""
    torch.manual_seed(0)
    model = egru.EGRU(4, 8, num_layers=2, backend=backend)
    x = torch.rand(5, 2, 4, requires_grad=True)
    out = model(x)[0]
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_gradient_penalty_works_on_the_reference_backend():
    torch.manual_seed(0)
    model = egru.EGRU(4, 8, num_layers=2, backend="reference", dtype=torch.float64)
    x = torch.rand(5, 2, 4, dtype=torch.float64, requires_grad=True)
    out = model(x)[0]
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert g.requires_grad
    (out.sum() + (g ** 2).sum()).backward()
    assert torch.isfinite(model.weight_ih_l0.grad).all()


def test_unsupported_surrogate_falls_back_to_reference(recwarn):
    model = egru.EGRU(3, 4, backend="event", surrogate=FastSigmoid(), dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="FastSigmoid"):
        out = model(x)[0]
    model.backend, model._layer_fn = "reference", backends.Reference()
    torch.testing.assert_close(out, model(x)[0])
    auto = egru.EGRU(3, 4, backend="auto", surrogate=FastSigmoid(), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto(x)  # auto chooses silently


_WITHOUT_NUMBA = """
import sys, warnings
sys.modules["numba"] = None  # `import numba` now raises ImportError
import torch, egru
torch.manual_seed(0)
model = egru.EGRU(3, 4, backend="event", dtype=torch.float64)
x = torch.randn(4, 2, 3, dtype=torch.float64)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = model(x)[0]
    model(x)
assert [str(w.message) for w in caught] == [
    "egru backend 'event': numba is not installed; using the reference backend instead"], caught
reference = egru.EGRU(3, 4, backend="reference", dtype=torch.float64)
reference.load_state_dict(model.state_dict())
torch.testing.assert_close(out, reference(x)[0])
print("ok")
"""


def test_missing_numba_warns_once_and_uses_reference():
    """In a fresh process where numba cannot be imported."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _WITHOUT_NUMBA], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_every_cached_kernel_has_a_cache_file_of_its_own():
    """numba's on-disk cache keys a function by its name and first line, not by its compile
    options: two kernels compiled from one Python function under one name (the forward kernel
    and its serial twin) would serve each other's cached code, and the parallel kernel ran on
    one thread after the serial one had been cached first."""
    kernels = event.runtime.kernels()
    cached = [k for k in vars(kernels).values()
              if getattr(getattr(k, "_cache", None), "_cache_file", None) is not None]
    if not cached:
        pytest.skip("the kernels are not compiled (NUMBA_DISABLE_JIT) or not cached")
    files = [k._cache._cache_file._index_name for k in cached]
    assert kernels.layer_forward_serial in cached and kernels.layer_forward in cached
    assert len(set(files)) == len(files)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """numba refuses ``cache=True`` when it finds no writable cache directory; compile anyway."""
    kernels = importlib.import_module(event._NUMBA_MODULE)
    real_njit = numba.njit

    def njit(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real_njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit)

    @kernels._jit()
    def add_one(a):
        return a + 1

    assert add_one(1) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cell_exp_is_accurate_in_the_data_type(dtype):
    """The cell's arithmetic-only ``exp``, in each float type, within a few ulp of the exact
    value (float64 ``exp`` rounded to the type) over the range the sigmoid and tanh use."""
    kernels = event.runtime.kernels()

    @numba.njit
    def exp_all(x, out):
        for i in range(x.shape[0]):
            out[i] = kernels._exp(x[i])

    lo, hi = (-87.0, 88.0) if dtype == np.float32 else (-700.0, 700.0)
    x = np.concatenate([np.linspace(lo, hi, 200_001), np.linspace(-1, 1, 20_001)]).astype(dtype)
    got = np.empty_like(x)
    exp_all(x, got)
    exact = np.exp(x.astype(np.longdouble))
    ulps = np.abs(got.astype(np.longdouble) - exact) / np.spacing(exact.astype(dtype)).astype(np.longdouble)
    assert ulps.max() <= 3, f"{np.dtype(dtype).name}: {float(ulps.max()):.2f} ulp at x = {x[ulps.argmax()]}"


# --- non-finite values, autocast, torch.func, threads ------------------------------------------

def _poison(model, where, x, state):
    """Put one NaN or infinity into the input, the state or a parameter (in place)."""
    target, value = where.rsplit(" ", 1)
    value = float(value)
    with torch.no_grad():
        if target == "x":
            x[1, 0, 0] = value
        elif target in ("y0", "c0"):
            state[0 if target == "y0" else 1][0, 1, 3] = value
        else:  # a parameter's name
            parameter = getattr(model, target)
            parameter[(2,) * parameter.dim()] = value


NON_FINITE = ["x nan", "x inf", "x -inf", "y0 nan", "c0 nan", "c0 -inf", "threshold_l0 nan",
              "threshold_l0 inf", "threshold_l0 -inf", "weight_hh_l0 nan", "weight_hh_l1 inf",
              "weight_ih_l1 nan", "bias_hh_l1 nan"]


def _run_poisoned(backend, where):
    torch.manual_seed(0)
    model = egru.EGRU(4, 8, 2, threshold_mean=0.05, backend=backend, dtype=torch.float64)
    x = torch.rand(5, 2, 4, dtype=torch.float64)
    state = (torch.zeros(2, 2, 8, dtype=torch.float64), torch.zeros(2, 2, 8, dtype=torch.float64))
    _poison(model, where, x, state)
    x.requires_grad_()
    out, (y_n, c_n) = model(x, state)
    (out.sum() + c_n.sum()).backward()
    return (out, y_n, c_n), [p.grad for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("backend", ["event", "auto"])
@pytest.mark.parametrize("where", NON_FINITE)
def test_nan_and_inf_propagate_as_in_the_reference(backend, where):
    """A NaN or infinity anywhere reaches the same outputs, states and gradients as in the
    reference (the event-driven products skip silent units, which must not hide it)."""
    ref, ref_grads = _run_poisoned("reference", where)
    got, got_grads = _run_poisoned(backend, where)
    assert not all(torch.isfinite(a).all() for a in (*ref, *ref_grads))  # the case poisons
    for a, b in zip(got, ref):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, equal_nan=True)
    for a, b in zip(got_grads, ref_grads):
        assert torch.equal(a.isfinite(), b.isfinite())


@pytest.mark.parametrize("backend", ["event", "auto"])
def test_runs_under_cpu_autocast(backend):
    """Under autocast the event kernels compute in the weights' type instead of crashing on
    bfloat16 products; the result is the float32 computation's."""
    torch.manual_seed(0)
    model = egru.EGRU(4, 8, 2, backend=backend)
    x = torch.rand(6, 3, 4)
    expected = model(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, (y_n, c_n) = model(x)
        out.sum().backward()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert model.weight_hh_l0.grad is not None


@pytest.mark.parametrize("backend", ["reference", "event", "auto"])
def test_torch_func_grad_and_vmap(backend):
    """``torch.func.grad`` and ``vmap`` work on every backend (the event kernels hand over to
    the reference inside a transform) and agree with plain autograd."""
    torch.manual_seed(0)
    model = egru.EGRU(3, 5, 2, backend=backend, dtype=torch.float64)
    params = dict(model.named_parameters())
    x = torch.rand(4, 2, 3, dtype=torch.float64)

    def loss(p, x):
        return torch.func.functional_call(model, p, (x,))[0].pow(2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "event" says it hands over
        grads = torch.func.grad(loss)(params, x)
        per_sample = torch.func.vmap(loss, in_dims=(None, 1))(params, x.unsqueeze(2))
    expected = torch.autograd.grad(loss(params, x), list(params.values()))
    for name, g in zip(params, expected):
        torch.testing.assert_close(grads[name], g, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(per_sample, torch.stack([loss(params, x[:, b:b + 1]) for b in range(2)]))


_THREADS_SCRIPT = """
import threading, torch, egru
torch.manual_seed(0)
model = egru.EGRU(16, 64, num_layers=2, backend="event")
x = torch.rand(8, 4, 16) * (torch.rand(8, 4, 16) < 0.3)
expected = model(x)[0].detach()
failures = []

def work():
    for _ in range(20):
        out = model(x)[0]
        out.sum().backward()
        if not torch.equal(out.detach(), expected):
            failures.append("different output")

threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
import numba
print(numba.threading_layer(), "failures", len(failures))
assert not failures
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_several_python_threads_share_a_layer(layer):
    """Two Python threads calling one layer at once: on numba's ``workqueue`` threading layer
    (not thread-safe: it used to abort the process) calls are serialised; elsewhere they run
    concurrently. In a fresh process, since the threading layer is chosen once per process."""
    import os
    import subprocess

    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "failures 0" in proc.stdout
    if layer != "default":
        assert proc.stdout.startswith(layer)



_TORCH_THREADS_SCRIPT = """
import torch, egru
torch.set_num_threads(1)
model = egru.EGRU(3, 8, backend="event")
model(torch.rand(5, 4, 3))  # 4 samples: the parallel forward kernel, whose call starts numba's threads
import numba
print("torch", torch.get_num_threads(), "numba", numba.get_num_threads(), numba.threading_layer())
"""


def test_starting_numba_threads_keeps_torch_thread_count():
    """numba's OpenMP layer sets the OpenMP runtime's thread count, which torch shares, as its
    threads start: torch's operations must keep the count the process gave them. In a fresh
    process, since numba's threads start once per process."""
    import os
    import subprocess

    env = dict(os.environ, NUMBA_NUM_THREADS="2")
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", _TORCH_THREADS_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.startswith("torch 1 numba 2"), proc.stdout

def test_backward_in_either_thread_mode_equals_the_reference():
    """The serial twin of the backward kernel (and of the sparse weight gradients) is chosen
    by measurement at run time: both modes agree with the reference."""
    tensors = random_layer(5, 3, 4, 6, torch.float64, seed=11, y0_density=0.2)
    ref, ref_grads = layer_with_grads(functional.egru_layer, tensors, Triangle())
    for mode in ("parallel", "serial"):
        layer = backends.Event(backends.Tuning(thread_mode=mode))
        got, got_grads = layer_with_grads(layer, tensors, Triangle())
        for a, b in zip(got_grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
