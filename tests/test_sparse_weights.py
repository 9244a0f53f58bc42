"""Weight sparsity in the event kernels (SPEC §3): weights kept by rows of their nonzeros give
the reference backend's outputs, final state, events and every gradient, with and without
pruning masks; the MACs counted are the nonzeros touched; ``torch.compile`` and ``opcheck``
take the masks.

The compressed mode is forced through the backend's tuning (``sparse_weight_density`` above
1: every weight is compressed, even a dense one). Shapes are tiny, so that the suite also runs
quickly without the JIT.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import egru
from egru import backends, functional, prune
from egru.kernels import event
from egru.state import EGRUState
from egru.surrogate import Triangle
from test_event_backend import assert_same, forward_backward

pytest.importorskip("numba")

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5)}

# name -> egru.backends.Tuning forcing the compressed rows
TUNINGS = {
    # every product event-driven through compressed rows (a first layer's dense input too),
    # weight gradients at the masks' nonzeros read in tiles of one row
    "compressed-all": dataclasses.replace(
        backends.Tuning(), sparse_weight_density=2.0, sparse_input_density=2.0,
        sparse_weight_grad_density=2.0, weight_grad_tile_bytes=1),
    # compressed recurrent products, dense input products and weight gradients
    "compressed-recurrent": dataclasses.replace(
        backends.Tuning(), sparse_weight_density=2.0, sparse_input_density=0.0,
        sparse_weight_grad_density=0.0),
}

# name -> density of the masks' nonzeros; "empty-rows": half the presynaptic units (columns
# of W, rows of the kernels' w_t) send nothing, the others keep half their weights
DENSITIES = {"d0": 0.0, "d5": 0.05, "d50": 0.5, "d100": 1.0, "empty-rows": "empty-rows"}

# name -> (module kwargs, run options)
CONFIGS = {
    "I3-H5-1layer": (dict(input_size=3, hidden_size=5), {}),
    "I4-H6-2layers-bidir": (dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True), {}),
    "I3-H5-packed-2layers": (dict(input_size=3, hidden_size=5, num_layers=2),
                             dict(lengths=[5, 2, 4])),
    "I3-H6-batch6-packed-bidir-zoneout-state": (
        dict(input_size=3, hidden_size=6, num_layers=2, bidirectional=True, zoneout=0.3),
        dict(batch=6, lengths=[5, 1, 3, 5, 2, 4], train=True, state=True)),
}


def random_mask(shape, density, gen):
    if density == "empty-rows":
        keep = torch.rand(shape, generator=gen) < 0.5
        keep[:, torch.rand(shape[1], generator=gen) < 0.5] = False
        keep[:, 0] = False  # at least one
        return keep
    return torch.rand(shape, generator=gen) < density


def pruned_model(module_kwargs, density, dtype, seed=0):
    """An EGRU pruned through egru.prune with random masks of ``density`` on every weight."""
    torch.manual_seed(seed)
    model = egru.EGRU(**module_kwargs, dtype=dtype, backend="reference")
    with torch.no_grad():  # thresholds spread over the candidates' range: some units fire
        for threshold in model.thresholds():
            threshold.uniform_(-0.1, 0.4)
    gen = torch.Generator().manual_seed(seed + 1)
    names = [n for n, _ in model.named_parameters() if n.startswith("weight")]
    prune.set_masks(model, {n: random_mask(getattr(model, n).shape, density, gen) for n in names})
    return model


def run(model, backend, options, dtype):
    """One forward and backward pass with ``backend``: (output, final state, records,
    gradients of the input, the initial state and every parameter, by name)."""
    model._layer_fn, model.backend = backend, backend.name
    return forward_backward(model, options, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", list(TUNINGS))
@pytest.mark.parametrize("density", list(DENSITIES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_pruned_module_parity(name, density, mode, dtype):
    """Pruned through egru.prune: the masks reach the kernels, the gradients are those of the
    ``*_orig`` leaves."""
    module_kwargs, options = CONFIGS[name]
    model = pruned_model(module_kwargs, DENSITIES[density], dtype)
    assert any(n.endswith("_orig") for n, _ in model.named_parameters())
    ref = run(model, backends.Reference(), options, dtype)
    got = run(model, backends.Event(TUNINGS[mode]), options, dtype)
    assert_same(got, ref, dtype)
    if density == "d0":  # nothing reaches another unit: no gradient of a weight either
        assert all(not g.any() for k, g in got[3].items() if k.startswith("weight"))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("density", ["d5", "d50", "empty-rows"])
@pytest.mark.parametrize("name", ["I4-H6-2layers-bidir", "I3-H6-batch6-packed-bidir-zoneout-state"])
def test_sparse_weights_without_masks_parity(name, density, dtype):
    """Sparse plain weights (the masks baked in by ``prune.remove``): compressed rows by the
    weights' own nonzeros; the weight gradients are the true ones, nonzero at the zeros too."""
    module_kwargs, options = CONFIGS[name]
    model = prune.remove(pruned_model(module_kwargs, DENSITIES[density], dtype))
    assert not any(n.endswith("_orig") for n, _ in model.named_parameters())
    ref = run(model, backends.Reference(), options, dtype)
    got = run(model, backends.Event(TUNINGS["compressed-all"]), options, dtype)
    assert_same(got, ref, dtype)
    # (at 5 % hardly anything reaches another unit: the gradients are zero almost everywhere)
    names = [n for n, _ in model.named_parameters() if n.startswith("weight")]
    assert density == "d5" or any(got[3][n][getattr(model, n) == 0].any() for n in names), (
        "a zero weight's gradient is not zero in general")


