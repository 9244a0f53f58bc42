"""Unstructured magnitude pruning of recurrent weights, one-shot or gradual (SPEC §3).

Acts on every ``weight_ih_*`` / ``weight_hh_*`` found in a model by name, so ``egru.EGRU``,
``torch.nn.GRU``, ``torch.nn.LSTM``, their cells and models holding them are pruned alike.
With weight density ``d`` and activity ``a`` an event-driven layer does about ``a·d`` of the
dense MACs.

The reparametrisation is ``torch.nn.utils.prune``'s: the weight becomes ``<name>_orig`` (the
same ``Parameter`` object, so optimisers built before pruning keep working; here it also keeps
the weight's place among the parameters, so optimiser checkpoints match however the optimiser
and the pruning were ordered), a buffer ``<name>_mask`` holds the mask, and a forward pre-hook sets ``<name> = <name>_mask · <name>_orig``
before every call. Masks are therefore in ``state_dict``, pruned weights stay exactly zero
through optimiser steps (their gradient is zero; weight decay only shrinks ``_orig``), and DDP
works as with any buffer. ``torch.nn.GRU``/``LSTM`` see the masked weight because
``RNNBase.__setattr__`` refreshes ``_flat_weights`` when the hook assigns it.

Masks are computed here, not by torch's ``l1_unstructured`` / ``global_unstructured``: those
flatten weights with ``.view(-1)``, which fails on ``EGRU``'s column-major weights, and they
prune a fraction of the *remaining* weights on each call (through a ``PruningContainer``),
whereas here a sparsity is always the fraction of the whole matrix (or model). The
reparametrisation is installed once with ``torch.nn.utils.prune.identity`` (its all-ones mask takes the weight's
layout) and later masks are copied into that buffer in place, so the masked weight stays
column-major for ``EGRU`` (``w.t()`` contiguous, as the event kernels read it).

Typical use::

    prune.magnitude(model, 0.8, scope="global")           # one-shot, then fine-tune
    pruner = prune.GradualPruning(model, 0.9, start_step=1000, end_step=20000, every=100)
    ...  # in the loop, after optimizer.step(): pruner.step(step)
    prune.prepare_for_load(fresh_model, checkpoint["model"]); fresh_model.load_state_dict(...)
    prune.remove(model)                                    # bake masks into plain weights
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

MATRICES = ("ih", "hh")
SCOPES = ("layerwise", "global")

# nn.GRU/LSTM/EGRU layers (weight_hh_l0, weight_ih_l1_reverse) and their cells (weight_hh)
_WEIGHT_NAME = re.compile(r"weight_(ih|hh)(_l\d+(_reverse)?)?")


@dataclass(frozen=True)
class _Target:
    """One recurrent weight matrix: ``getattr(module, param)`` is the (masked) weight."""

    name: str  # qualified, as in the model's state_dict: "rnn.weight_hh_l0"
    module: nn.Module
    param: str  # "weight_hh_l0"

    @property
    def pruned(self) -> bool:
        return self.param + "_mask" in self.module._buffers

    @property
    def orig(self) -> torch.Tensor:
        return self.module._parameters[self.param + "_orig" if self.pruned else self.param]

    @property
    def mask(self) -> Optional[torch.Tensor]:
        return self.module._buffers[self.param + "_mask"] if self.pruned else None

    def weight(self) -> torch.Tensor:
        """The effective weight now (the attribute is only refreshed by the forward hook)."""
        w = self.orig.detach()
        return w * self.mask if self.pruned else w

    def reparametrise(self) -> None:
        if not self.pruned:
            order = [self.param + "_orig" if k == self.param else k for k in self.module._parameters]
            _MaskedWeight.apply(self.module, self.param)
            _reorder(self.module._parameters, order)

    def remove(self) -> None:
        order = [self.param if k == self.param + "_orig" else k for k in self.module._parameters]
        torch_prune.remove(self.module, self.param)
        _reorder(self.module._parameters, order)

    def set_mask(self, keep: torch.Tensor) -> None:
        """Copy ``keep`` into the mask buffer in place (its layout, the weight's, is kept)."""
        self.reparametrise()
        with torch.no_grad():
            self.mask.copy_(keep)
        # refresh the attribute now, as torch's pruning does, so it is right before a forward
        for hook in self.module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == self.param:
                setattr(self.module, self.param, hook.apply_mask(self.module))


class _MaskedWeight(torch_prune.Identity):
    """torch's all-ones reparametrisation (``prune.identity``) whose hook reuses the masked
    weight while no gradient is recorded and neither ``_orig`` nor ``_mask`` changed (their
    storage and autograd version: optimiser steps, ``load_state_dict`` and in-place writes
    through the tensors bump it; writes through ``.data`` do not). Multiplying a 3H × H matrix
    by its mask costs more than a whole event-driven forward of a short sequence, and it would
    also hand the kernels a new tensor at every call, so that they could not keep its
    compressed rows. With gradients the product is made at every call, as autograd needs."""

    _stamp = None

    def __call__(self, module, inputs):
        orig = getattr(module, self._tensor_name + "_orig")
        mask = getattr(module, self._tensor_name + "_mask")
        if (torch.is_grad_enabled() and orig.requires_grad) or torch.compiler.is_compiling():
            self._stamp = None
        else:
            stamp = (orig._version, orig.data_ptr(), mask._version, mask.data_ptr())
            if stamp == self._stamp:
                return
            self._stamp = stamp
        setattr(module, self._tensor_name, self.apply_mask(module))


def _reorder(params: dict, order: list[str]) -> None:
    """Put ``params`` in ``order``. torch's pruning re-registers a weight as ``_orig`` at the end
    of the module's parameters (and back at the end on removal); an optimiser's state_dict is
    matched by that order, so a checkpoint saved by an optimiser built before pruning would
    load into the wrong parameters of one built after ``prepare_for_load``, silently where
    shapes agree. Keeping each weight's place keeps the order the same in every case."""
    items = {k: params[k] for k in order}
    params.clear()
    params.update(items)


def _check_matrices(matrices) -> tuple[str, ...]:
    matrices = (matrices,) if isinstance(matrices, str) else tuple(matrices)
    if not matrices or any(m not in MATRICES for m in matrices):
        raise ValueError(f"matrices must be a non-empty selection of {MATRICES}, got {matrices!r}")
    return matrices


def _check_sparsity(name: str, s) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
        raise ValueError(f"{name} must be in [0, 1), got {s!r}")
    return float(s)


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _targets(model: nn.Module, matrices=MATRICES, names: Optional[Iterable[str]] = None) -> list[_Target]:
    """The recurrent weight matrices of ``model`` of the kinds ``matrices`` (or exactly ``names``)."""
    matrices = _check_matrices(matrices)
    found = []
    for prefix, module in model.named_modules():
        for key in module._parameters:
            param = key.removesuffix("_orig")
            if param != key and param + "_mask" not in module._buffers:
                continue  # an "_orig" that is no pruning reparametrisation
            match = _WEIGHT_NAME.fullmatch(param)
            if match and module._parameters[key].dim() == 2:
                found.append((match.group(1), _Target(f"{prefix}.{param}" if prefix else param, module, param)))
    if names is not None:
        by_name = {t.name: t for _, t in found}
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"no recurrent weight named {unknown} in {type(model).__name__}; "
                             f"it has {sorted(by_name)}")
        return [by_name[n] for n in names]
    targets = [t for kind, t in found if kind in matrices]
    if not targets:
        raise ValueError(f"found no recurrent weights (weight_{{{','.join(matrices)}}}_*) "
                         f"in {type(model).__name__}")
    return targets


