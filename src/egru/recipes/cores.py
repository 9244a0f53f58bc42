"""Recurrent cores behind one interface, so that recipes never ask which model they run.

A core is one recurrent layer over time: ``core(x, state, record=False) -> (out, state, record)``
with ``x`` of shape (T, B, I), ``out`` (T, B, H) and a state of (1, B, H) tensors that goes in and
comes out; ``core.initial_state(B, like)`` is its zero state, ``core.features(out)`` what a
readout reads at each step (T, B, H), ``core.stats(record)`` the call's
:class:`egru.LayerStats` (activity, MACs). ``make_core(cfg, I, H)`` builds the one ``cfg.model``
names: the EGRU, a ``torch.nn.GRU``/``LSTM`` baseline with DropConnect on its recurrent weights,
or the embedded eGRU of :mod:`egru.mcu` (``embedded``; no events), optionally quantisation-aware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

import egru
import egru.mcu
import egru.neurobench
from egru.sparsity import dense_layer_stats

from .common import Checked, check, option

MODELS = ("egru", "gru", "lstm", "embedded")  # the keys of CORES, below
QUANTIZE = ("none",) + tuple(egru.mcu.QUANTIZERS)


@dataclass(frozen=True)
class CoreConfig(Checked):
    """What builds a core; the recipes' configs inherit these fields."""

    model: str = option("egru", "the recurrent core", choices=MODELS)
    threshold_mean: float = option(0.1, "EGRU: mean of the initial thresholds")
    threshold_parametrization: str = option("projected", "EGRU: thresholds trained as parameters projected "
                                            "into [0, 1], or as sigmoid(theta) trained through theta",
                                            choices=egru.modules.THRESHOLD_PARAMETRIZATIONS)
    init: str = option("gru", "EGRU: torch.nn.GRU's uniform weights and biases, or the authors' "
                              "Xavier-normal weights and zero biases", choices=egru.modules.INITS)
    dampening_factor: float = option(0.7, "EGRU: height of the triangle surrogate gradient")
    pseudo_derivative_support: float = option(1.0, "EGRU: inverse half-width of the triangle surrogate")
    zoneout: float = option(0.0, "EGRU: probability that a unit keeps its previous internal state")
    dropconnect: float = option(0.0, "probability of dropping a recurrent weight, one mask per call")
    backend: str = option("auto", "how the EGRU is computed", choices=tuple(egru.available_backends()))
    quantize: str = option("none", "embedded: train with 3-bit weights by this rule (egru.mcu)", choices=QUANTIZE)
    quantize_start: float = option(0.0, "embedded: fraction of the training steps done in float before "
                                        "quantisation-aware training starts")
    q15_ranges: bool = option(False, "embedded: clip inputs and hidden activations to the Q15 engine's ranges")

    def __post_init__(self):
        super().__post_init__()
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODELS}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantize {self.quantize!r}; expected one of {QUANTIZE}")
        check(self, "quantize_start", "a number in [0, 1)", lambda v: 0 <= v < 1)
        if self.quantize_start and self.quantize == "none":
            raise ValueError("quantize_start needs a quantize rule")
        if self.model != "embedded" and (self.quantize != "none" or self.q15_ranges):
            raise ValueError("quantize and q15_ranges are options of the embedded model, "
                             f"not of {self.model!r}")
        check(self, "threshold_parametrization", f"one of {egru.modules.THRESHOLD_PARAMETRIZATIONS}",
              lambda v: v in egru.modules.THRESHOLD_PARAMETRIZATIONS)
        check(self, "init", f"one of {egru.modules.INITS}", lambda v: v in egru.modules.INITS)
        if self.backend not in egru.available_backends():
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {egru.available_backends()}")
        # Comparisons with NaN are false: NaN is refused too.
        for name in ("dampening_factor", "pseudo_derivative_support"):
            check(self, name, "a positive number", lambda v: v > 0 and math.isfinite(v))
        for name in ("dropconnect", "zoneout"):
            check(self, name, "a number in [0, 1)", lambda v: 0 <= v < 1)