def test_gradients_vanish_at_the_pruned_weights_only():
    """With a mask the op's weight gradient is exactly zero where the mask is, and equals the
    dense gradient where it is not (the op's own output, before autograd multiplies by the
    mask)."""
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    m_ih, m_hh = random_mask((3 * H, I), 0.3, gen), random_mask((3 * H, H), 0.3, gen)
    tensors = [r(T, B, I), r(B, H) * (torch.rand(B, H, generator=gen) < 0.5), r(B, H),
               r(3 * H, I) * m_ih, r(3 * H, H) * m_hh, r(3 * H) * 0.2, r(3 * H) * 0.2,
               torch.rand(H, dtype=torch.float64, generator=gen) * 0.3]
    tensors = [t.requires_grad_() for t in tensors]
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta = tensors

    def grads(fn, **masks):
        out = fn(x, EGRUState(y0, c0), w_ih, w_hh, b_ih, b_hh, theta, Triangle(), **masks)
        return torch.autograd.grad(out.y.sum() + out.state.c.sum(), (w_ih, w_hh))

    dense = grads(functional.egru_layer)
    for mode in TUNINGS:
        masked = grads(backends.Event(TUNINGS[mode]), weight_ih_mask=m_ih, weight_hh_mask=m_hh)
        for got, want, mask in zip(masked, dense, (m_ih, m_hh)):
            assert (got[~mask] == 0).all()
            torch.testing.assert_close(got[mask], want[mask], **TOL[torch.float64])
        assert (dense[1][~m_hh] != 0).any()  # the true gradient at a pruned weight


@pytest.mark.parametrize("B", [3, 8], ids=["gathered", "all-samples"])
def test_mac_counters_count_the_nonzeros_touched(B):
    """A hand count of every counter on a small layer: each event or input nonzero costs the
    nonzeros of its row of ``W_ᵀ``; ``W_hᵀδ`` the rows of the blocks' units for the samples
    that need them (for every sample from four such samples on: one AXPY along the samples);
    the weight gradient the mask's nonzeros of each event's row; the input's gradient every
    nonzero weight once per sample and step."""
    T, I, H = 4, 3, 5  # H = 5: a block of four units and one of one
    gen = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    m_ih, m_hh = random_mask((3 * H, I), 0.4, gen), random_mask((3 * H, H), "empty-rows", gen)
    x = r(T, B, I) * (torch.rand(T, B, I, generator=gen) < 0.6)
    y0 = r(B, H) * (torch.rand(B, H, generator=gen) < 0.5)
    tensors = [x, y0, r(B, H), r(3 * H, I) * m_ih, r(3 * H, H) * m_hh, r(3 * H) * 0.2,
               r(3 * H) * 0.2, torch.rand(H, dtype=torch.float64, generator=gen) * 0.3]
    tensors = [t.requires_grad_() for t in tensors]
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta = tensors
    surrogate = Triangle(0.7, 3.0)
    layer = backends.Event(TUNINGS["compressed-all"])
    counters = event.runtime.counters
    counters.reset()
    out = layer(x, EGRUState(y0, c0), w_ih, w_hh, b_ih, b_hh, theta, surrogate,
                weight_ih_mask=m_ih, weight_hh_mask=m_hh)
    forward = (counters.input, counters.recurrent)
    out.y.sum().backward()

    nnz_ih, nnz_hh = m_ih.sum(0), m_hh.sum(0)  # per presynaptic unit: its row of W_ᵀ
    y = out.y.detach()
    y_prev = torch.cat([y0.detach().unsqueeze(0), y[:-1]])  # (T, B, H)
    assert forward[0] == sum(int(nnz_ih[i]) for t in range(T) for b in range(B)
                             for i in range(I) if x[t, b, i] != 0)
    assert forward[1] == sum(int(nnz_hh[j]) for t in range(T) for b in range(B)
                             for j in range(H) if y_prev[t, b, j] != 0)
    c_hat = out.c_hat.detach()
    in_g = (c_hat > theta.detach()) | ((c_hat - theta.detach()).abs() < 1 / surrogate.pseudo_derivative_support)
    expected = 0
    for t in range(T):
        for lo in range(0, H, 4):
            units = range(lo, min(H, lo + 4))
            members = sum(1 for b in range(B) if t == 0 or in_g[t - 1, b, lo:lo + 4].any())
            least = event.runtime.kernels().ALL_SAMPLES_MIN
            samples = B if B >= least and members >= least else members
            expected += samples * sum(int(nnz_hh[j]) for j in units)
    assert counters.backward_recurrent == expected
    assert counters.backward_weight == forward[1]  # the same events, the same rows
    assert counters.backward_input == int(m_ih.sum()) * T * B  # dx: a row per nonzero weight
    assert 0 < forward[1] < 3 * H * int((y_prev != 0).sum())


