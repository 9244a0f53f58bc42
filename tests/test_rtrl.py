"""Sparse RTRL (egru.rtrl, SPEC §4): the same gradient as BPTT, fewer MACs, fixed memory."""

import pytest
import torch

import egru
from egru import functional
from egru.rtrl import RTRL
from egru.state import EGRUState

DTYPE = torch.float64
REGIMES = ("silent", "active", "mixed")


def make_cell(regime, I=4, H=6, *, bias=True, surrogate=None):
    """A float64 cell and an input scale for which the units are silent (and outside the
    surrogate's support), all active, or mixed."""
    support = {"silent": 3.6, "active": 1.0, "mixed": 2.0}[regime]
    cell = egru.EGRUCell(I, H, bias=bias, dtype=DTYPE, pseudo_derivative_support=support,
                         surrogate=surrogate)
    with torch.no_grad():
        if regime == "silent":  # tiny candidate states, thresholds 1: v ≈ −1, outside ±1/3.6
            cell.threshold.fill_(1.0)
        elif regime == "active":  # n > 0 (b_in = 2 outweighs the small weights) and c ≥ 0: ĉ > ϑ = 0
            cell.weight_ih.mul_(0.1), cell.weight_hh.mul_(0.1)
            cell.bias_ih[2 * H:] = 2.0
            cell.threshold.zero_()
        else:
            cell.weight_ih.mul_(2), cell.weight_hh.mul_(2)
            cell.threshold.uniform_(0.05, 0.4)
    return cell, 1e-3 if regime == "silent" else 1.0


def random_masks(cell):
    """Random keep-masks (60 %) with one all-zero row and one all-zero column each."""
    masks = {}
    for name in ("weight_ih", "weight_hh"):
        mask = (torch.rand(getattr(cell, name).shape) < 0.6).to(DTYPE)
        mask[1, :] = 0
        mask[:, -1] = 0
        masks[name] = mask
    return masks


def trained(cell):
    """Parameters that require a gradient, by name (a pruned weight's ``_orig`` included)."""
    return {name: p for name, p in cell.named_parameters() if p.requires_grad}


def effective(cell, name, masks):
    """The weight the cell computes with."""
    if hasattr(cell, name + "_orig"):
        return getattr(cell, name + "_orig") * getattr(cell, name + "_mask")
    weight = getattr(cell, name)
    return weight * masks[name] if masks else weight


def bptt_grads(cell, xs, ws, masks=None):
    """Autograd through egru.functional.egru_layer of the loss Σ_t ⟨w_t, y_t⟩."""
    B = xs.shape[1]
    out = functional.egru_layer(xs, EGRUState.zeros(B, cell.hidden_size, dtype=DTYPE),
                                effective(cell, "weight_ih", masks), effective(cell, "weight_hh", masks),
                                cell.bias_ih, cell.bias_hh, cell.threshold, cell.surrogate)
    params = trained(cell)
    grads = torch.autograd.grad((out.y * ws).sum(), list(params.values()))
    return dict(zip(params, grads)), out