def _prune_to(targets: list[_Target], sparsity: float, scope: str) -> None:
    """Mask the smallest magnitudes: per matrix (layerwise) or with one threshold over all."""
    groups = [targets] if scope == "global" else [[t] for t in targets]
    for group in groups:
        scores = []
        for t in group:
            s = t.orig.detach().abs()
            if t.pruned:  # already pruned weights come first, so masks only ever lose entries
                s = torch.where(t.mask.bool(), s, torch.full_like(s, -1.0))
            scores.append(s.reshape(-1))
        flat = torch.cat(scores)
        n_prune = round(sparsity * flat.numel())
        n_pruned = int((flat < 0).sum())
        if n_pruned > n_prune:
            names = ", ".join(t.name for t in group)
            raise ValueError(f"{names} already has {n_pruned} of {flat.numel()} weights pruned, more "
                             f"than sparsity {sparsity} asks ({n_prune}); pruning never regrows weights")
        keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
        if n_prune:  # topk: exactly n_prune entries even when magnitudes tie
            keep[torch.topk(flat, n_prune, largest=False).indices] = False
        start = 0
        for t in group:
            n = t.orig.numel()
            t.set_mask(keep[start:start + n].view(t.orig.shape))
            start += n


def magnitude(model: nn.Module, sparsity: float, *, scope: str = "layerwise",
              matrices: Union[str, Iterable[str]] = MATRICES,
              names: Optional[Iterable[str]] = None) -> nn.Module:
    """Prune the smallest-magnitude recurrent weights, one-shot (SPEC §3).

    Args:
        model: a module holding recurrent layers (``EGRU``, ``nn.GRU``, ``nn.LSTM``, cells).
        sparsity: fraction of weights to mask, in [0, 1): ``round(sparsity·n)`` of each matrix's
            ``n`` weights (``"layerwise"``) or of all selected weights together (``"global"``,
            one magnitude threshold). Weights already pruned stay pruned and count.
        scope: ``"layerwise"`` or ``"global"``.
        matrices: ``"ih"``, ``"hh"`` or both.
        names: qualified parameter names (``"rnn.weight_hh_l0"``) instead of ``matrices``.

    Returns:
        ``model``, pruned in place.
    """
    sparsity = _check_sparsity("sparsity", sparsity)
    _check_scope(scope)
    _prune_to(_targets(model, matrices, names), sparsity, scope)
    return model


