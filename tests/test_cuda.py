"""The layer on a CUDA device: the reference backend computes there, and ``"event"`` and
``"auto"`` (CPU kernels) hand CUDA tensors to it. Skipped without a CUDA device."""

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from egru import EGRU

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

f64 = torch.float64


def make_pair(backend, **kw):
    """The same float64 layer on the CPU (reference backend) and on the GPU (``backend``)."""
    torch.manual_seed(0)
    cpu = EGRU(5, 6, num_layers=2, bidirectional=True, dtype=f64, backend="reference", **kw)
    with torch.no_grad():  # spread the thresholds so that some units fire and some do not
        for t in cpu.thresholds():
            t.uniform_(0.0, 0.4)
    gpu = EGRU(5, 6, num_layers=2, bidirectional=True, dtype=f64, backend=backend,
               device="cuda", **kw)
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def run(layer, x, lengths, hx):
    """Output, final state and the gradients of every parameter and of x and hx."""
    device = layer.weight_ih_l0.device
    x, hx = x.to(device).requires_grad_(), tuple(h.to(device).requires_grad_() for h in hx)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out, (y_n, c_n), records = layer(packed, hx, record=True)
    out, _ = pad_packed_sequence(out)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=f64).to(device)).sum()
               for t in (out, y_n, c_n))
    loss = loss + sum(r.e.sum() for r in records)  # through the surrogate gradient too
    inputs = [x, *hx, *layer.parameters()]
    grads = torch.autograd.grad(loss, inputs)
    return [t.detach().cpu() for t in (out, y_n, c_n, *(r.e for r in records), *grads)]


@pytest.mark.parametrize("backend", ["reference", "event", "auto"])
def test_cuda_agrees_with_the_cpu_in_float64(backend):
    cpu, gpu = make_pair(backend, zoneout=0.3)
    cpu.eval(), gpu.eval()  # zoneout's evaluation form: no random masks to match across devices
    T, B = 7, 3
    x = torch.randn(T, B, 5, dtype=f64)
    hx = (torch.randn(4, B, 6, dtype=f64) * 0.3, torch.randn(4, B, 6, dtype=f64) * 0.3)
    lengths = torch.tensor([7, 4, 6])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_gpu = run(gpu, x, lengths, hx)
    expected = run(cpu, x, lengths, hx)
    assert any(e.sum() > 0 for e in on_gpu[3:5]) and not all(e.all() for e in on_gpu[3:5])
    for a, b in zip(on_gpu, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    fallback = [w for w in caught if "using the reference backend" in str(w.message)]
    # "event" says once that it computes with the reference backend; "auto" does so silently
    assert len(fallback) == (1 if backend == "event" else 0)
    if fallback:
        assert "device cuda is not supported" in str(fallback[0].message)


def test_training_masks_are_drawn_on_the_device():
    _, gpu = make_pair("auto", zoneout=0.2, dropconnect=0.3)
    gpu.train()
    x = torch.randn(6, 2, 5, dtype=f64, device="cuda")
    out, _ = gpu(x)
    out.sum().backward()
    assert out.device.type == "cuda"
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in gpu.parameters())


def test_more_processes_on_a_node_than_gpus_is_a_clear_error(monkeypatch):
    from egru.recipes.common import default_device

    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(RuntimeError, match="--nproc_per_node"):
        default_device()