def rtrl_grads(cell, xs, ws, **options):
    """RTRL online: at each step, a readout loss ⟨w_t, y_t⟩ backpropagated to y_t, then accumulate."""
    cell.zero_grad(set_to_none=True)
    learner = RTRL(cell, **options)
    learner.reset(xs.shape[1])
    for x, w in zip(xs, ws):
        y = learner.step(x)
        (w * y).sum().backward()
        learner.accumulate(y.grad)
    return {name: p.grad for name, p in trained(cell).items()}, learner


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("masking", ["none", "explicit", "pruned"])
@pytest.mark.parametrize("train_threshold", [True, False])
def test_rtrl_equals_bptt(regime, masking, train_threshold):
    I, H, T = {"silent": (3, 4, 6), "active": (4, 6, 8), "mixed": (5, 8, 10)}[regime]
    cell, scale = make_cell(regime, I, H)
    masks = random_masks(cell) if masking != "none" else None
    if masking == "pruned":
        egru.prune.set_masks(cell, masks)
    xs, ws = scale * torch.randn(T, 2, I, dtype=DTYPE), torch.randn(T, 2, H, dtype=DTYPE)
    expected, out = bptt_grads(cell, xs, ws, masks)
    v = out.c_hat - cell.threshold.detach()
    if regime == "silent":
        assert out.e.sum() == 0 and (v.abs() >= cell.surrogate.support).all()
    elif regime == "active":
        assert (out.e == 1).all()
    else:
        assert 0 < out.e.mean() < 1 and ((out.e == 0) & (v.abs() >= cell.surrogate.support)).any()
    got, learner = rtrl_grads(cell, xs, ws, masks=masks if masking == "explicit" else None,
                              train_threshold=train_threshold)
    for name, grad in expected.items():
        if name == "threshold" and not train_threshold:
            assert got[name] is None
            continue
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-10, msg=name)
    if masks is not None:  # pruned entries: zero gradient, and no influence column
        for name, mask in masks.items():
            key = name + "_orig" if masking == "pruned" else name
            assert (got[key][mask == 0] == 0).all()
        assert learner.num_columns == sum(int(m.sum()) for m in masks.values()) + 6 * H + (
            H if train_threshold else 0)


@pytest.mark.parametrize("variant", ["no bias", "fast sigmoid", "frozen bias"])
def test_rtrl_equals_bptt_other_cells(variant):
    surrogate = egru.FastSigmoid() if variant == "fast sigmoid" else None
    cell, _ = make_cell("mixed", 3, 5, bias=variant != "no bias", surrogate=surrogate)
    if variant == "frozen bias":
        cell.bias_hh.requires_grad_(False)
    xs, ws = torch.randn(7, 2, 3, dtype=DTYPE), torch.randn(7, 2, 5, dtype=DTYPE)
    expected, _ = bptt_grads(cell, xs, ws)
    got, _ = rtrl_grads(cell, xs, ws)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-10, msg=name)
    if variant == "frozen bias":
        assert cell.bias_hh.grad is None


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("with_masks", [False, True])
def test_sparse_and_dense_agree(regime, with_masks):
    cell, scale = make_cell(regime, 4, 8)
    masks = random_masks(cell) if with_masks else None
    xs, ws = scale * torch.randn(10, 2, 4, dtype=DTYPE), torch.randn(10, 2, 8, dtype=DTYPE)
    sparse, sparse_learner = rtrl_grads(cell, xs, ws, masks=masks, sparse=True)
    sparse = {name: g.clone() for name, g in sparse.items()}
    dense, dense_learner = rtrl_grads(cell, xs, ws, masks=masks, sparse=False)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], rtol=0, atol=1e-12, msg=name)
    assert dense_learner.num_columns == 3 * 8 * 4 + 3 * 8 * 8 + 6 * 8 + 8
    if regime != "active" or with_masks:  # low activity (or pruning): fewer MACs
        assert sparse_learner.macs < dense_learner.macs
    if regime == "silent":  # no unit in G: not one cross-unit MAC
        assert sparse_learner.macs < dense_learner.macs / 3


def influence_macs(H, P, g, immediate):
    """The documented counting rule for one sample and step: rows of D^y ⊙ M, Jacobian
    columns, cross-unit product, own-unit term, immediate terms."""
    return g * P + 3 * H * g + H * g * P + H * P + immediate


