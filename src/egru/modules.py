"""``EGRU`` and ``EGRUCell``: ``torch.nn.GRU``-named parameters plus thresholds, input checks,
and one backend call per layer and direction. The math is in :mod:`egru.functional`."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import backends, functional
from .state import EGRUState, LayerRecord
from .surrogate import Triangle

THRESHOLD_INITS = ("beta", "sigmoid")
INITS = ("gru", "evnn")  # weights and biases: torch.nn.GRU's, or the EGRU authors' code's
THRESHOLD_PARAMETRIZATIONS = ("projected", "sigmoid")


def _check_probability(name: str, p: float) -> None:
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise ValueError(f"{name} must be a probability in [0, 1), got {p!r}")


def _check_like(name: str, t: torch.Tensor, ref: torch.Tensor) -> None:
    """No silent casts or copies: inputs and states must match the parameters' dtype and device."""
    if t.dtype != ref.dtype:
        raise TypeError(f"expected {name} of dtype {ref.dtype} (the layer's), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"expected {name} on device {ref.device} (the layer's), got {t.device}")


def check_input(x, like: torch.Tensor, features: int, *, step: bool = False,
                batch_first: bool = False) -> tuple[torch.Tensor, bool]:
    """Check a layer's input and return it with a batch axis, time first for a sequence,
    together with whether it had one. Every layer of the package checks its input here, so
    that all refuse the same inputs with the same errors.

    A sequence is ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, or ``(T, I)`` unbatched,
    with at least one step and one sample; one step (``step=True``) is ``(B, I)`` or ``(I,)``.
    ``I`` must be ``features``, the dtype and device those of ``like`` (a parameter of the
    layer). Raises TypeError for a non-tensor or a wrong dtype, ValueError otherwise.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected input to be a Tensor, got {type(x).__name__}")
    if step:
        dims, layout = (1, 2), "(B, I) or (I,)"
    else:
        dims, layout = (2, 3), ("(B, T, I)" if batch_first else "(T, B, I)") + " or (T, I) unbatched"
    if x.dim() not in dims:
        raise ValueError(f"expected input of shape {layout}, got {x.dim()} dimensions with shape {tuple(x.shape)}")
    _check_like("input", x, like)
    batched = x.dim() == dims[1]
    if step:
        x = x if batched else x.unsqueeze(0)
    else:
        x = (x.transpose(0, 1) if batch_first else x) if batched else x.unsqueeze(1)
        T, B = x.shape[:2]
        if T == 0 or B == 0:
            raise ValueError(f"expected a non-empty sequence, got {T} steps and batch size {B}")
    if x.shape[-1] != features:
        raise ValueError(f"expected input with {features} features, got {x.shape[-1]}")
    return x, batched


def check_state(name: str, t, shape: tuple, like: torch.Tensor) -> None:
    """Check one given state tensor, ``name`` in the errors: of ``shape``, and of the dtype and
    on the device of ``like`` (a parameter of the layer), as :func:`check_input` checks inputs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected {name} to be a Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"expected {name} of shape {tuple(shape)}, got {tuple(t.shape)}")
    _check_like(name, t, like)


def _check_positive_int(name: str, n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")


def _check_cell_arguments(input_size, hidden_size, threshold_mean, threshold_init, zoneout, init="gru",
                          threshold_parametrization="projected") -> None:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if threshold_parametrization not in THRESHOLD_PARAMETRIZATIONS:
        raise ValueError(f"threshold_parametrization must be one of {THRESHOLD_PARAMETRIZATIONS}, "
                         f"got {threshold_parametrization!r}")
    _check_positive_int("input_size", input_size)
    _check_positive_int("hidden_size", hidden_size)
    _check_probability("zoneout", zoneout)
    if not 0 < threshold_mean < 1:
        raise ValueError(f"threshold_mean must be in (0, 1), got {threshold_mean!r}")
    if threshold_init not in THRESHOLD_INITS:
        raise ValueError(f"threshold_init must be one of {THRESHOLD_INITS}, got {threshold_init!r}")


def init_thresholds_(threshold: torch.Tensor, mean: float, method: str = "beta") -> torch.Tensor:
    """Fill ``threshold`` in place (SPEC §1, thresholds).

    ``"beta"``: ``ϑ ~ Beta(α, 3)`` with ``α = 3m/(1 − m)``, so that ``E[ϑ] = m``.
    ``"sigmoid"``: ``ϑ = sigmoid(θ)``, ``θ ~ N(m, √2)``.
    """
    with torch.no_grad():
        if method == "beta":
            alpha = 3 * mean / (1 - mean)
            # drawn on the CPU whatever the threshold's device (the meta device included)
            beta = torch.distributions.Beta(torch.tensor(alpha, dtype=torch.float64, device="cpu"),
                                            torch.tensor(3.0, dtype=torch.float64, device="cpu"))
            threshold.copy_(beta.sample(threshold.shape))
        elif method == "sigmoid":
            threshold.copy_(torch.sigmoid(torch.randn_like(threshold) * math.sqrt(2) + mean))
        else:
            raise ValueError(f"threshold_init must be one of {THRESHOLD_INITS}, got {method!r}")
    return threshold


class SigmoidThreshold(nn.Module):
    """``ϑ = σ(θ)``: a threshold trained through an unbounded parameter ``θ`` (the EGRU authors'
    first code), a :mod:`torch.nn.utils.parametrize` parametrisation of ``threshold*``."""

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(theta)

    def right_inverse(self, threshold: torch.Tensor) -> torch.Tensor:
        return torch.logit(threshold.clamp(1e-6, 1 - 1e-6))


class _ThresholdMixin:
    """Thresholds live in [0, 1]: a projection applied after each optimiser step
    (``threshold_parametrization="projected"``), or by construction (``"sigmoid"``:
    :class:`SigmoidThreshold`, where nothing is projected)."""

    def thresholds(self) -> list[nn.Parameter]:
        """The projected thresholds (none where they are parametrised)."""
        return [p for name, p in self.named_parameters() if name.startswith("threshold")]

    def _parametrize_thresholds(self, parametrization: str) -> None:
        if parametrization == "sigmoid":
            for name in [name for name, _ in self.named_parameters() if name.startswith("threshold")]:
                parametrize.register_parametrization(self, name, SigmoidThreshold())

    def _init_weights(self, name: str, param: torch.Tensor) -> None:
        """One weight or bias by ``self.init``: ``"gru"``, U(−1/√H, 1/√H) as ``torch.nn.GRU``
        draws it (in row-major order whatever the layout); ``"evnn"``, Xavier-normal weights
        (``std = √(2 / (fan_in + fan_out))`` over the whole matrix, three gates stacked) and
        zero biases, as the authors' code (a unit on blank input then stays at ``ĉ = 0``)."""
        with torch.no_grad():
            if self.init == "evnn":
                if name.startswith("weight"):
                    fan_out, fan_in = param.shape
                    std = math.sqrt(2.0 / (fan_in + fan_out))
                    param.copy_(torch.empty(param.shape, dtype=param.dtype, device=param.device).normal_(0, std))
                else:
                    param.zero_()
                return
            bound = 1.0 / math.sqrt(self.hidden_size)
            param.copy_(torch.empty(param.shape, dtype=param.dtype, device=param.device).uniform_(-bound, bound))

    def project_thresholds_(self) -> None:
        """Clamp every threshold to [0, 1] in place. Call it after ``optimizer.step()``."""
        with torch.no_grad():
            for threshold in self.thresholds():
                threshold.clamp_(0.0, 1.0)


def keep_thresholds_in_range(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register a hook that projects the thresholds of every EGRU in ``model`` after each step.

    Returns the hook handle (``handle.remove()`` undoes it).
    """
    layers = [m for m in model.modules() if isinstance(m, _ThresholdMixin)]

    def project(*_):
        for layer in layers:
            layer.project_thresholds_()

    return optimizer.register_step_post_hook(project)


def _column_major(rows: int, cols: int, factory: dict) -> nn.Parameter:
    """A (rows, cols) weight stored column by column. The event kernels read the transposed
    weights row by row (one row per unit that fired); with this layout ``w.t()`` is that
    without a copy, so no transposed copy needs to be kept and checked against the weights.
    Matrix products take either layout at the same speed; ``state_dict`` loads keep it."""
    return nn.Parameter(torch.empty(cols, rows, **factory).t())


class EGRU(_ThresholdMixin, nn.Module):
    r"""Event-based GRU over sequences, with the ``torch.nn.GRU`` contract (SPEC §1).

    Each unit emits an event when its candidate state crosses its threshold; units and layers
    communicate only through the events' values ``y``. Both ``y`` and the internal state ``c``
    are state, so ``hx`` is a pair like ``torch.nn.LSTM``'s.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
        device, dtype: as in ``torch.nn.GRU``.

    Keyword-only args:
        dampening_factor: height γ of the default triangle surrogate.
        pseudo_derivative_support: k, inverse half-width of the triangle.
        threshold_mean: mean of the initial thresholds (in (0, 1)).
        threshold_init: ``"beta"`` (default) or ``"sigmoid"``, see :func:`init_thresholds_`.
        threshold_parametrization: ``"projected"`` (default: the thresholds are parameters,
            kept in [0, 1] by :func:`keep_thresholds_in_range`) or ``"sigmoid"`` (``ϑ = σ(θ)``,
            ``θ`` the parameter ``parametrizations.threshold_*.original``).
        init: ``"gru"`` (default: ``torch.nn.GRU``'s uniform weights and biases) or ``"evnn"``
            (Xavier-normal weights, zero biases, as the authors' code).
        zoneout: probability p of zoneout on the internal state.
        dropconnect: probability of dropping a recurrent weight (one mask per call).
        surrogate: a surrogate object (see :mod:`egru.surrogate`); overrides the two
            triangle arguments.
        backend: how layers are computed: ``"auto"`` (default: per call the faster of the
            event-driven kernels and dense products), ``"event"`` or ``"reference"`` (plain
            PyTorch over a time loop); see :mod:`egru.backends`.

    Inputs: ``input, hx=None``
        input: ``(T, B, I)``, ``(B, T, I)`` with ``batch_first``, ``(T, I)`` unbatched, or a
        ``PackedSequence``. hx: ``(y_0, c_0)``, each ``(num_layers·D, B, H)`` (``(num_layers·D, H)``
        unbatched); zeros if omitted.

    Outputs: ``output, (y_n, c_n)`` and, with ``record=True``, a list of
        :class:`~egru.state.LayerRecord` (one per layer) as a third element.
        output: the last layer's ``y`` at every step, directions concatenated. ``(y_n, c_n)``:
        the final state of every layer and direction, an :class:`~egru.state.EGRUState`.

    Random numbers are drawn in a fixed order, so every backend sees the same masks under the
    same seed: per layer, per direction, the DropConnect mask then the zoneout masks; then the
    dropout on that layer's output.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        dampening_factor: float = 0.7,
        pseudo_derivative_support: float = 1.0,
        threshold_mean: float = 0.3,
        threshold_init: str = "beta",
        threshold_parametrization: str = "projected",
        init: str = "gru",
        zoneout: float = 0.0,
        dropconnect: float = 0.0,
        surrogate=None,
        backend: str = "auto",
    ):
        super().__init__()
        _check_cell_arguments(input_size, hidden_size, threshold_mean, threshold_init, zoneout, init,
                              threshold_parametrization)
        _check_positive_int("num_layers", num_layers)
        _check_probability("dropout", dropout)
        _check_probability("dropconnect", dropconnect)
        self._layer_fn = backends.resolve(backend)
        self.backend = self._layer_fn.name
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.zoneout = float(zoneout)
        self.dropconnect = float(dropconnect)
        self.threshold_mean = threshold_mean
        self.threshold_init = threshold_init
        self.init = init
        self.surrogate = surrogate or Triangle(dampening_factor, pseudo_derivative_support)

        factory = {"device": device, "dtype": dtype}
        H, D = hidden_size, self.num_directions
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else H * D
            for suffix in self._suffixes:
                k = f"l{layer}{suffix}"
                self.register_parameter(f"weight_ih_{k}", _column_major(3 * H, layer_input, factory))
                self.register_parameter(f"weight_hh_{k}", _column_major(3 * H, H, factory))
                if bias:
                    self.register_parameter(f"bias_ih_{k}", nn.Parameter(torch.empty(3 * H, **factory)))
                    self.register_parameter(f"bias_hh_{k}", nn.Parameter(torch.empty(3 * H, **factory)))
                self.register_parameter(f"threshold_{k}", nn.Parameter(torch.empty(H, **factory)))
        self.reset_parameters()
        self._parametrize_thresholds(threshold_parametrization)

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def reset_parameters(self) -> None:
        """Weights and biases by ``init`` (:meth:`_init_weights`); thresholds per ``threshold_init``
        (a sigmoid-parametrised one through its inverse, ``θ = logit(ϑ)``)."""
        for name, param in self.named_parameters():
            if name.startswith("threshold"):
                init_thresholds_(param, self.threshold_mean, self.threshold_init)
            elif not name.startswith("parametrizations."):
                self._init_weights(name, param)
        for name in getattr(self, "parametrizations", {}):
            drawn = init_thresholds_(torch.empty_like(getattr(self, name)), self.threshold_mean, self.threshold_init)
            with torch.no_grad():
                setattr(self, name, drawn)

    def _layer_params(self, layer: int, suffix: str):
        k = f"l{layer}{suffix}"
        get = lambda name: getattr(self, f"{name}_{k}", None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("threshold")

    def _pruning_masks(self, layer: int, suffix: str) -> dict:
        """The pruning masks of the layer's weights (``weight_ih_mask``, ``weight_hh_mask``;
        None for a weight that is not pruned), as :mod:`torch.nn.utils.prune` keeps them: the
        backend may take their zeros as structural (:mod:`egru.backends`)."""
        masks = {}
        for kind in ("weight_ih", "weight_hh"):
            name = f"{kind}_l{layer}{suffix}"
            pruned = name + "_orig" in self._parameters and name + "_mask" in self._buffers
            masks[kind + "_mask"] = self._buffers[name + "_mask"] if pruned else None
        return masks

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for name, default in (("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False), ("zoneout", 0.0), ("dropconnect", 0.0)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s + f", surrogate={self.surrogate}, backend={self.backend!r}"

    # --- conversion with torch.nn.GRU -------------------------------------------------------

    @classmethod
    def from_gru(cls, gru: nn.GRU, threshold: Union[None, float, torch.Tensor] = None, **kwargs) -> "EGRU":
        """An EGRU with ``gru``'s weights, gate for gate (same gate order and algebra); of a
        pruned GRU (:mod:`egru.prune`), the masked weights, as plain parameters.

        ``threshold``: None initialises thresholds as usual; a number or an (H,) tensor sets
        every layer's. ``kwargs`` go to the constructor (surrogate, zoneout, ...).
        """
        if getattr(gru, "proj_size", 0):
            raise ValueError("GRUs with proj_size are not supported")
        weight = _effective_weight(gru, "weight_ih_l0")
        layer = cls(gru.input_size, gru.hidden_size, gru.num_layers, gru.bias, gru.batch_first,
                    gru.dropout, gru.bidirectional, device=weight.device, dtype=weight.dtype, **kwargs)
        _copy_gru_weights(gru, layer)
        if threshold is not None:
            with torch.no_grad():
                for t in layer.thresholds():
                    t.copy_(torch.as_tensor(threshold, dtype=t.dtype).expand_as(t))
        return layer

    def to_gru(self) -> nn.GRU:
        """A ``torch.nn.GRU`` with this layer's weights and biases (thresholds are dropped; a
        pruned layer's masked weights, as plain parameters)."""
        weight = _effective_weight(self, "weight_ih_l0")
        gru = nn.GRU(self.input_size, self.hidden_size, self.num_layers, self.bias, self.batch_first,
                     self.dropout, self.bidirectional, device=weight.device, dtype=weight.dtype)
        _copy_gru_weights(self, gru)
        return gru

    # --- forward ------------------------------------------------------------------------------

    def forward(self, input, hx: Optional[tuple] = None, *, record: bool = False):
        packed = isinstance(input, PackedSequence)
        if packed:
            x, lengths = pad_packed_sequence(input)  # time-major, original batch order
        elif isinstance(input, torch.Tensor):
            x, lengths = input, None
        else:
            raise TypeError(f"expected input to be a Tensor or PackedSequence, got {type(input).__name__}")
        x, batched = check_input(x, self.weight_ih_l0, self.input_size,
                                 batch_first=self.batch_first and not packed)
        state = self._initial_state(hx, x.shape[1], batched, x)

        output, final, records = self._run_layers(x, state, lengths, record)

        if packed:
            output = _repack(output, lengths, input)
        elif not batched:
            output = output.squeeze(1)
            final = EGRUState(final.y.squeeze(1), final.c.squeeze(1))
        elif self.batch_first:
            output = output.transpose(0, 1)
        return (output, final, records) if record else (output, final)

    def _run_layers(self, x, state: EGRUState, lengths, record: bool):
        finals, records = [], []
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(self._suffixes):
                w_ih, w_hh, b_ih, b_hh, threshold = self._layer_params(layer, suffix)
                if self.training and self.dropconnect > 0:
                    w_hh = w_hh * functional.dropconnect_mask(w_hh, self.dropconnect)
                zoneout_mask = None
                if self.training and self.zoneout > 0:
                    zoneout_mask = torch.empty(
                        x.shape[0], x.shape[1], self.hidden_size, dtype=x.dtype, device=x.device
                    ).bernoulli_(1 - self.zoneout)
                index = layer * self.num_directions + d
                outputs.append(self._layer_fn(
                    x, state.layer(index), w_ih, w_hh, b_ih, b_hh, threshold, self.surrogate,
                    lengths=lengths, zoneout_p=self.zoneout, zoneout_mask=zoneout_mask,
                    reverse=d == 1, **self._pruning_masks(layer, suffix),
                ))
            y = _join_directions([o.y for o in outputs])
            finals.extend(o.state for o in outputs)
            if record:
                records.append(self._record(layer, x, state, outputs, lengths))
            if self.training and self.dropout > 0 and layer < self.num_layers - 1:
                y = nn.functional.dropout(y, self.dropout, training=True)
            x = y
        return x, EGRUState.stack(finals), records

    def _record(self, layer: int, x, state: EGRUState, outputs, lengths) -> LayerRecord:
        T, B = x.shape[:2]
        with torch.no_grad():
            # the first layer's input product is dense; a stacked layer's follows its input's events
            active_inputs = torch.ones_like(x, dtype=torch.bool) if layer == 0 else x != 0
            recurrent, forward, backward, nonzeros, entries = [], [], [], torch.zeros(2), torch.zeros(2)
            for d, (out, suffix) in enumerate(zip(outputs, self._suffixes)):
                w_ih, w_hh, _, _, threshold = self._layer_params(layer, suffix)
                # what an event costs: the nonzero weights its input or unit sends (3H if unpruned)
                ih_cost, hh_cost = ((w != 0).sum(0).double() for w in (w_ih, w_hh))
                nonzeros += torch.stack([ih_cost.sum(), hh_cost.sum()]).cpu()
                entries += torch.tensor([w_ih.numel(), w_hh.numel()], dtype=torch.float)
                # in processing order: units that fired at the previous step (y_0 for the first),
                # and units in G_{t-1} (fired or inside the surrogate's support; none before t = 0)
                order = (lambda a: functional.reverse_padded(a, lengths)) if d == 1 else (lambda a: a)
                fired, c_hat = order(out.e) != 0, order(out.c_hat)
                y0 = state.layer(layer * self.num_directions + d).y
                prev = torch.cat([(y0 != 0).unsqueeze(0), fired[:-1]])
                in_g = fired | ((c_hat - threshold.detach()).abs() < self.surrogate.support)
                prev_g = torch.cat([torch.zeros_like(in_g[:1]), in_g[:-1]])
                recurrent.append(order(prev.sum(-1)))
                inputs = active_inputs.double() @ ih_cost  # (T, B), in the input's order
                recurrent_macs = order(prev.double() @ hh_cost)
                forward.append(inputs + recurrent_macs)
                # W_hᵀδ at G_{t-1}, ΔW_h over A_{t-1}, ΔW_i over the active inputs, and W_iᵀδ
                # where the input needs a gradient (a stacked layer's, or data that asks for one)
                input_grad = ih_cost.sum() if layer > 0 or x.requires_grad else 0.0
                backward.append(order(prev_g.double() @ hh_cost) + recurrent_macs + inputs + input_grad)
        return LayerRecord(
            e=_join_directions([o.e for o in outputs]),
            c_hat=_join_directions([o.c_hat for o in outputs]),
            threshold=torch.cat([self._layer_params(layer, s)[4].detach() for s in self._suffixes]),
            valid=functional.valid_steps(lengths, T, B, x.device),
            input_active=active_inputs.sum(-1),
            recurrent_active=torch.stack(recurrent, dim=-1),
            input_size=x.shape[-1],
            hidden_size=self.hidden_size,
            support=self.surrogate.support,
            forward_macs=torch.stack(forward, dim=-1).round().long(),
            backward_macs=torch.stack(backward, dim=-1).round().long(),
            weight_density=nonzeros / entries,
            input_grad=layer > 0 or x.requires_grad,
        )

    # --- checks -------------------------------------------------------------------------------

    def _initial_state(self, hx, B: int, batched: bool, x) -> EGRUState:
        LD, H = self.num_layers * self.num_directions, self.hidden_size
        if hx is None:
            return EGRUState.zeros(LD, B, H, dtype=x.dtype, device=x.device)
        if isinstance(hx, torch.Tensor) or not isinstance(hx, (tuple, list)) or len(hx) != 2:
            got = "a single tensor" if isinstance(hx, torch.Tensor) else f"{type(hx).__name__}"
            if isinstance(hx, (tuple, list)):
                got = f"a sequence of {len(hx)}"
            raise ValueError(f"expected hx to be a pair (y_0, c_0), got {got}")
        expected = (LD, B, H) if batched else (LD, H)
        for name, t in zip(("y_0", "c_0"), hx):
            check_state(name, t, expected, self.weight_ih_l0)
        y0, c0 = hx
        return EGRUState(y0, c0) if batched else EGRUState(y0.unsqueeze(1), c0.unsqueeze(1))


def _join_directions(tensors: list) -> torch.Tensor:
    """Per-direction tensors (T, B, H) side by side on the feature axis; one direction is
    passed through as it is (a concatenation would copy it)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=-1)


def _repack(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence) -> PackedSequence:
    """Pack a padded time-major output with the batch order and sizes of the input ``like``."""
    order = like.sorted_indices
    if order is not None:
        output, lengths = output.index_select(1, order), lengths[order.cpu()]
    data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


class EGRUCell(_ThresholdMixin, nn.Module):
    """One EGRU step, for streaming and online learning: ``(y, c) = cell(x, (y, c))``.

    Parameters are named like ``torch.nn.GRUCell``'s (``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh``) plus ``threshold``. ``x`` is ``(B, I)`` or ``(I,)``; the state
    ``(y, c)``, each ``(B, H)`` or ``(H,)``, defaults to zeros. Zoneout draws a fresh mask
    every call in training mode. The keyword arguments mean what they mean for :class:`EGRU`.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        dampening_factor: float = 0.7,
        pseudo_derivative_support: float = 1.0,
        threshold_mean: float = 0.3,
        threshold_init: str = "beta",
        threshold_parametrization: str = "projected",
        init: str = "gru",
        zoneout: float = 0.0,
        surrogate=None,
    ):
        super().__init__()
        _check_cell_arguments(input_size, hidden_size, threshold_mean, threshold_init, zoneout, init,
                              threshold_parametrization)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.zoneout = float(zoneout)
        self.threshold_mean, self.threshold_init, self.init = threshold_mean, threshold_init, init
        self.surrogate = surrogate or Triangle(dampening_factor, pseudo_derivative_support)
        factory = {"device": device, "dtype": dtype}
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H, **factory))
        self.bias_ih = nn.Parameter(torch.empty(3 * H, **factory)) if bias else None
        self.bias_hh = nn.Parameter(torch.empty(3 * H, **factory)) if bias else None
        self.threshold = nn.Parameter(torch.empty(H, **factory))
        self.reset_parameters()
        self._parametrize_thresholds(threshold_parametrization)

    reset_parameters = EGRU.reset_parameters

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bias={self.bias}, zoneout={self.zoneout}, surrogate={self.surrogate}"

    def forward(self, x: torch.Tensor, state: Optional[tuple] = None) -> EGRUState:
        x, batched = check_input(x, self.weight_ih, self.input_size, step=True)
        B, H = x.shape[0], self.hidden_size
        if state is None:
            state = EGRUState.zeros(B, H, dtype=x.dtype, device=x.device)
        else:
            if isinstance(state, torch.Tensor) or not isinstance(state, (tuple, list)) or len(state) != 2:
                raise ValueError("expected state to be a pair (y, c)")
            expected = (B, H) if batched else (H,)
            for name, t in zip(("y", "c"), state):
                check_state(f"state {name}", t, expected, self.weight_ih)
            state = EGRUState(*(t if batched else t.unsqueeze(0) for t in state))
        mask = None
        if self.training and self.zoneout > 0:
            mask = torch.empty(B, H, dtype=x.dtype, device=x.device).bernoulli_(1 - self.zoneout)
        step = functional.egru_cell(x, state, self.weight_ih, self.weight_hh, self.bias_ih,
                                    self.bias_hh, self.threshold, self.surrogate, self.zoneout, mask)
        new = step.state
        return new if batched else EGRUState(new.y.squeeze(0), new.c.squeeze(0))


def _effective_weight(module: nn.Module, name: str) -> torch.Tensor:
    """The weight a module computes with: for a pruned one (``name_orig`` and ``name_mask``, as
    :mod:`torch.nn.utils.prune` keeps them) their product, which the attribute ``name`` holds
    only as of the last forward pass."""
    if hasattr(module, name + "_orig"):
        return getattr(module, name + "_orig") * getattr(module, name + "_mask")
    return getattr(module, name)


def _copy_gru_weights(source: nn.Module, target: nn.Module) -> None:
    """``target``'s ``torch.nn.GRU``-named weights and biases set to ``source``'s (layouts kept)."""
    with torch.no_grad():
        for name in _gru_parameter_names(target):
            getattr(target, name).copy_(_effective_weight(source, name))


def _gru_parameter_names(module: nn.Module) -> list:
    """Weight and bias names of every layer and direction, as ``torch.nn.GRU`` has them."""
    suffixes = ["", "_reverse"] if module.bidirectional else [""]
    kinds = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
    return [f"{kind}_l{layer}{suffix}" for layer in range(module.num_layers)
            for suffix in suffixes for kind in kinds]
