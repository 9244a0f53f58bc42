"""Exact, sparse real-time recurrent learning (RTRL) for one EGRU layer (SPEC §4).

RTRL computes the same gradient as backpropagation through time, online: instead of storing
the past it carries the influence matrix ``M_t = dĉ_t/dθ`` (per sample ``H × P``, ``P`` =
number of trained parameter entries) from step to step. Memory does not grow with the number
of steps. Usage::

    learner = egru.rtrl.RTRL(cell)            # cell: egru.EGRUCell (zoneout 0)
    learner.reset(batch_size)                 # zero state and influence, e.g. per sequence
    for x_t in xs:                            # x_t: (B, I)
        y = learner.step(x_t)                 # (B, H), a leaf with requires_grad=True
        readout_loss(y).backward()            # fills y.grad = ∂L_t/∂y_t
        learner.accumulate(y.grad)            # adds ∂L_t/∂θ (summed over the batch) into .grad
    optimizer.step()

``RTRL(cell, *, masks=None, sparse=True, train_threshold=None)``: ``masks`` maps
``"weight_ih"``/``"weight_hh"`` to 0/1 tensors of the weight's shape (1 = kept); the forward
pass uses ``weight ⊙ mask``. A cell pruned by :mod:`egru.prune` (``weight_hh_orig`` and
``weight_hh_mask``) is read automatically, its gradient goes to ``weight_hh_orig``; the masks
are taken when the learner is made (make a new learner after pruning again). Pruned entries get
a zero gradient. ``train_threshold`` defaults to ``cell.threshold.requires_grad``; weights and
biases are trained when they require a gradient. ``sparse=False`` runs the same recursion on
every row and column, for comparison. ``learner.macs`` counts the influence update's
multiply-accumulates; ``learner.influence_bytes()`` is the size of ``M``.

The math. The state is ``ĉ``: ``y_{t-1}`` and ``c_{t-1}`` are functions of ``ĉ_{t-1}`` and ϑ
(egru.functional.fire), with slopes ``D^y = ∂y/∂ĉ = e + ĉ·H'(v)``, ``D^c = ∂c/∂ĉ = 1 − ϑ·H'(v)``
and threshold terms ``∂y/∂ϑ = −ĉ·H'(v)``, ``∂c/∂ϑ = −e + ϑ·H'(v)`` (``v = ĉ − ϑ``). Then ::

    dy_{t-1}/dθ = D^y ⊙ M_{t-1} + ∂y/∂ϑ        dc_{t-1}/dθ = D^c ⊙ M_{t-1} + ∂c/∂ϑ
    M_t = (∂ĉ_t/∂y_{t-1}) · dy_{t-1}/dθ + diag(z_t) · dc_{t-1}/dθ + M̄_t
    ∂L_t/∂θ = (∂L_t/∂y_t ⊙ D^y_t) · M_t + ∂L_t/∂y_t ⊙ ∂y_t/∂ϑ

(a ϑ term sits in unit j's own threshold column only). ``M̄_t``, the immediate dependence, is
nonzero for a weight or bias of unit i's gates in row i only: ``∂ĉ_i/∂(pre-activation) × input``.

Sparsity, all exact: rows of ``dy_{t-1}/dθ`` vanish outside ``G_{t-1}`` (units with an event
or inside the surrogate's support), so the cross-unit product uses only those rows and the
Jacobian's matching columns; a weight's immediate term is formed only where its input
(``x_t`` for ``W_ih``, ``y_{t-1}`` for ``W_hh``) is nonzero; pruned weights have no column.
The own-unit term ``diag(z)`` is elementwise. For a batch the sets are padded to the largest
one, with zero Jacobian columns for the padding (``macs`` counts each sample's own set).
``accumulate`` is not counted.

MAC counting rule, per sample and step (``P`` columns; dense: ``G`` = all ``H`` units and
every weight column counted; elementwise work on ``H``-vectors is not counted):
``|G|·P`` (rows of ``D^y ⊙ M``) + ``3·H·|G|`` (Jacobian columns) + ``H·|G|·P`` (cross-unit
product) + ``H·P`` (own-unit term) + one per immediate term formed (weight columns with a
nonzero input, every bias column, a bias being a weight on the constant input 1).
"""

from __future__ import annotations

import operator

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from . import functional
from .modules import EGRUCell
from .state import EGRUState

WEIGHTS = ("weight_ih", "weight_hh")
COLUMN_BLOCK = 2 ** 18  # entries of M (over the batch) updated together: about 1 MB in float32