def test_default_tuning_compresses_only_sparse_weights():
    """With the default threshold a pruned model at high sparsity runs compressed (fewer MACs
    than 3H per event), a dense one as before."""
    T, B, H = 6, 2, 16
    for density, compressed in ((0.05, True), (1.0, False)):
        model = pruned_model(dict(input_size=H, hidden_size=H), density, torch.float64)
        model._layer_fn, model.backend = backends.Event(), "event"
        x = torch.randn(T, B, H, dtype=torch.float64)
        event.runtime.counters.reset()
        with torch.no_grad():
            _, _, records = model(x, record=True)
        events = int(records[0].recurrent_active.sum())
        assert events > 0
        assert (event.runtime.counters.recurrent < 3 * H * events) == compressed


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no-grad"])
def test_changed_masks_and_weights_are_seen(grad):
    """The pattern of a mask is kept per version of the mask buffer, and without gradients the
    compressed values per version of the masked weight: pruning further (an in-place copy into
    the buffer) and an in-place change of ``_orig`` are seen by the next call."""
    model = pruned_model(dict(input_size=3, hidden_size=5), 0.5, torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    layer = backends.Event(TUNINGS["compressed-all"])
    with torch.set_grad_enabled(grad):
        for change in ("prune 0.6", "scale", "prune 0.9", "scale"):
            if change == "scale":
                with torch.no_grad():
                    model.weight_hh_l0_orig.mul_(1.5)
                    model.weight_ih_l0_orig.mul_(0.5)
            else:
                prune.magnitude(model, float(change.split()[1]))
            model._layer_fn, model.backend = layer, "event"
            got = model(x)[0]
            model._layer_fn, model.backend = backends.Reference(), "reference"
            torch.testing.assert_close(got, model(x)[0], **TOL[torch.float64])


def test_compiled_pruned_model_equals_eager():
    torch._dynamo.reset()
    model = pruned_model(dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True,
                              zoneout=0.2), 0.3, torch.float64).eval()
    model._layer_fn, model.backend = backends.Event(TUNINGS["compressed-all"]), "event"
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)

    def loss_and_grads(fn):
        out, (y_n, c_n) = fn(x)
        loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum() + c_n.sum()
        return [out, y_n, c_n, *torch.autograd.grad(loss, [x, *model.parameters()])]

    compiled = loss_and_grads(torch.compile(model, fullgraph=True))
    eager = loss_and_grads(model)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _op_args(sparse_weight_density):
    gen = torch.Generator().manual_seed(3)
    T, B, I, H = 5, 3, 4, 6
    f64 = torch.float64

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, dtype=f64, generator=gen) * scale

    m_ih = (torch.rand(3 * H, I, generator=gen) < 0.4).to(f64)
    m_hh = (torch.rand(3 * H, H, generator=gen) < 0.4).to(f64)
    y0 = rand(B, H) * (torch.rand(B, H, generator=gen) < 0.5)
    tensors = [rand(T, B, I), y0, rand(B, H, scale=0.3), rand(3 * H, I, scale=0.5) * m_ih,
               rand(3 * H, H, scale=0.5) * m_hh, rand(3 * H, scale=0.1), rand(3 * H, scale=0.1),
               torch.rand(H, dtype=f64, generator=gen) * 0.3]
    tensors = [t.requires_grad_() for t in tensors]
    settings = event.Settings(0.0, 0.7, 1.0, False, 2.0, 2.0, 1 << 20, "measured",
                              sparse_weight_density)
    return (*tensors, torch.tensor([5, 2, 4]), None, *settings, m_ih, m_hh)


@pytest.mark.parametrize("density", [2.0, 0.0], ids=["compressed", "dense"])
def test_opcheck_with_masks(density):
    args = _op_args(density)
    torch.library.opcheck(torch.ops.egru.event_layer.default, args)
    outputs = torch.ops.egru.event_layer(*args)
    y, c_hat, e, y_last, c_last, gates, gh_n = (o.detach() for o in outputs)
    x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, lengths, zmask, *rest = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    settings, masks = rest[:-2], rest[-2:]
    gen = torch.Generator().manual_seed(4)
    g = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in (y, c_hat, e, y_last, c_last)]
    torch.library.opcheck(
        torch.ops.egru.event_layer_backward.default,
        (x, y0, c0, w_ih, w_hh, theta, lengths, zmask, gates, gh_n, c_hat, y, *g, [True] * 8,
         *settings, *masks))