@pytest.mark.parametrize("pruned_entry", [False, True])
def test_mac_count_by_hand(pruned_entry):
    # H = 2, I = 1, all weights 0: ĉ = (1 − z)·tanh(b_in) = ±0.482 at step 1 (z = 0.5), so
    # unit 0 fires (ϑ = 0.1) and unit 1 is silent outside the support (|−0.582| > 1/3.6).
    cell = egru.EGRUCell(1, 2, dtype=DTYPE, pseudo_derivative_support=3.6)
    with torch.no_grad():
        for p in cell.parameters():
            p.zero_()
        cell.bias_ih[4:] = torch.tensor([2.0, -2.0], dtype=DTYPE)
        cell.threshold.fill_(0.1)
    masks = None
    if pruned_entry:  # drop W_hh[0, 0] (unit 0's reset gate from unit 0)
        masks = {"weight_hh": torch.ones(6, 2, dtype=DTYPE)}
        masks["weight_hh"][0, 0] = 0
    xs = torch.tensor([[[1.0]], [[0.0]]], dtype=DTYPE)  # input at step 1 only
    learner = RTRL(cell, masks=masks)
    learner.reset(1)
    y1 = learner.step(xs[0])
    assert y1[0, 0] > 0 and y1[0, 1] == 0
    macs_step1 = learner.macs
    learner.step(xs[1])
    P = 6 + 12 + 6 + 6 + 2 - pruned_entry
    # step 1: G_0 = {} (reset), y_0 = 0; immediate: 6 W_ih columns (x = 1) and 12 bias columns
    assert macs_step1 == influence_macs(2, P, 0, 6 + 12)
    # step 2: G_1 = {0}, A_1 = {0}, x = 0: W_hh columns from unit 0 (6, or 5 pruned) and biases
    assert learner.macs == macs_step1 + influence_macs(2, P, 1, 6 - pruned_entry + 12)
    dense = RTRL(cell, masks=masks, sparse=False)
    dense.reset(1)
    dense.step(xs[0]), dense.step(xs[1])  # every unit, every column (32), every weight column
    assert dense.macs == 2 * influence_macs(2, 32, 2, 6 + 12 + 12)


def held_tensors(learner):
    """(attribute, shape, dtype) of every tensor the learner holds, its column tables included."""
    held = []
    for name, value in sorted(vars(learner).items()):
        if isinstance(value, torch.Tensor):
            held.append((name, tuple(value.shape), value.dtype))
    for i, block in enumerate(learner.blocks):
        held += [(f"block{i}", tuple(t.shape), t.dtype) for t in block if isinstance(t, torch.Tensor)]
    return held


def test_memory_does_not_grow_with_steps():
    cell, _ = make_cell("mixed", 3, 4)
    learner = RTRL(cell, masks=random_masks(cell))
    learner.reset(2)
    sizes = {0: (learner.influence_bytes(), held_tensors(learner))}  # all is allocated by reset
    for t in range(1, 51):
        y = learner.step(torch.randn(2, 3, dtype=DTYPE))
        learner.accumulate(torch.randn_like(y))
        if t in (5, 50):
            sizes[t] = (learner.influence_bytes(), held_tensors(learner))
    assert sizes[0] == sizes[5] == sizes[50]
    assert sizes[5][0] == 2 * 4 * learner.num_columns * 8


