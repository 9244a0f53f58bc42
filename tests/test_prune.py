"""egru.prune: magnitude pruning of recurrent weights (SPEC §3). The oracles are counts, sorted
magnitudes and fresh unpruned modules loaded with masked weights computed here by hand."""

import pytest
import torch
from torch import nn

from egru import EGRU, EGRUCell, available_backends, prune

KINDS = ("egru", "gru", "lstm")


class Model(nn.Module):
    """A recurrent layer inside a model, next to a weight that must never be pruned."""

    def __init__(self, kind: str, backend: str = "reference"):
        super().__init__()
        args = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
        if kind == "egru":
            self.rnn = EGRU(**args, threshold_mean=0.05, backend=backend)
        else:
            self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](**args)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def recurrent(model, kinds=("ih", "hh")):
    """qualified name → (original weight, mask or None), found without egru.prune."""
    out = {}
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            base = name.removesuffix("_orig")
            if base.split("_")[:2] in [["weight", k] for k in kinds]:
                out[f"{prefix}.{base}"] = (p.detach(), getattr(module, base + "_mask", None))
    return out


def effective(model):
    return {n: w if m is None else w * m for n, (w, m) in recurrent(model).items()}


def unpruned_copy(model, kind, backend="reference"):
    """A fresh, unpruned model holding ``orig · mask`` as plain weights."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("_orig", "_mask"))}
    state.update(effective(model))
    fresh = Model(kind, backend)
    fresh.load_state_dict(state)
    return fresh


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_layerwise_prunes_the_smallest_to_the_exact_count(kind, sparsity):
    model = Model(kind)
    head = model.head.weight.detach().clone()
    prune.magnitude(model, sparsity)
    weights = recurrent(model)
    assert len(weights) == 8
    for name, (w, mask) in weights.items():
        assert int((mask == 0).sum()) == round(sparsity * w.numel()), name
        masked = getattr(model.rnn, name.split(".")[1])  # right at once, not only after a forward
        assert torch.equal(masked, w * mask), name
        assert int((w * mask == 0).sum()) == round(sparsity * w.numel()), name
        assert w[mask == 0].abs().max() <= w[mask == 1].abs().min(), name
    assert torch.equal(model.head.weight, head) and not hasattr(model.head, "weight_mask")


@pytest.mark.parametrize("kind", KINDS)
def test_global_uses_one_threshold_for_the_whole_model(kind):
    model = Model(kind)
    with torch.no_grad():  # layers of different scales: a global threshold prunes them unequally
        model.rnn.weight_hh_l1.mul_(10)
    prune.magnitude(model, 0.6, scope="global")
    weights = recurrent(model).values()
    pruned = torch.cat([w[m == 0] for w, m in weights]).abs()
    kept = torch.cat([w[m == 1] for w, m in weights]).abs()
    total = sum(w.numel() for w, _ in weights)
    assert pruned.numel() == round(0.6 * total)
    assert pruned.max() <= kept.min()
    assert prune.mask_sparsity(model) == pruned.numel() / total
    assert prune.weight_density(model)["rnn.weight_hh_l1"] > 0.9


def test_matrices_and_names_select_what_is_pruned():
    model = Model("egru")
    prune.magnitude(model, 0.5, matrices="hh")
    assert set(recurrent(model, ["hh"])) == {n for n, (_, m) in recurrent(model).items() if m is not None}
    density = prune.weight_density(model)
    assert density["rnn.weight_ih_l0"] == 1.0 and density["rnn.weight_hh_l0"] == 0.5
    prune.magnitude(model, 0.25, names=["rnn.weight_ih_l1_reverse"])
    assert prune.weight_density(model, "ih")["rnn.weight_ih_l1_reverse"] == 0.75


def test_repruning_keeps_earlier_masks():
    model = Model("gru")
    prune.magnitude(model, 0.3)
    before = {n: m.clone() for n, (_, m) in recurrent(model).items()}
    with torch.no_grad():  # grow the pruned originals: magnitude alone would now keep them
        for w, m in recurrent(model).values():
            w.add_((1 - m) * 100)
    prune.magnitude(model, 0.6)
    for name, (w, m) in recurrent(model).items():
        assert (m <= before[name]).all() and int((m == 0).sum()) == round(0.6 * w.numel())


BACKENDS = ["reference"] + (["event"] if "event" in available_backends() else [])


@pytest.mark.parametrize("kind, backend", [("egru", b) for b in BACKENDS] + [("gru", None), ("lstm", None)])
def test_pruned_weights_stay_zero_through_adamw_and_forward_uses_them(kind, backend):
    model = Model(kind, backend or "reference")
    prune.magnitude(model, 0.5, scope="global")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    x = torch.randn(6, 2, 3)
    for _ in range(4):
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()
    for name, (w, m) in recurrent(model).items():
        assert (w * m)[m == 0].eq(0).all() and int((m == 0).sum()) > 0
        assert w[m == 1].ne(0).all(), name
    out = model(x)
    for name, w in effective(model).items():  # the attribute the layer reads is the masked weight
        module_name, param = name.rsplit(".", 1)
        assert torch.equal(getattr(model.get_submodule(module_name), param).detach(), w)
    torch.testing.assert_close(out, unpruned_copy(model, kind, backend or "reference")(x), rtol=0, atol=0)


def test_pruned_gru_runs_on_the_masked_weight_not_a_stale_copy():
    model = Model("gru")
    prune.magnitude(model, 0.5)
    with torch.no_grad():  # an in-place change of the originals must reach nn.GRU's _flat_weights
        model.rnn.weight_hh_l0_orig.mul_(3)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(model(x), unpruned_copy(model, "gru")(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind, backend", [("egru", b) for b in BACKENDS] + [("gru", None)])
def test_inference_reuses_the_masked_weight_until_weight_or_mask_change(kind, backend):
    """Without gradients the masked weight is made once and kept; an optimiser step, further
    pruning and load_state_dict change ``_orig`` or the mask in place, and the next call sees
    them. With gradients it is made at every call (autograd needs the product)."""
    model = Model(kind, backend or "reference")
    prune.magnitude(model, 0.5)
    x = torch.randn(5, 2, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def masked_weight():
        return model.rnn.weight_hh_l0

    def check():
        with torch.no_grad():
            torch.testing.assert_close(model(x), unpruned_copy(model, kind, backend or "reference")(x),
                                       rtol=0, atol=0)

    with torch.no_grad():
        model(x)
        kept = masked_weight()
        model(x)
        assert masked_weight() is kept  # nothing changed: the same tensor
    check()
    model(x).square().sum().backward()
    assert masked_weight() is not kept and masked_weight().grad_fn is not None
    optimizer.step()
    check()
    prune.magnitude(model, 0.8)
    check()
    other = Model(kind, backend or "reference")
    prune.magnitude(other, 0.6)
    model.load_state_dict(other.state_dict())
    check()


def test_egru_weights_stay_column_major():
    model = Model("egru")
    prune.magnitude(model, 0.5)
    prune.set_masks(model, {"rnn.weight_hh_l0": torch.rand(12, 4) > 0.5})  # a row-major mask
    model(torch.randn(4, 2, 3))  # the forward hook recomputes the weights
    for name, param in [("weight_ih_l0", "_orig"), ("weight_hh_l0", "_mask"), ("weight_hh_l1_reverse", "")]:
        assert getattr(model.rnn, name + param).t().is_contiguous(), name + param
    for name in recurrent(model):
        assert getattr(model.rnn, name.split(".")[1]).t().is_contiguous(), name
    prune.remove(model)
    assert all(w.t().is_contiguous() for w, _ in recurrent(model).values())


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_into_a_fresh_model(kind):
    model = Model(kind)
    prune.magnitude(model, 0.4, matrices="hh")
    state = model.state_dict()
    fresh = Model(kind)
    with pytest.raises(RuntimeError):  # why prepare_for_load exists: the keys differ
        fresh.load_state_dict(state)
    prune.prepare_for_load(fresh, state).load_state_dict(state)
    for (name, (w, m)), (w2, m2) in zip(recurrent(model).items(), recurrent(fresh).values()):
        assert torch.equal(w, w2) and (m is None) == (m2 is None), name
        assert m is None or torch.equal(m, m2)
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_bakes_masks_into_plain_parameters(kind):
    model = Model(kind)
    prune.magnitude(model, 0.5)
    x = torch.randn(5, 2, 3)
    before, out = effective(model), model(x)
    prune.remove(model)
    assert not any(k.endswith(("_orig", "_mask")) for k in model.state_dict())
    assert not any(model.rnn._forward_pre_hooks)
    for name, (w, m) in recurrent(model).items():
        assert m is None and isinstance(getattr(model.rnn, name.split(".")[1]), nn.Parameter)
        assert torch.equal(w, before[name])
    if kind != "egru":
        assert all(isinstance(w, nn.Parameter) for w in model.rnn._flat_weights)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no pruned"):
        prune.remove(model)


def schedule(model=None, **kw):
    kw = dict(final_sparsity=0.8, start_step=4, end_step=20, every=3, initial_sparsity=0.1) | kw
    return prune.GradualPruning(model if model is not None else Model("egru"), **kw)


def test_cubic_schedule_values():
    s = schedule()
    assert s.sparsity_at(0) == 0.0 and s.sparsity_at(3) == 0.0
    assert s.sparsity_at(4) == 0.1 and s.sparsity_at(20) == 0.8 and s.sparsity_at(100) == 0.8
    # Zhu & Gupta at t = 10 (a pruning step): 0.8 + (0.1 - 0.8)(1 - 6/16)^3
    assert s.sparsity_at(10) == pytest.approx(0.8 - 0.7 * (10 / 16) ** 3)
    values = [s.sparsity_at(t) for t in range(25)]
    assert values == sorted(values)
    changes = [t for t in range(1, 25) if values[t] != values[t - 1]]
    assert changes == [4, 7, 10, 13, 16, 19, 20]


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_gradual_pruning_reaches_the_target_and_resumes(scope):
    model = Model("egru")
    pruner = schedule(model, scope=scope)
    assert prune.mask_sparsity(model) == 0.0  # reparametrised at once, nothing masked yet
    total = sum(w.numel() for w, _ in recurrent(model).values())
    previous = {n: m.clone() for n, (_, m) in recurrent(model).items()}
    for step in range(12):
        assert pruner.step(step) == pruner.sparsity_at(step)
        masks = {n: m for n, (_, m) in recurrent(model).items()}
        assert all((masks[n] <= previous[n]).all() for n in masks)  # nothing regrows
        previous = {n: m.clone() for n, m in masks.items()}
    # checkpoint at step 11, resume in a fresh model and a fresh schedule
    state, pruner_state = model.state_dict(), pruner.state_dict()
    fresh = Model("egru")
    prune.prepare_for_load(fresh, state).load_state_dict(state)
    resumed = schedule(fresh, final_sparsity=0.5, every=1)  # the loaded state overrides these
    resumed.load_state_dict(pruner_state)
    assert resumed.state_dict() == pruner_state
    for step in range(12, 25):
        pruner.step(step)
        resumed.step(step)
    for (w, m), (_, m2) in zip(recurrent(model).values(), recurrent(fresh).values()):
        assert torch.equal(m, m2)
        if scope == "layerwise":
            assert int((m == 0).sum()) == round(0.8 * w.numel())
    assert prune.mask_sparsity(model) == round(0.8 * total) / total or scope == "layerwise"


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5"])
def test_sparsity_outside_the_range_is_refused(bad):
    with pytest.raises(ValueError, match=f"sparsity must be in \\[0, 1\\), got {bad!r}"):
        prune.magnitude(Model("gru"), bad)
    with pytest.raises(ValueError, match="final_sparsity"):
        schedule(final_sparsity=bad)


def test_clear_errors():
    model = Model("gru")
    with pytest.raises(ValueError, match="found no recurrent weights .* in Linear"):
        prune.magnitude(nn.Linear(3, 3), 0.5)
    with pytest.raises(ValueError, match=r"no recurrent weight named \['rnn.weight_hh_l7'\]"):
        prune.magnitude(model, 0.5, names=["rnn.weight_hh_l7"])
    with pytest.raises(ValueError, match=r"no recurrent weight named \['head.weight'\]"):
        prune.set_masks(model, {"head.weight": torch.ones(2, 8)})
    with pytest.raises(ValueError, match=r"shape \(12, 4\), got \(4, 12\)"):
        prune.set_masks(model, {"rnn.weight_hh_l0": torch.ones(4, 12)})
    with pytest.raises(ValueError, match="only 0 and 1"):
        prune.set_masks(model, {"rnn.weight_hh_l0": torch.full((12, 4), 0.5)})
    with pytest.raises(ValueError, match="matrices"):
        prune.magnitude(model, 0.5, matrices=("hr",))
    with pytest.raises(ValueError, match="scope"):
        prune.magnitude(model, 0.5, scope="per-unit")
    prune.magnitude(model, 0.5)
    with pytest.raises(ValueError, match="never regrows"):
        prune.magnitude(model, 0.2)
    for kw in (dict(start_step=5, end_step=5), dict(start_step=6, end_step=5)):
        with pytest.raises(ValueError, match="end_step must be after start_step"):
            schedule(**kw)
    for every in (0, -2, 1.5):
        with pytest.raises(ValueError, match="every must be a positive integer"):
            schedule(every=every)
    with pytest.raises(ValueError, match="must not exceed"):
        schedule(initial_sparsity=0.9)


def test_optimizer_checkpoint_matches_whenever_pruning_happened():
    """Saved by an optimiser built before pruning, loaded by one built after prepare_for_load."""
    model = Model("egru")
    names = [n for n, _ in model.named_parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    prune.magnitude(model, 0.5)
    assert [n.removesuffix("_orig") for n, _ in model.named_parameters()] == names
    model(torch.randn(4, 2, 3)).sum().backward()
    optimizer.step()
    state, opt_state = model.state_dict(), optimizer.state_dict()
    fresh = prune.prepare_for_load(Model("egru"), state)
    fresh.load_state_dict(state)
    resumed = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    resumed.load_state_dict(opt_state)
    for (name, p), p2 in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg"], resumed.state[p2]["exp_avg"]), name
    prune.remove(model)
    assert [n for n, _ in model.named_parameters()] == names


@pytest.mark.parametrize("cell", [EGRUCell, nn.GRUCell, nn.LSTMCell], ids=lambda c: c.__name__)
def test_cells_are_pruned_too(cell):
    layer = cell(3, 4)
    prune.magnitude(layer, 0.5, scope="global")
    assert prune.mask_sparsity(layer) == 0.5
    assert set(prune.weight_density(layer)) == {"weight_ih", "weight_hh"}
    x = torch.randn(2, 3)
    as_tuple = lambda out: tuple(out) if isinstance(out, tuple) else (out,)  # noqa: E731
    before = as_tuple(layer(x))
    prune.remove(layer)
    assert all(a.equal(b) for a, b in zip(before, as_tuple(layer(x)), strict=True))


def test_gru_conversion_takes_the_masked_weights_of_a_pruned_module():
    """``EGRU.from_gru`` / ``to_gru`` read a pruned module's weights as ``orig · mask``, also
    when ``orig`` changed after the last forward (the attribute would be stale)."""
    torch.manual_seed(0)
    gru = nn.GRU(3, 5, num_layers=2, bidirectional=True)
    prune.magnitude(gru, 0.5)
    with torch.no_grad():
        gru.weight_hh_l1_reverse_orig.add_(1.0)
    layer = EGRU.from_gru(gru)
    for name in ("weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l1"):
        expected = (getattr(gru, name + "_orig") * getattr(gru, name + "_mask")
                    if hasattr(gru, name + "_mask") else getattr(gru, name))
        assert torch.equal(getattr(layer, name), expected), name
    assert int((layer.weight_hh_l1_reverse == 0).sum()) == round(0.5 * 15 * 5)
    pruned = EGRU(3, 5, num_layers=2)
    prune.magnitude(pruned, 0.6, matrices="hh")
    back = pruned.to_gru()
    assert torch.equal(back.weight_hh_l1, pruned.weight_hh_l1_orig * pruned.weight_hh_l1_mask)
    assert torch.equal(back.weight_ih_l0, pruned.weight_ih_l0)