def set_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune with given masks (like ``torch.nn.utils.prune.custom_from_mask``, by qualified name).

    Args:
        masks: qualified weight name → mask of the weight's shape, 1/True where a weight is kept.

    Returns:
        ``model``, pruned in place.
    """
    targets = dict(zip(masks, _targets(model, names=list(masks))))
    for name, mask in masks.items():
        t = targets[name]
        mask = torch.as_tensor(mask)
        if mask.shape != t.orig.shape:
            raise ValueError(f"mask for {name} must have the weight's shape {tuple(t.orig.shape)}, "
                             f"got {tuple(mask.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask for {name} must hold only 0 and 1")
    for name, mask in masks.items():
        targets[name].set_mask(torch.as_tensor(mask))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Bake the masks into plain parameters (``torch.nn.utils.prune.remove`` on each pruned
    recurrent weight): the zeros stay, the ``_orig``/``_mask`` entries and hooks go.

    Returns:
        ``model``, changed in place. Raises ValueError when none of its weights is pruned.
    """
    pruned = [t for t in _targets(model) if t.pruned]
    if not pruned:
        raise ValueError(f"no pruned recurrent weights in {type(model).__name__} to remove")
    for t in pruned:
        t.remove()
    return model


def prepare_for_load(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Install the pruning reparametrisation (all-ones masks) on every recurrent weight whose
    mask is in ``state_dict``, so that ``model.load_state_dict(state_dict)`` then restores the
    masks of a pruned checkpoint.

    Returns:
        ``model``, changed in place (unchanged when ``state_dict`` has no masks, whatever the
        model: one without recurrent weights of these names included).
    """
    if not any(key.endswith("_mask") for key in state_dict):
        return model
    for t in _targets(model):
        if t.name + "_mask" in state_dict:
            t.reparametrise()
    return model


def weight_density(model: nn.Module, matrices: Union[str, Iterable[str]] = MATRICES) -> dict[str, float]:
    """Fraction of nonzero entries of each recurrent weight matrix (pruned or not).

    Returns:
        qualified weight name → density in [0, 1].
    """
    return {t.name: int(torch.count_nonzero(t.weight())) / t.orig.numel()
            for t in _targets(model, matrices)}


def mask_sparsity(model: nn.Module, matrices: Union[str, Iterable[str]] = MATRICES) -> float:
    """Fraction of the selected recurrent weights that masks remove, over all of them (an
    unpruned matrix counts as kept): what :func:`magnitude` with ``scope="global"`` sets."""
    targets = _targets(model, matrices)
    masked = sum(int((t.mask == 0).sum()) for t in targets if t.pruned)
    return masked / sum(t.orig.numel() for t in targets)


class GradualPruning:
    """Gradual magnitude pruning with the cubic schedule of Zhu & Gupta (2017), SPEC §3.

    ``s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(t1 − t0))³`` for ``t0 ≤ t ≤ t1``, applied at steps
    ``t0, t0 + every, t0 + 2·every, ...`` and at ``t1``; nothing is pruned before ``t0`` and the
    sparsity stays ``s_f`` after ``t1``. Masks only lose entries. Call :meth:`step` after each
    optimiser step; missed or repeated steps are harmless (the model is pruned to the sparsity
    in force whenever that rises). The masks live in the model's ``state_dict``; this object's
    :meth:`state_dict` holds the schedule and how far it got.

    Args:
        model: as for :func:`magnitude`; the reparametrisation is installed at once, so the
            model's ``state_dict`` keys do not change during training.
        final_sparsity: ``s_f`` in [0, 1).
        start_step, end_step: ``t0 < t1``.
        every: steps between pruning steps, a positive integer.
        initial_sparsity: ``s_i`` in [0, s_f].
        scope, matrices: as for :func:`magnitude`.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, *, start_step: int, end_step: int,
                 every: int = 1, initial_sparsity: float = 0.0, scope: str = "layerwise",
                 matrices: Union[str, Iterable[str]] = MATRICES):
        self.model = model
        self._configure(final_sparsity=final_sparsity, initial_sparsity=initial_sparsity,
                        start_step=start_step, end_step=end_step, every=every, scope=scope,
                        matrices=matrices)
        self.sparsity = 0.0  # the sparsity the model was last pruned to
        self.last_step: Optional[int] = None
        for t in self._targets():
            t.reparametrise()

    def _configure(self, *, final_sparsity, initial_sparsity, start_step, end_step, every, scope,
                   matrices) -> None:
        s_f = _check_sparsity("final_sparsity", final_sparsity)
        s_i = _check_sparsity("initial_sparsity", initial_sparsity)
        if s_i > s_f:
            raise ValueError(f"initial_sparsity {s_i} must not exceed final_sparsity {s_f}")
        for name, v in (("start_step", start_step), ("end_step", end_step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if end_step <= start_step:
            raise ValueError(f"end_step must be after start_step, got start_step={start_step}, "
                             f"end_step={end_step}")
        if isinstance(every, bool) or not isinstance(every, int) or every <= 0:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        _check_scope(scope)
        self.final_sparsity, self.initial_sparsity = s_f, s_i
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.scope, self.matrices = scope, _check_matrices(matrices)

    def _targets(self) -> list[_Target]:
        return _targets(self.model, self.matrices)

    def sparsity_at(self, step: int) -> float:
        """The sparsity in force at ``step`` (0 before ``t0``, held between pruning steps)."""
        t0, t1 = self.start_step, self.end_step
        if step < t0:
            return 0.0
        if step >= t1:
            return self.final_sparsity
        t = t0 + (step - t0) // self.every * self.every
        # s_f + (s_i − s_f)(1 − p)³ rearranged so that t0 gives s_i exactly, without rounding
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_i + (s_f - s_i) * (1 - (1 - (t - t0) / (t1 - t0)) ** 3)

    def step(self, step: int) -> float:
        """Prune the model to :meth:`sparsity_at` ``(step)`` if that is above its sparsity now.

        Returns:
            the sparsity in force.
        """
        target = self.sparsity_at(step)
        if target > self.sparsity:
            _prune_to(self._targets(), target, self.scope)
            self.sparsity = target
        self.last_step = step
        return self.sparsity

    def state_dict(self) -> dict:
        """The schedule and its progress, a plain dict for a checkpoint."""
        return {"final_sparsity": self.final_sparsity, "initial_sparsity": self.initial_sparsity,
                "start_step": self.start_step, "end_step": self.end_step, "every": self.every,
                "scope": self.scope, "matrices": list(self.matrices), "sparsity": self.sparsity,
                "last_step": self.last_step}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` (load the model's masks with its own ``state_dict``)."""
        state = dict(state)
        sparsity, last_step = state.pop("sparsity"), state.pop("last_step")
        self._configure(**state)
        self.sparsity, self.last_step = float(sparsity), last_step


__all__ = ["GradualPruning", "magnitude", "mask_sparsity", "prepare_for_load", "remove",
           "set_masks", "weight_density"]
