"""``EmbeddedGRUCell`` and ``EmbeddedGRU``: the embedded eGRU's parameters, input checks and
time loop, with ``torch.nn.GRU``'s calling conventions. The math is in :mod:`.functional`."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..modules import _check_positive_int, check_input, check_state
from . import functional


class EmbeddedGRUCell(nn.Module):
    """One embedded eGRU cell (SPEC §5): ``h_t = cell(x_t, h_{t-1})``.

    Parameters: ``weight_z`` and ``weight_h`` (H, H + I), acting on ``[h_{t-1}, x_t]``, and
    ``bias_z``, ``bias_h`` (H,) when ``bias``. Initialised uniform in ``±1/√H`` as
    ``torch.nn.GRU``'s. ``quantize``: None trains in float; ``"paper"`` or ``"authors"`` (the
    two rules of :mod:`.functional`) computes with the 3-bit weights and trains the stored
    float weights straight through (quantisation-aware training). Biases stay in float.

    ``forward(x, h=None)``: ``x`` (B, I) or (I,), ``h`` of the same batch shape (zeros if None)
    → ``h_t``. Both are checked as :class:`egru.EGRUCell` checks its own (shape, dtype, device).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, quantize: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        _check_positive_int("input_size", input_size)
        _check_positive_int("hidden_size", hidden_size)
        if quantize is not None:
            functional._check_rule(quantize)
        self.input_size, self.hidden_size, self.quantize = input_size, hidden_size, quantize
        factory = {"device": device, "dtype": dtype}
        self.weight_z = nn.Parameter(torch.empty(hidden_size, hidden_size + input_size, **factory))
        self.weight_h = nn.Parameter(torch.empty(hidden_size, hidden_size + input_size, **factory))
        self.bias_z = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.bias_h = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def weights(self) -> tuple:
        """``(weight_z, weight_h)`` as the step computes with them (quantised when set)."""
        if self.quantize is None:
            return self.weight_z, self.weight_h
        return (functional.quantize(self.weight_z, self.quantize),
                functional.quantize(self.weight_h, self.quantize))

    def forward(self, x: torch.Tensor, h: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, batched = check_input(x, self.weight_z, self.input_size, step=True)
        if h is None:
            h = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            check_state("h", h, expected, self.weight_z)
            h = h if batched else h.unsqueeze(0)
        weight_z, weight_h = self.weights()
        out = functional.step(x, h, weight_z, self.bias_z, weight_h, self.bias_h)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias_z is not None}, "
                f"quantize={self.quantize!r}")


class EmbeddedGRU(nn.Module):
    """Stacked embedded eGRU layers over a sequence, with ``torch.nn.GRU``'s conventions.

    ``clip``: inputs are clamped to the Q15 range ``[−1, 1 − 2^-15]`` first, as the integer
    engine saturates them (training in the ranges the device computes in; the states and gates
    are in range by construction).

    ``forward(input, h0=None)``: ``input`` (T, B, I), (B, T, I) with ``batch_first``, or (T, I)
    unbatched; ``h0`` (num_layers, B, H) or (num_layers, H) unbatched, zeros if None. Returns
    ``(output, h_n)``: the last layer's state at every step, in the input's layout, and every
    layer's last state. Layer ``k`` is ``self.cells[k]`` (input size I for the first, H after).
    ``input`` and ``h0`` are checked as :class:`egru.EGRU` checks its own (shape, at least one
    step and one sample, dtype, device).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, quantize: Optional[str] = None, clip: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_positive_int("num_layers", num_layers)
        self.cells = nn.ModuleList(
            EmbeddedGRUCell(input_size if k == 0 else hidden_size, hidden_size, bias, quantize, device, dtype)
            for k in range(num_layers))
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.clip = batch_first, clip

    def forward(self, input: torch.Tensor, h0: Optional[torch.Tensor] = None):
        like = self.cells[0].weight_z
        x, batched = check_input(input, like, self.input_size, batch_first=self.batch_first)
        if self.clip:
            x = functional.clip_q15(x)
        B = x.shape[1]
        if h0 is None:
            h0 = x.new_zeros(self.num_layers, B, self.hidden_size)
        else:
            expected = (self.num_layers, B, self.hidden_size) if batched else (self.num_layers, self.hidden_size)
            check_state("h0", h0, expected, like)
            h0 = h0 if batched else h0.unsqueeze(1)
        states = []
        for cell, h in zip(self.cells, h0):
            weight_z, weight_h = cell.weights()  # quantised once per sequence, not per step
            outputs = []
            for x_t in x:
                h = functional.step(x_t, h, weight_z, cell.bias_z, weight_h, cell.bias_h)
                outputs.append(h)
            x = torch.stack(outputs)
            states.append(h)
        h_n = torch.stack(states)
        if not batched:
            return x.squeeze(1), h_n.squeeze(1)
        return (x.transpose(0, 1) if self.batch_first else x), h_n