class EventCore(egru.EGRU):
    """The EGRU as a core. A subclass rather than a wrapper, so that parameter names (and so
    checkpoints) are those of ``egru.EGRU``."""

    def __init__(self, cfg: CoreConfig, input_size: int, hidden_size: int):
        super().__init__(input_size, hidden_size, dropconnect=cfg.dropconnect, zoneout=cfg.zoneout,
                         dampening_factor=cfg.dampening_factor,
                         pseudo_derivative_support=cfg.pseudo_derivative_support,
                         threshold_mean=cfg.threshold_mean, backend=cfg.backend, init=cfg.init,
                         threshold_parametrization=cfg.threshold_parametrization)

    def forward(self, x, state=None, record: bool = False):
        out = super().forward(x, state, record=record)
        return out[0], out[1], out[2][0] if record else None

    def initial_state(self, batch_size: int, like: torch.Tensor):
        zero = like.new_zeros(1, batch_size, self.hidden_size)
        return zero, zero.clone()

    def features(self, out: torch.Tensor) -> torch.Tensor:
        # The events are sparse in time: a readout of one step's events would see mostly zeros.
        return egru.functional.output_trace(out)

    def stats(self, record) -> egru.LayerStats:
        return egru.layer_stats(record)


class DenseRecord(NamedTuple):
    """What a dense core did: every unit, every step, with the nonzero weights it has."""

    steps: int  # (sample, step) pairs
    input_grad: bool  # whether its input needed a gradient
    weight_density: tuple  # fraction of nonzero entries of (W_ih, W_hh) (below 1 when pruned)


