"""The embedded eGRU's equations (SPEC §5) and its 3-bit weight quantiser, as pure functions.

One step, for the concatenation ``u = [h_{t-1}, x_t]`` (state first, as in the paper)::

    z   = (ς(W_z u + b_z) + 1) / 2        # the update gate, in (0, 1)
    h̃  = ς(W_h u + b_h)                   # the candidate, in (−1, 1)
    h_t = (1 − z) ⊙ h_{t-1} + z ⊙ h̃

with the softsign ``ς(v) = v / (1 + |v|)``.

Weights take the values ``{0, ±¼, ±½, ±1}``, each stored as a 3-bit code: a sign and a 2-bit
magnitude ``m`` (0: zero, 1: ¼, 2: ½, 3: 1). A weight is rounded to the nearest power of two in
the log domain, clipped to 1, and set to zero when it is small. Where "small" ends differs:

=========  =================================  ===========================================
rule       zero when                          ¼ when
=========  =================================  ===========================================
paper      ``|w| ≤ 0.25`` (the paper's text)  ``0.25 < |w| < 2^-1.5`` (≈ 0.354)
authors    ``|w| < 2^-2.5`` (≈ 0.177, their   ``2^-2.5 ≤ |w| < 2^-1.5``
           code: log-domain rounding)
=========  =================================  ===========================================

and for both ``½`` when ``2^-1.5 ≤ |w| < 2^-0.5`` (≈ 0.707), ``1`` from ``2^-0.5`` on. The
paper's rule is the default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The largest |w| that becomes zero under each rule, and whether that bound itself does
QUANTIZERS = {"paper": (0.25, True), "authors": (2 ** -2.5, False)}
HALF_FROM, ONE_FROM = 2 ** -1.5, 2 ** -0.5  # where ½ and 1 begin (log-domain midpoints)


Q15_MAX = 1 - 2 ** -15  # the largest Q15 value; the smallest is −1


def softsign(v: torch.Tensor) -> torch.Tensor:
    return v / (1 + v.abs())


def clip_q15(x: torch.Tensor, low: float = -1.0) -> torch.Tensor:
    """``x`` clamped to the Q15 range ``[low, 1 − 2^-15]``, as the integer engine saturates it
    (``low = 0`` for a ReLU's outputs). The gradient is zero where a value is clipped."""
    return x.clamp(low, Q15_MAX)


def step(x: torch.Tensor, h: torch.Tensor, weight_z: torch.Tensor, bias_z, weight_h: torch.Tensor,
         bias_h) -> torch.Tensor:
    """One step of the cell: ``x`` (B, I), ``h`` (B, H), weights (H, H + I) on ``[h, x]``,
    biases (H,) or None → ``h_t`` (B, H)."""
    u = torch.cat([h, x], dim=-1)
    z = (softsign(F.linear(u, weight_z, bias_z)) + 1) / 2
    candidate = softsign(F.linear(u, weight_h, bias_h))
    return (1 - z) * h + z * candidate


def _check_rule(rule: str) -> None:
    if rule not in QUANTIZERS:
        raise ValueError(f"unknown quantisation rule {rule!r}; expected one of {sorted(QUANTIZERS)}")


def quantization_codes(weight: torch.Tensor, rule: str = "paper") -> torch.Tensor:
    """The 3-bit code of each weight, as ``sign · m`` in int8 (−3 … 3; see the module docs)."""
    _check_rule(rule)
    bound, inclusive = QUANTIZERS[rule]
    magnitude = weight.detach().abs()
    nonzero = magnitude > bound if inclusive else magnitude >= bound
    m = nonzero.to(torch.int8) + (magnitude >= HALF_FROM).to(torch.int8) + (magnitude >= ONE_FROM).to(torch.int8)
    return torch.where(weight < 0, -m, m)


def dequantize(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights of 3-bit codes: ``sign · 2^(m − 3)``, zero for ``m = 0``."""
    m = codes.abs().to(dtype)
    values = torch.where(m > 0, torch.exp2(m - 3), torch.zeros_like(m))
    return torch.where(codes < 0, -values, values)


def quantize(weight: torch.Tensor, rule: str = "paper") -> torch.Tensor:
    """The quantised weight in the forward pass, ``weight``'s gradient in the backward one
    (straight-through: the stored full-precision weights are what the optimizer trains)."""
    values = dequantize(quantization_codes(weight, rule), weight.dtype).to(weight.device)
    return weight + (values - weight).detach()
