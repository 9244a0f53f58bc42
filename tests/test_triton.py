"""The Triton backend against the reference: outputs, events, final state and every gradient,
in float64 (1e-10) and float32 (1e-5), for every feature a layer call has (state in and out,
packed sequences, reverse direction, zoneout in training and evaluation, no biases) and through
the module (layers, directions, DropConnect). Without a GPU the kernels run in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1), so these prove them on the CPU."""

from __future__ import annotations

import pytest
import torch

import egru
from egru import backends
from egru.state import EGRUState
from egru.surrogate import Triangle

triton_event = pytest.importorskip("egru.kernels.triton_event", reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def layer_inputs(T=6, B=3, I=4, H=40, dtype=torch.float64, bias=True, seed=0):
    """Inputs of one layer call with gradients; weights scaled so that about half the units fire
    (H = 40 spans two blocks of units and three of a sparse product)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) * 2 - 1) * scale).to(DEVICE, dtype)

    tensors = dict(x=rand(T, B, I, scale=2.0), y0=rand(B, H) * (rand(B, H) > 0), c0=rand(B, H, scale=0.5),
                   weight_ih=rand(3 * H, I, scale=0.8), weight_hh=rand(3 * H, H, scale=0.5),
                   bias_ih=rand(3 * H, scale=0.3) if bias else None, bias_hh=rand(3 * H, scale=0.3) if bias else None,
                   threshold=(rand(H) * 0.5 + 0.5) * 0.4)
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(True)
    return tensors


def run_layer(backend, tensors, surrogate=Triangle(0.7, 1.5), **kwargs):
    t = tensors
    out = backend(t["x"], EGRUState(t["y0"], t["c0"]), t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
                  t["threshold"], surrogate, **kwargs)
    return out


def compare(tensors, dtype, seed=1, **kwargs):
    """Both backends on the same call; random gradients at every output (y, c_hat, e, final
    state); returns the largest difference of outputs and of gradients, and the activity."""
    outs = {}
    for name, backend in (("reference", backends.Reference()), ("triton", backends.Triton())):
        for t in tensors.values():
            if t is not None:
                t.grad = None
        out = run_layer(backend, tensors, **kwargs)
        g = torch.Generator().manual_seed(seed)
        seeds = [torch.randn(a.shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
                 for a in (out.y, out.c_hat, out.e, out.state.y, out.state.c)]
        loss = sum((a * s).sum() for a, s in zip((out.y, out.c_hat, out.e, out.state.y, out.state.c), seeds))
        loss.backward()
        outs[name] = (out, {k: t.grad.clone() for k, t in tensors.items() if t is not None})
    (ref, ref_grads), (tri, tri_grads) = outs["reference"], outs["triton"]
    assert torch.equal(ref.e, tri.e), "the events differ"
    forward = max(float((a - b).detach().abs().max()) for a, b in zip(
        (ref.y, ref.c_hat, ref.state.y, ref.state.c), (tri.y, tri.c_hat, tri.state.y, tri.state.c)))
    grads = {k: float((ref_grads[k] - tri_grads[k]).abs().max() / (1 + ref_grads[k].abs().max()))
             for k in ref_grads}
    return forward, grads, float(ref.e.detach().mean())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("options", [
    {},
    {"lengths": [6, 2, 0]},
    {"reverse": True, "lengths": [3, 6, 5]},
    {"zoneout_p": 0.3, "zoneout_mask": "train"},
    {"zoneout_p": 0.3},
    {"bias": False},
], ids=["plain", "lengths", "reverse-lengths", "zoneout-train", "zoneout-eval", "no-bias"])
def test_layer_equals_the_reference(dtype, options):
    options = dict(options)
    tensors = layer_inputs(dtype=dtype, bias=options.pop("bias", True))
    T, B, H = tensors["x"].shape[0], tensors["x"].shape[1], tensors["threshold"].shape[0]
    if options.get("zoneout_mask") == "train":
        g = torch.Generator().manual_seed(3)
        options["zoneout_mask"] = (torch.rand(T, B, H, generator=g) > 0.3).to(DEVICE, dtype)
    if "lengths" in options:
        options["lengths"] = torch.tensor(options["lengths"])
    forward, grads, activity = compare(tensors, dtype, **options)
    assert 0.1 < activity < 0.9  # events and silent units both
    assert forward <= TOLERANCE[dtype]
    assert max(grads.values()) <= TOLERANCE[dtype], grads


def test_a_wrong_gradient_is_caught():
    """The comparison can fail: a surrogate of another height changes the gradients."""
    tensors = layer_inputs()
    reference = run_layer(backends.Reference(), tensors)
    tri = run_layer(backends.Triton(), tensors, surrogate=Triangle(0.5, 1.5))
    (g_ref,) = torch.autograd.grad(reference.y.sum(), tensors["weight_hh"])
    (g_tri,) = torch.autograd.grad(tri.y.sum(), tensors["weight_hh"])
    assert torch.equal(reference.e, tri.e) and (g_ref - g_tri).abs().max() > 1e-3


def test_the_module_with_layers_directions_and_dropconnect():
    """egru.EGRU with backend="triton": two bidirectional layers, DropConnect and zoneout in
    training, a state in, packed sequences; equal to the reference module with the same masks."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, dtype=torch.float64, threshold_mean=0.2, zoneout=0.2,
                  dropconnect=0.3)
    ref = egru.EGRU(3, 12, backend="reference", **kwargs).to(DEVICE)
    tri = egru.EGRU(3, 12, backend="triton", **kwargs).to(DEVICE)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(7, 2, 3, dtype=torch.float64, device=DEVICE)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([7, 4]))
    results = []
    for model in (ref, tri):
        torch.manual_seed(5)  # the same DropConnect and zoneout masks
        out, state = model(packed)
        loss = torch.nn.utils.rnn.pad_packed_sequence(out)[0].pow(2).sum() + state[1].sum()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((torch.nn.utils.rnn.pad_packed_sequence(out)[0], grads))
    (out_ref, g_ref), (out_tri, g_tri) = results
    assert (out_ref - out_tri).abs().max() <= 1e-10
    for a, b in zip(g_ref, g_tri):
        assert (a - b).abs().max() <= 1e-10 * (1 + a.abs().max())


