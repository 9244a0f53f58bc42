"""The event function ``H(v)`` with a pluggable pseudo-derivative (SPEC §1, surrogate gradient).

``H(v) = 1 if v > 0 else 0`` has zero derivative almost everywhere. Training uses a
surrogate: the forward value is the hard step, the backward pass multiplies the incoming
gradient by ``surrogate.derivative(v)``. A surrogate is any object with

* ``__call__(v) -> Tensor``: the events ``H(v)``, differentiable through the pseudo-derivative
  (``heaviside(v, self)`` for the surrogates here);
* ``derivative(v) -> Tensor``: the pseudo-derivative, elementwise;
* ``support``: half-width of the region where the derivative can be nonzero (``inf`` if
  unbounded). Units outside it and without an event pass no gradient across units; the
  sparse backward pass and the backward-activity statistic rely on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class _Heaviside(torch.autograd.Function):
    """``H(v)`` forward, ``surrogate.derivative(v)`` backward. Written with ``setup_context``
    and made of torch operations only, so that ``torch.func`` transforms (``vmap``, ``grad``,
    ``jacrev``) and double backward see through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v, surrogate):
        return (v > 0).to(v.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        v, surrogate = inputs
        ctx.save_for_backward(v)
        ctx.surrogate = surrogate

    @staticmethod
    def backward(ctx, grad_output):
        (v,) = ctx.saved_tensors
        return grad_output * ctx.surrogate.derivative(v), None


@dataclass(frozen=True)
class Triangle:
    """``dH/dv ≈ γ · max(0, 1 − k·|v|)``: a triangle of height γ and half-width 1/k.

    Args:
        dampening_factor: γ, the height (default 0.7).
        pseudo_derivative_support: k, the inverse half-width (default 1.0).
    """

    dampening_factor: float = 0.7
    pseudo_derivative_support: float = 1.0

    def __post_init__(self):
        if not self.pseudo_derivative_support > 0:
            raise ValueError(
                "pseudo_derivative_support must be > 0, got "
                f"{self.pseudo_derivative_support}"
            )
        if not self.dampening_factor >= 0:
            raise ValueError(f"dampening_factor must be >= 0, got {self.dampening_factor}")

    @property
    def support(self) -> float:
        return 1.0 / self.pseudo_derivative_support

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        k = self.pseudo_derivative_support
        return self.dampening_factor * torch.clamp(1.0 - k * v.abs(), min=0.0)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return heaviside(v, self)


@dataclass(frozen=True)
class FastSigmoid:
    """``dH/dv ≈ γ / (1 + k·|v|)²``, the SuperSpike surrogate common in spiking libraries.

    Its support is unbounded, so it gives no backward sparsity.
    """

    dampening_factor: float = 1.0
    pseudo_derivative_support: float = 10.0
    support = math.inf

    def derivative(self, v: torch.Tensor) -> torch.Tensor:
        return self.dampening_factor / (1.0 + self.pseudo_derivative_support * v.abs()) ** 2

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return heaviside(v, self)


def heaviside(v: torch.Tensor, surrogate) -> torch.Tensor:
    """``H(v)``: 1.0 where ``v > 0`` strictly, else 0.0; gradient from ``surrogate.derivative``."""
    return _Heaviside.apply(v, surrogate)
