"""One process's use of the event backend, for ``tests/test_kernel_cache.py``.

``python cache_worker.py SCENARIO DTYPES``: runs SCENARIO, for each of the comma-separated DTYPES, through the public API with
``backend="event"`` and with ``backend="reference"`` on the same parameters and data, and exits
0 after printing ``ok`` only if outputs, final states and every gradient agree. SCENARIO is
``one-layer-train`` (dense data, backward pass), ``stacked-infer`` (a second layer: sparse
input, no autograd; one sample and three) or ``stacked-train`` (sparse input and the
event-driven weight gradients).
"""

import sys

import torch

import egru

scenario, dtypes = sys.argv[1], [getattr(torch, name) for name in sys.argv[2].split(",")]
layers = 1 if scenario.startswith("one-layer") else 2
train = scenario.endswith("train")


def run(backend: str, batch: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = egru.EGRU(16, 24, num_layers=layers, backend=backend, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(6, batch, 16, generator=gen, dtype=dtype)
    if layers > 1:  # sparse data, so that the first layer's input product is event-driven too
        x = x * (torch.rand(6, batch, 16, generator=gen) < 0.1)
    if not train:
        with torch.no_grad():
            out, (y_n, c_n) = model(x)
        return [out, y_n, c_n]
    out, (y_n, c_n) = model(x.requires_grad_())
    (out.sum() + c_n.sum()).backward()
    return [out, y_n, c_n, x.grad] + [p.grad for p in model.parameters()]


for dtype in dtypes:
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for batch in (1, 3) if not train else (3,):
        for got, expected in zip(run("event", batch, dtype), run("reference", batch, dtype)):
            torch.testing.assert_close(got, expected, **tol)
print("ok")
