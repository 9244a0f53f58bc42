import pytest
import torch

from egru import FastSigmoid, Triangle, heaviside


def test_heaviside_is_strict_and_its_gradient_is_the_triangle():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    tri = Triangle(dampening_factor=0.7, pseudo_derivative_support=2.0)
    e = tri(v)
    assert e.tolist() == [0, 0, 0, 1, 1, 1]
    (grad,) = torch.autograd.grad(e.sum(), v)
    expected = [0.7 * max(0.0, 1 - 2.0 * abs(x)) for x in v.tolist()]
    assert grad.tolist() == pytest.approx(expected, abs=1e-15)
    assert tri.support == 0.5


def test_a_surrogate_is_pluggable():
    v = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
    fs = FastSigmoid(dampening_factor=1.0, pseudo_derivative_support=10.0)
    (grad,) = torch.autograd.grad(heaviside(v, fs).sum(), v)
    torch.testing.assert_close(grad, 1 / (1 + 10 * v.detach().abs()) ** 2)


@pytest.mark.parametrize("kwargs", [dict(pseudo_derivative_support=0.0), dict(dampening_factor=-1.0)])
def test_triangle_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Triangle(**kwargs)
