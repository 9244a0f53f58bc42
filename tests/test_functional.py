import torch

from egru import functional as F


def test_reverse_padded_reverses_within_each_length_and_is_an_involution():
    x = torch.arange(12.0).view(4, 3)  # (T, B)
    lengths = torch.tensor([4, 2, 1])
    r = F.reverse_padded(x, lengths)
    assert r[:, 0].tolist() == [9.0, 6.0, 3.0, 0.0]
    assert r[:, 1].tolist() == [4.0, 1.0, 7.0, 10.0]  # two real steps reversed, padding kept
    assert r[:, 2].tolist() == [2.0, 5.0, 8.0, 11.0]
    assert torch.equal(F.reverse_padded(r, lengths), x)


def test_output_trace_is_an_exponential_filter():
    y = torch.tensor([[1.0], [0.0], [2.0]])
    tr = F.output_trace(y, alpha=0.5)
    assert tr.squeeze(1).tolist() == [0.5, 0.25, 1.125]


def test_activity_penalty_has_a_gradient_through_the_surrogate():
    from egru import Triangle

    v = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    penalty = F.activity_penalty(Triangle()(v), target=0.0)
    (grad,) = torch.autograd.grad(penalty, v)
    assert (grad != 0).all()


def test_dropconnect_mask_is_rescaled():
    torch.manual_seed(0)
    m = F.dropconnect_mask(torch.ones(200, 200), 0.75)
    assert set(m.unique().tolist()) == {0.0, 4.0}
    assert abs(m.mean().item() - 1.0) < 0.05