class DenseCore(nn.Module):
    """A ``torch.nn.GRU`` or ``LSTM`` whose ``weight_hh_l0`` gets a DropConnect mask per call."""

    GATES = {nn.GRU: 3, nn.LSTM: 4}

    def __init__(self, cfg: CoreConfig, input_size: int, hidden_size: int, rnn_class=nn.GRU):
        super().__init__()
        self.rnn, self.p = rnn_class(input_size, hidden_size), cfg.dropconnect
        self.gates = self.GATES[rnn_class]

    def forward(self, x, state=None, record: bool = False):
        if self.training and self.p > 0:
            # the parameter itself: a pruned weight's, whose pruning mask the forward hook then
            # applies to the dropped weight (the attribute weight_hh_l0 is set by that hook)
            name = "weight_hh_l0_orig" if hasattr(self.rnn, "weight_hh_l0_orig") else "weight_hh_l0"
            w = getattr(self.rnn, name)
            dropped = {name: w * egru.functional.dropconnect_mask(w, self.p)}
            out, state = torch.func.functional_call(self.rnn, dropped, (x, state))
        else:
            out, state = self.rnn(x, state)
        if not record:
            return out, state, None
        density = egru.prune.weight_density(self.rnn)  # of the weights the call used
        density = (density["weight_ih_l0"], density["weight_hh_l0"])
        return out, state, DenseRecord(x.shape[0] * x.shape[1], x.requires_grad, density)

    def initial_state(self, batch_size: int, like: torch.Tensor):
        zero = like.new_zeros(1, batch_size, self.rnn.hidden_size)
        return (zero, zero.clone()) if isinstance(self.rnn, nn.LSTM) else zero  # (h, c) or h

    def features(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def stats(self, record: DenseRecord) -> egru.LayerStats:
        return dense_layer_stats(self.rnn.input_size, self.rnn.hidden_size, record.steps, self.gates,
                                 record.input_grad, record.weight_density)


class EmbeddedCore(nn.Module):
    """One layer of :class:`egru.mcu.EmbeddedGRU` (in ``self.rnn``), quantisation-aware when
    ``cfg.quantize`` names a rule (from ``cfg.quantize_start`` of the training on: float
    before), its inputs clipped to Q15 with ``cfg.q15_ranges``."""

    def __init__(self, cfg: CoreConfig, input_size: int, hidden_size: int):
        super().__init__()
        self.rule = None if cfg.quantize == "none" else cfg.quantize
        self.quantize_start = cfg.quantize_start
        self.rnn = egru.mcu.EmbeddedGRU(input_size, hidden_size, clip=cfg.q15_ranges, quantize=self.rule)

    def schedule(self, progress: float) -> None:
        """Called by the harness before each training step with the fraction of training done."""
        for cell in self.rnn.cells:
            cell.quantize = self.rule if progress >= self.quantize_start else None

    def forward(self, x, state=None, record: bool = False):
        out, state = self.rnn(x, state)
        if not record:
            return out, state, None
        weight_z, weight_h = self.rnn.cells[0].weights()  # the nonzero weights it computed with
        H = self.rnn.hidden_size
        density = tuple(float(torch.cat([weight_z[:, part], weight_h[:, part]]).ne(0).float().mean())
                        for part in (slice(H, None), slice(0, H)))
        return out, state, DenseRecord(x.shape[0] * x.shape[1], x.requires_grad, density)

    def initial_state(self, batch_size: int, like: torch.Tensor):
        return like.new_zeros(1, batch_size, self.rnn.hidden_size)

    def features(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def stats(self, record: DenseRecord) -> egru.LayerStats:
        return dense_layer_stats(self.rnn.input_size, self.rnn.hidden_size, record.steps, 2,
                                 record.input_grad, record.weight_density)


class StepwiseCore(nn.Module):
    """A copy of an ``egru``, ``gru`` or ``lstm`` core computed one step at a time by modules
    NeuroBench can hook (:func:`egru.neurobench.stepwise`); inference only, no statistics."""

    def __init__(self, core: nn.Module):
        super().__init__()
        if not isinstance(core, (EventCore, DenseCore)):
            raise ValueError(f"NeuroBench measures the egru, gru and lstm cores, not {type(core).__name__}")
        self.events = isinstance(core, EventCore)
        self.net = egru.neurobench.stepwise(core if self.events else core.rnn)

    def forward(self, x, state=None, record: bool = False):
        out, state = self.net(x, state)
        return out, state, None

    def features(self, out: torch.Tensor) -> torch.Tensor:
        return EventCore.features(self, out) if self.events else out  # what the copied core reads


CORES = {
    "egru": EventCore,
    "gru": lambda cfg, i, h: DenseCore(cfg, i, h, nn.GRU),
    "lstm": lambda cfg, i, h: DenseCore(cfg, i, h, nn.LSTM),
    "embedded": EmbeddedCore,
}


def core_config(cfg, **changes) -> CoreConfig:
    """The core fields of a recipe's config (which inherits them), with ``changes``."""
    fields = {name: getattr(cfg, name) for name in CoreConfig.__dataclass_fields__}
    return CoreConfig(**{**fields, **changes})


def make_core(cfg: CoreConfig, input_size: int, hidden_size: int) -> nn.Module:
    return CORES[cfg.model](cfg, input_size, hidden_size)


def gradient_through_time(cores, x: torch.Tensor, loss_of_top) -> dict:
    """``‖∂L/∂s_t‖`` of every core of a stack at every step (:func:`egru.diagnostics.gradient_through_time`):
    ``x`` (T, B, I) enters the first core, each from its zero state; ``loss_of_top(out)`` is the
    loss of the last core's output. Returns ``{"layer0": [T norms], ...}``."""
    curves = {}
    for i, core in enumerate(cores):
        def loss_of(out, above=cores[i + 1:]):
            for later in above:
                out = later(out, None)[0]
            return loss_of_top(out)

        curves[f"layer{i}"] = egru.diagnostics.gradient_through_time(core, x, loss_of)[:, 0].tolist()
        with torch.no_grad():
            x = core(x, None)[0]
    return curves


def map_state(fn, state):
    """Apply ``fn`` to every tensor of a (nested) state, keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    items = [map_state(fn, s) for s in state]
    return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