def test_what_it_cannot_compute_falls_back_with_one_warning():
    tensors = layer_inputs(T=3, H=5)
    backend = backends.Triton()

    class Other(Triangle):
        pass

    with pytest.warns(RuntimeWarning, match="surrogate Other is not supported"):
        run_layer(backend, tensors, surrogate=Other())
    assert backends.triton_unsupported(tensors["x"].half(), tensors["weight_hh"].half(), Triangle()) is not None
    assert "triton" in backends.available()
    if DEVICE == "cpu":
        assert triton_event.interpreted()


def test_state_carries_over_between_calls():
    tensors = layer_inputs(T=6, H=9)
    backend = backends.Triton()
    t = tensors
    with torch.no_grad():
        whole = run_layer(backend, tensors)
        first = backend(t["x"][:2], EGRUState(t["y0"], t["c0"]), t["weight_ih"], t["weight_hh"], t["bias_ih"],
                        t["bias_hh"], t["threshold"], Triangle(0.7, 1.5))
        second = backend(t["x"][2:], first.state, t["weight_ih"], t["weight_hh"], t["bias_ih"], t["bias_hh"],
                         t["threshold"], Triangle(0.7, 1.5))
    # (the input product of a shorter sequence may round differently: equal to 1e-12)
    assert torch.equal(torch.cat([first.e, second.e]), whole.e)
    assert torch.allclose(torch.cat([first.y, second.y]), whole.y, rtol=0, atol=1e-12)
    assert torch.allclose(second.state.c, whole.state.c, rtol=0, atol=1e-12)


def compile_every_kernel(capability: int = 90, dtypes=("fp32",)) -> list:
    """Compile every kernel, in every configuration the backend launches, for a CUDA GPU of
    this compute capability (to PTX, with Triton's own toolchain: no GPU needed), for each of
    ``dtypes`` (float64 shares every line of code). Returns the sizes of the PTX."""
    from triton import compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    te = triton_event
    sizes = []

    def build(fn, signature, constexprs):
        kernel = compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                         target=GPUTarget("cuda", capability, 32))
        sizes.append(len(kernel.asm["ptx"]))

    for dt in dtypes:
        build(te._compact, {"flags_ptr": f"*{dt}", "index_ptr": "*i32", "count_ptr": "*i32", "H": "i32",
                            "BLOCK": "constexpr"}, {"BLOCK": te.BLOCK_COMPACT})
        pointers = ["gi", "y_prev", "c_prev", "index", "count", "w_t", "b_hh", "theta", "zoneout", "valid", "y", "c",
                    "e", "c_hat", "gates", "gh_n"]
        forward = {f"{n}_ptr": {"index": "*i32", "count": "*i32", "valid": "*i8"}.get(n, f"*{dt}") for n in pointers}
        forward.update(B="i32", H="i32", zoneout_p="fp32", HAS_BIAS="constexpr", ZONEOUT="constexpr",
                       LENGTHS="constexpr", BLOCK="constexpr", BLOCK_K="constexpr")
        pointers = ["g_y", "g_y_rec", "g_c_hat", "g_e", "d_c", "c_hat", "c_prev", "gates", "gh_n", "theta", "zoneout",
                    "valid", "d_gi", "d_gh", "d_theta"]
        backward = {f"{n}_ptr": "*i8" if n == "valid" else f"*{dt}" for n in pointers}
        backward.update(H="i32", zoneout_p="fp32", gamma="fp32", support_k="fp32", ZONEOUT="constexpr",
                        LENGTHS="constexpr", BLOCK="constexpr")
        for zoneout in (0, 1, 2):
            for lengths in (False, True):
                build(te._forward_step, forward, {"HAS_BIAS": True, "ZONEOUT": zoneout, "LENGTHS": lengths,
                                                  "BLOCK": te.BLOCK_UNITS, "BLOCK_K": te.BLOCK_ACTIVE})
                build(te._backward_step, backward, {"ZONEOUT": zoneout, "LENGTHS": lengths, "BLOCK": te.BLOCK_UNITS})
        build(te._forward_step, forward, {"HAS_BIAS": False, "ZONEOUT": 0, "LENGTHS": False,
                                          "BLOCK": te.BLOCK_UNITS, "BLOCK_K": te.BLOCK_ACTIVE})
        build(te._recurrent_grad, {"d_gh_ptr": f"*{dt}", "index_ptr": "*i32", "count_ptr": "*i32", "w_t_ptr": f"*{dt}",
                                   "out_ptr": f"*{dt}", "H": "i32", "BLOCK_K": "constexpr", "BLOCK_G": "constexpr"},
              {"BLOCK_K": te.BLOCK_ACTIVE, "BLOCK_G": 64})
    return sizes


def test_every_kernel_compiles_for_a_gpu(tmp_path):
    """The interpreter runs kernels as Python and misses what only the compiler checks (types of
    loop-carried values, what a constexpr branch may define): compile them all for a Hopper GPU,
    in a process where the interpreter is off and the cache empty."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_triton; "
            "sizes = test_triton.compile_every_kernel(); print(len(sizes), min(sizes))")
    done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    count, smallest = map(int, done.stdout.split())
    assert count == 15 and smallest > 1000