class _Block(NamedTuple):
    """The influence columns of one parameter."""

    param: torch.Tensor  # receives the gradient (.grad)
    offset: int  # first column in M
    entries: torch.Tensor  # (n,) flat (row-major) indices of the parameter's entries with a column
    unit: torch.Tensor  # (n,) the unit whose ĉ (or, for ϑ, whose y and c) the entry enters directly
    pre: str | None  # the pre-activation the entry enters: "gi" or "gh"; None for ϑ
    gate_row: torch.Tensor | None  # (n,) its row in gi/gh
    source: str | None  # the entry's input: "x", "y" (y_{t-1}), "1" (bias)
    source_index: torch.Tensor | None  # (n,) which input feature / unit
    mask: torch.Tensor | None  # (numel,) 0/1 pruning mask to apply to the gradient
    position: torch.Tensor | None = None  # (n,) the entry's immediate place in one sample's M, flat
    per_source: torch.Tensor | None = None  # (inputs,) how many entries each input feeds


class RTRL:
    """Online exact gradient of an :class:`egru.EGRUCell` by sparse RTRL (see module docs)."""

    def __init__(self, cell: EGRUCell, *, masks: dict[str, torch.Tensor] | None = None, sparse: bool = True,
                 train_threshold: bool | None = None):
        if not isinstance(cell, EGRUCell):
            raise TypeError(f"RTRL needs an egru.EGRUCell, got {type(cell).__name__}")
        if cell.zoneout != 0:
            raise ValueError(f"RTRL supports zoneout 0 only, the cell has {cell.zoneout}")
        if parametrize.is_parametrized(cell):
            raise ValueError("RTRL learns the cell's parameters themselves: its threshold must not be "
                             "parametrised (threshold_parametrization='projected')")
        masks = dict(masks or {})
        if set(masks) - set(WEIGHTS):
            raise ValueError(f"masks keys must be among {WEIGHTS}, got {sorted(masks)}")
        self.cell, self.sparse = cell, bool(sparse)
        self.hidden_size, self.input_size = cell.hidden_size, cell.input_size
        if train_threshold is None:
            train_threshold = cell.threshold.requires_grad
        elif train_threshold and not cell.threshold.requires_grad:
            raise ValueError("train_threshold=True but the cell's threshold does not require a gradient")
        self.weights, self.masks, self.blocks, offset = {}, {}, [], 0
        H = self.hidden_size
        for name, pre, source in (("weight_ih", "gi", "x"), ("weight_hh", "gh", "y")):
            param, mask = self._weight_and_mask(name, masks.get(name))
            self.weights[name], self.masks[name] = param, mask
            if param.requires_grad:
                keep = mask.flatten() != 0 if mask is not None else None
                entries = torch.arange(param.numel(), device=param.device)
                if self.sparse and keep is not None:
                    entries = entries[keep]  # pruned weights have no column
                row, column = entries // param.shape[1], entries % param.shape[1]
                self.blocks.append(_Block(
                    param, offset, entries, unit=row % H, pre=pre, gate_row=row, source=source,
                    source_index=column, mask=None if keep is None else keep.to(param.dtype)))
                offset += len(entries)
        for param, pre in ((cell.bias_ih, "gi"), (cell.bias_hh, "gh")):
            if param is not None and param.requires_grad:
                rows = torch.arange(3 * H, device=param.device)
                self.blocks.append(_Block(param, offset, rows, unit=rows % H, pre=pre, gate_row=rows,
                                          source="1", source_index=None, mask=None))
                offset += 3 * H
        self.threshold_offset = offset if train_threshold else None
        if train_threshold:
            units = torch.arange(H, device=cell.threshold.device)
            self.blocks.append(_Block(cell.threshold, offset, units, unit=units, pre=None,
                                      gate_row=None, source=None, source_index=None, mask=None))
            offset += H
        self.num_columns, self.macs = offset, 0
        # M̄ puts each entry's immediate term in one row, its unit's: a fixed place in (H × P)
        self.blocks = [block._replace(
            position=block.unit * offset + block.offset + torch.arange(len(block.entries), device=block.unit.device),
            per_source=None if block.source_index is None else torch.bincount(
                block.source_index, minlength=self.input_size if block.source == "x" else H))
            for block in self.blocks]
        self._influence = None  # M_t, (B, H, P); None until reset
        self._stepped = False  # a step since reset, for accumulate to take the gradient of
        self._rows = None  # room for some rows of a block of M's columns, see _blocks_of_rows

    def _weight_and_mask(self, name: str, given: torch.Tensor | None):
        """The parameter that gets the gradient, and the 0/1 mask (or None) of weight ``name``."""
        cell, pruned = self.cell, hasattr(self.cell, name + "_orig")
        param = getattr(cell, name + "_orig" if pruned else name)
        if pruned and given is not None:
            raise ValueError(f"the cell's {name} is already pruned by egru.prune; give no mask for it")
        mask = getattr(cell, name + "_mask") if pruned else given
        if mask is None:
            return param, None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(param.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask for {name} must have the weight's shape {tuple(param.shape)}, got {got}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(f"mask for {name} must hold only 0 and 1")
        return param, mask.detach().to(device=param.device, dtype=param.dtype, copy=True)

    def _weight(self, name: str) -> torch.Tensor:
        """The weight the forward pass uses: the parameter, masked where a mask is given."""
        param, mask = self.weights[name], self.masks[name]
        return param if mask is None else param * mask

    def reset(self, batch_size: int) -> None:
        """Zero state ``(y, c)`` and influence for ``batch_size`` new sequences."""
        try:  # ints, numpy and torch integers; not floats or bools
            size = operator.index(batch_size)
        except TypeError:
            size = None
        if isinstance(batch_size, bool) or size is None or size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = size
        for name in WEIGHTS:  # the columns were chosen by the pruning masks at construction
            now, then = getattr(self.cell, name + "_mask", None), self.masks[name]
            if now is not None and (then is None or not torch.equal(now.to(then.dtype), then)):
                raise RuntimeError(f"the cell's {name} pruning mask changed; make a new RTRL learner")
        ref = self.cell.threshold
        zeros = lambda *shape: torch.zeros(*shape, dtype=ref.dtype, device=ref.device)
        B, H = batch_size, self.hidden_size
        self._y, self._c = zeros(B, H), zeros(B, H)  # y_0 = c_0 = 0 do not depend on θ:
        self._dy_dchat, self._dc_dchat = zeros(B, H), zeros(B, H)  # so every slope starts at 0
        self._dy_dthreshold, self._dc_dthreshold = zeros(B, H), zeros(B, H)
        self._influence = zeros(B, H, self.num_columns)
        self._rows = self._rows_room(B)
        self._stepped = False

    # What the learner carries from one step to the next (after reset)
    _CARRIED = ("_y", "_c", "_dy_dchat", "_dc_dchat", "_dy_dthreshold", "_dc_dthreshold", "_influence")

    @property
    def state(self):
        """The cell's state ``(y, c)`` now, each (B, H)."""
        if self._influence is None:
            raise RuntimeError("call reset(batch_size) first")
        return EGRUState(self._y, self._c)

    def state_dict(self) -> dict:
        """What the learner carries between steps (state, slopes and influence), copied: a
        checkpoint taken inside a sequence continues from it exactly."""
        if self._influence is None:
            raise RuntimeError("call reset(batch_size) first")
        return {name.lstrip("_"): getattr(self, name).clone() for name in self._CARRIED}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a learner of the same cell and columns
        (:meth:`accumulate` then applies to that learner's latest step)."""
        names = {name.lstrip("_") for name in self._CARRIED}
        if set(state) != names:
            raise ValueError(f"expected the keys {sorted(names)}, got {sorted(state)}")
        ref = self.cell.threshold
        influence = state["influence"]
        if influence.dim() != 3 or influence.shape[1:] != (self.hidden_size, self.num_columns):
            raise ValueError(f"influence of shape (B, {self.hidden_size}, {self.num_columns}) expected, "
                             f"got {tuple(influence.shape)}: a learner of another cell or pruning")
        for name in self._CARRIED:
            setattr(self, name, state[name.lstrip("_")].to(device=ref.device, dtype=ref.dtype, copy=True))
        self._rows = self._rows_room(influence.shape[0])
        self._stepped = True

    def influence_bytes(self) -> int:
        """Bytes of the influence matrix held (0 before :meth:`reset`)."""
        M = self._influence
        return 0 if M is None else M.numel() * M.element_size()

    def _check(self, name: str, t, width: int) -> None:
        if self._influence is None:
            raise RuntimeError("call reset(batch_size) before step or accumulate")
        expected = (self._influence.shape[0], width)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"expected {name} of shape {expected} (batch, features), got {got}")
        if t.dtype != self._influence.dtype or t.device != self._influence.device:
            raise ValueError(f"expected {name} of dtype {self._influence.dtype} on "
                             f"{self._influence.device} (the cell's), got {t.dtype} on {t.device}")

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Advance state and influence by one input ``x`` (B, I); returns ``y_t`` (B, H) as a
        fresh leaf that requires a gradient."""
        self._check("x", x, self.input_size)
        cell = self.cell
        with torch.no_grad():
            weight_hh = self._weight("weight_hh")
            gi = F.linear(x, self._weight("weight_ih"), cell.bias_ih)
            gh = F.linear(self._y, weight_hh, cell.bias_hh)
            r, z, n = functional.gates(gi, gh)
            c_hat = functional.candidate_state(z, n, self._c)
            y, c, e = functional.fire(c_hat, cell.threshold, cell.surrogate)
            # ∂ĉ/∂(gate pre-activations), per unit, from ĉ = (1 − z)n + z·c_{t-1}:
            d_n = (1 - z) * (1 - n * n)  # n = tanh(gi_n + r ⊙ gh_n)
            d_z = (self._c - n) * z * (1 - z)  # z = σ(gi_z + gh_z)
            d_r = d_n * gh.chunk(3, dim=-1)[2] * r * (1 - r)  # r = σ(gi_r + gh_r), acts via r ⊙ gh_n
            d_gi = torch.cat([d_r, d_z, d_n], dim=-1)  # ∂ĉ_i/∂gi[gate row], (B, 3H)
            d_gh = torch.cat([d_r, d_z, d_n * r], dim=-1)  # ∂ĉ_i/∂gh[gate row]
            influence = self._carry_over(z, weight_hh, d_gh)
            self._add_immediate(influence, {"gi": d_gi, "gh": d_gh}, {"x": x, "y": self._y})
            slope = cell.surrogate.derivative(c_hat - cell.threshold)  # H'(v)
            self._dy_dchat, self._dc_dchat = e + c_hat * slope, 1 - cell.threshold * slope
            self._dy_dthreshold, self._dc_dthreshold = -c_hat * slope, cell.threshold * slope - e
            self._y, self._c, self._influence = y, c, influence
        self._stepped = True
        return y.clone().requires_grad_(True)

    def _carry_over(self, z, weight_hh, d_gh) -> torch.Tensor:
        """``(∂ĉ_t/∂y_{t-1})·dy_{t-1}/dθ + diag(z)·dc_{t-1}/dθ``: what ``M_{t-1}`` hands on,
        computed in the influence tensor itself."""
        M = self._influence
        B, H, P = M.shape
        # G_{t-1}: the units whose output depends on θ at all (D^y or the ϑ term nonzero)
        in_g = (self._dy_dchat != 0) | (self._dy_dthreshold != 0)
        if not self.sparse:
            in_g = torch.ones_like(in_g)
        sizes = in_g.sum(dim=1)
        width = int(sizes.max())
        # each sample's units of G first (padded with other units to the batch's largest set)
        units = in_g.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
        real = torch.arange(width, device=M.device) < sizes.unsqueeze(1)  # (B, width)
        slopes = self._dy_dchat.gather(1, units).unsqueeze(2)  # D^y of those rows
        # Jacobian ∂ĉ_i/∂y_j = Σ_gates d_gh[gate, i]·W_h,gate[i, j], on the columns j in G only
        w_cols = weight_hh.reshape(3, H, H)[:, :, units]  # (3, H, B, width)
        jacobian = torch.einsum("bgi,gibk->bik", d_gh.view(B, 3, H), w_cols) * real.unsqueeze(1)
        # M_{t-1} becomes M_t in place, a block of columns at a time: G's rows of the block,
        # copied out, are scaled by D^y; then the block is scaled by the own-unit term (ĉ_t
        # depends on its own c_{t-1} through z) and the product added while it is in cache.
        scale = (z * self._dc_dchat).unsqueeze(2)
        for start, stop, dy in self._blocks_of_rows(units):
            M[:, :, start:stop].mul_(scale).baddbmm_(jacobian, dy.mul_(slopes))
        if self.threshold_offset is not None:  # the ϑ columns' own terms, added to M_t
            thresholds = M[:, :, self.threshold_offset:self.threshold_offset + H]  # (B, H, H)
            # ϑ_j moves y_j (j in G) directly, which reaches ĉ_i through the Jacobian
            thresholds.scatter_add_(2, units.unsqueeze(1).expand(B, H, width),
                                    jacobian * self._dy_dthreshold.gather(1, units).unsqueeze(1))
            # ϑ_i moves c_i directly, which reaches ĉ_i through z
            thresholds.diagonal(dim1=1, dim2=2).add_(z * self._dc_dthreshold)
        g = int(sizes.sum())
        self.macs += g * P + 3 * H * g + H * g * P + B * H * P
        return M

    def _block_columns(self, batch_size: int) -> int:
        """Columns of M updated together (about COLUMN_BLOCK entries over the batch)."""
        return min(self.num_columns, max(256, COLUMN_BLOCK // (batch_size * self.hidden_size)))

    def _rows_room(self, batch_size: int) -> torch.Tensor:
        """Room for every unit's row of one block, allocated once: all the learner allocates
        is allocated by reset, so its memory cannot grow with the steps taken or with G."""
        ref = self.cell.threshold
        return torch.empty(batch_size * self.hidden_size * self._block_columns(batch_size),
                           dtype=ref.dtype, device=ref.device)

    def _blocks_of_rows(self, units: torch.Tensor):
        """For each block of M's columns: ``(start, stop, rows)``, ``rows`` (B, k, stop − start)
        a copy of the block's rows of ``units`` (B, k) (whole rows, an index per row), in the
        room made by reset: no B × H × P tensor is allocated."""
        M = self._influence
        B, H, P = M.shape
        k = units.shape[1]
        rows = (torch.arange(B, device=M.device).unsqueeze(1) * H + units).flatten()
        flat, columns = M.view(B * H, P), self._block_columns(B)
        for start in range(0, P, columns):
            stop = min(start + columns, P)
            copy = self._rows[:B * k * (stop - start)].view(B * k, stop - start)
            torch.index_select(flat[:, start:stop], 0, rows, out=copy)
            yield start, stop, copy.view(B, k, stop - start)

    def _add_immediate(self, influence, d_pre, inputs) -> None:
        """Add ``M̄_t``: entry (unit i, weight (ρ, p)) is ``∂ĉ_i/∂pre-activation_ρ · input_p``."""
        B = influence.shape[0]
        flat = influence.view(B, -1)
        for block in self.blocks:
            if block.pre is None:  # ϑ acts only through y_{t-1}, c_{t-1}: in _carry_over
                continue
            derivative = d_pre[block.pre]
            if block.source == "1":
                flat.index_add_(1, block.position, derivative[:, block.gate_row])
                self.macs += B * len(block.entries)
                continue
            source = inputs[block.source]
            if self.sparse:  # the entries whose input is nonzero in some sample of the batch
                nonzero = source != 0
                k = nonzero.any(0)[block.source_index].nonzero().squeeze(1)
                self.macs += int((nonzero.sum(0) * block.per_source).sum())  # each sample's own
            else:
                k = torch.arange(len(block.entries), device=source.device)
                self.macs += B * len(block.entries)
            values = derivative[:, block.gate_row[k]] * source[:, block.source_index[k]]
            flat.index_add_(1, block.position[k], values)

    def accumulate(self, grad_y: torch.Tensor) -> None:
        """Add ``∂L_t/∂θ``, summed over the batch, into the parameters' ``.grad``, given
        ``grad_y = ∂L_t/∂y_t`` (B, H) for the latest step; there must be one since :meth:`reset`."""
        self._check("grad_y", grad_y, self.hidden_size)
        if not self._stepped:  # the slopes are reset's zeros: the gradient would be a silent 0
            raise RuntimeError("no step since reset(batch_size): call step(x) before accumulate")
        with torch.no_grad():
            weights = grad_y * self._dy_dchat  # zero outside G_t: those rows of M are not read
            B, H = weights.shape
            units = ((weights != 0).any(0).nonzero().squeeze(1) if self.sparse
                     else torch.arange(H, device=weights.device)).expand(B, -1)
            weights = weights.gather(1, units).flatten()
            columns = weights.new_empty(self.num_columns)
            for start, stop, rows in self._blocks_of_rows(units):
                torch.mv(rows.view(-1, stop - start).t(), weights, out=columns[start:stop])
            if self.threshold_offset is not None:
                start = self.threshold_offset
                columns[start:start + self.hidden_size] += (grad_y * self._dy_dthreshold).sum(0)
            for block in self.blocks:
                flat = torch.zeros(block.param.numel(), dtype=columns.dtype, device=columns.device)
                flat.index_add_(0, block.entries, columns[block.offset:block.offset + len(block.entries)])
                if block.mask is not None:  # dense mode also has columns for pruned weights
                    flat *= block.mask
                grad = flat.view(block.param.shape)
                if block.param.grad is None:
                    block.param.grad = grad
                else:
                    block.param.grad += grad