def test_bad_input():
    cell, _ = make_cell("mixed", 3, 4)
    learner = RTRL(cell)
    with pytest.raises(RuntimeError, match="reset"):
        learner.step(torch.randn(2, 3, dtype=DTYPE))
    with pytest.raises(RuntimeError, match="reset"):
        learner.accumulate(torch.randn(2, 4, dtype=DTYPE))
    learner.reset(2)
    for bad in (torch.randn(2, 4, dtype=DTYPE), torch.randn(3, dtype=DTYPE),
                torch.randn(3, 3, dtype=DTYPE), [[0.0] * 3] * 2):
        with pytest.raises(ValueError, match="shape"):
            learner.step(bad)
    with pytest.raises(ValueError, match="dtype"):
        learner.step(torch.randn(2, 3, dtype=torch.float32))
    learner.step(torch.randn(2, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="shape"):
        learner.accumulate(torch.randn(2, 3, dtype=DTYPE))
    with pytest.raises(ValueError, match="batch_size"):
        learner.reset(0)
    with pytest.raises(ValueError, match="shape"):
        RTRL(cell, masks={"weight_hh": torch.ones(12, 3)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        RTRL(cell, masks={"weight_hh": torch.full((12, 4), 0.5)})
    with pytest.raises(ValueError, match="keys"):
        RTRL(cell, masks={"weight_hr": torch.ones(12, 4)})
    with pytest.raises(ValueError, match="zoneout"):
        RTRL(egru.EGRUCell(3, 4, zoneout=0.1))
    with pytest.raises(TypeError, match="EGRUCell"):
        RTRL(torch.nn.GRUCell(3, 4))
    egru.prune.set_masks(cell, {"weight_hh": torch.ones(12, 4)})
    with pytest.raises(ValueError, match="already pruned"):
        RTRL(cell, masks={"weight_hh": torch.ones(12, 4)})
    learner = RTRL(cell)
    egru.prune.magnitude(cell, 0.5, matrices="hh")
    with pytest.raises(RuntimeError, match="mask changed"):
        learner.reset(2)
    learner = RTRL(cell)  # pruned after the learner was made
    egru.prune.magnitude(cell, 0.5, matrices="ih")
    with pytest.raises(RuntimeError, match="mask changed"):
        learner.reset(2)


def test_accumulate_needs_a_step_since_reset():
    cell, _ = make_cell("mixed", 3, 4)
    learner = RTRL(cell)
    learner.reset(2)
    grad_y = torch.randn(2, 4, dtype=DTYPE)
    with pytest.raises(RuntimeError, match=r"call step\(x\) before accumulate"):
        learner.accumulate(grad_y)
    assert all(p.grad is None for p in cell.parameters())
    learner.step(torch.randn(2, 3, dtype=DTYPE))
    learner.accumulate(grad_y)
    learner.accumulate(grad_y)  # a second loss on the same step
    saved = learner.state_dict()
    learner.reset(2)  # a new sequence: the last step is gone
    with pytest.raises(RuntimeError, match=r"no step since reset"):
        learner.accumulate(grad_y)
    learner.load_state_dict(saved)  # continues after the saved learner's step
    learner.accumulate(grad_y)


def test_state_dict_continues_exactly_and_refuses_another_learner():
    torch.manual_seed(3)
    cell = egru.EGRUCell(3, 5, dtype=torch.float64)
    xs = torch.randn(6, 2, 3, dtype=torch.float64)
    whole = RTRL(cell)
    whole.reset(2)
    for x in xs:
        whole.step(x)
    first = RTRL(cell)
    first.reset(2)
    for x in xs[:3]:
        first.step(x)
    second = RTRL(cell)
    second.reset(2)
    second.load_state_dict(first.state_dict())
    for x in xs[3:]:
        second.step(x)
    for got, want in zip(second.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(got, want)
    other = RTRL(egru.EGRUCell(3, 4, dtype=torch.float64))
    other.reset(2)
    with pytest.raises(ValueError, match="influence of shape"):
        other.load_state_dict(first.state_dict())


def test_batch_size_of_any_integer_type_and_a_frozen_threshold_not_trained():
    import numpy as np

    cell = egru.EGRUCell(2, 3, dtype=torch.float64)
    learner = RTRL(cell)
    for size in (np.int64(2), torch.tensor(2)):
        learner.reset(size)
        assert learner.state.y.shape == (2, 3)
    with pytest.raises(ValueError, match="positive integer"):
        learner.reset(2.0)
    cell.threshold.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require a gradient"):
        RTRL(cell, train_threshold=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_same_numbers_on_one_thread_as_on_two(dtype):
    """The online recipe runs the learner on all of torch's threads or on one, whichever is
    faster at the moment: both give the same state, influence and gradients, bit for bit.
    Sizes at which torch splits the influence update between threads."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            cell = egru.EGRUCell(28, 32, dtype=dtype, pseudo_derivative_support=2.0)
            learner = RTRL(cell)
            learner.reset(16)
            for x in torch.rand(6, 16, 28, dtype=dtype):
                y = learner.step(x)
            learner.accumulate(torch.randn(16, 32, dtype=dtype))
            results.append([*learner.state_dict().values(), *(p.grad for p in cell.parameters())])
    finally:
        torch.set_num_threads(before)
    assert len(results[0]) == len(results[1]) == 12
    for a, b in zip(*results):
        assert torch.equal(a, b)
