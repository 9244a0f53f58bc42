"""Event-driven EGRU kernels in Triton, for GPUs: the forward pass and sparse BPTT of one layer
and direction (the contract of :func:`egru.functional.egru_layer`).

Forward. The input product of every step is one matmul (``F.linear``). Then per step two
launches:

1. ``_compact``: per sample, the indices of the units with an event at the previous step, in
   increasing order, and their number (a prefix sum over the units' event flags).
2. ``_forward_step``: per sample and block of units, the recurrent product over the listed
   units only (it reads the rows of ``W_hhᵀ`` of the units that fired: ``3H`` contiguous
   weights each), fused with the gates, the candidate state, zoneout, the event rule, the reset
   and the hold of a finished sequence.

Backward (sparse BPTT, SPEC §2). The sets ``G_t`` of units with an event or inside the
surrogate's support are known from the forward pass, so they are compacted for every step at
once before the loop. Then per step, from the last:

1. ``_backward_step``: per sample and block of units, the gradient arriving at ``y_t`` (from the
   loss and from step ``t + 1``'s recurrent product), through the event rule, the reset,
   zoneout and the gates, to the gate gradients ``dgh_t``, ``dgi_t``, the state gradient
   carried to ``c_{t−1}`` and the threshold's per-sample sum.
2. ``_recurrent_grad``: ``W_hᵀ · dgh_t`` only at the units of ``G_{t−1}``, one row of ``W_hhᵀ``
   each; elsewhere the gradient reaching ``y_{t−1}`` is never used (``∂y/∂ĉ = 0`` there).

The weight gradients are matmuls over all steps after the loop (``Σ_t dgh_tᵀ y_{t−1}``, whose
columns of units without events are zero). Every gradient is float32 or float64 as the inputs;
sums run in that type.

Without a GPU the same kernels run on the CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported), which is how the tests prove them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import triton
import triton.language as tl

BLOCK_UNITS = 32  # units per program in the step kernels
BLOCK_ACTIVE = 16  # listed units per iteration of a sparse product
BLOCK_COMPACT = 64  # units per iteration of the compaction


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    return 2.0 / (1.0 + tl.exp(-2.0 * v)) - 1.0


@triton.jit
def _compact(flags_ptr, index_ptr, count_ptr, H, BLOCK: tl.constexpr):
    """Per sample (program), the indices of its nonzero ``flags`` (B, H) in increasing order
    into ``index`` (B, H), their number into ``count`` (B,)."""
    b = tl.program_id(0)
    total = tl.zeros([], dtype=tl.int32)  # typed: a loop-carried value may not change type
    for start in range(0, H, BLOCK):
        units = start + tl.arange(0, BLOCK)
        inside = units < H
        flag = (tl.load(flags_ptr + b * H + units, mask=inside, other=0) != 0).to(tl.int32)
        position = total + tl.cumsum(flag, axis=0) - 1
        tl.store(index_ptr + b * H + position, units, mask=inside & (flag != 0))
        total += tl.sum(flag, axis=0)
    tl.store(count_ptr + b, total)


@triton.jit
def _forward_step(gi_ptr, y_prev_ptr, c_prev_ptr, index_ptr, count_ptr, w_t_ptr, b_hh_ptr, theta_ptr,
                  zoneout_ptr, valid_ptr, y_ptr, c_ptr, e_ptr, c_hat_ptr, gates_ptr, gh_n_ptr,
                  B, H, zoneout_p,
                  HAS_BIAS: tl.constexpr, ZONEOUT: tl.constexpr, LENGTHS: tl.constexpr,
                  BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """One step for one sample (axis 0) and a block of units (axis 1). ``w_t`` is ``W_hhᵀ``
    (H, 3H); ``gates`` receives (r, z, n) as (B, 3H), ``gh_n`` the recurrent part of n."""
    b = tl.program_id(0)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = units < H
    G = 3 * H
    gh_r = tl.zeros([BLOCK], dtype=gi_ptr.dtype.element_ty)
    gh_z = tl.zeros([BLOCK], dtype=gi_ptr.dtype.element_ty)
    gh_n = tl.zeros([BLOCK], dtype=gi_ptr.dtype.element_ty)
    count = tl.load(count_ptr + b)
    for start in range(0, count, BLOCK_K):  # only the units that fired
        k = start + tl.arange(0, BLOCK_K)
        listed = k < count
        source = tl.load(index_ptr + b * H + k, mask=listed, other=0)
        y_k = tl.load(y_prev_ptr + b * H + source, mask=listed, other=0.0)
        rows = w_t_ptr + source[:, None] * G + units[None, :]
        both = listed[:, None] & inside[None, :]
        gh_r += tl.sum(y_k[:, None] * tl.load(rows, mask=both, other=0.0), axis=0)
        gh_z += tl.sum(y_k[:, None] * tl.load(rows + H, mask=both, other=0.0), axis=0)
        gh_n += tl.sum(y_k[:, None] * tl.load(rows + 2 * H, mask=both, other=0.0), axis=0)
    if HAS_BIAS:
        gh_r += tl.load(b_hh_ptr + units, mask=inside, other=0.0)
        gh_z += tl.load(b_hh_ptr + H + units, mask=inside, other=0.0)
        gh_n += tl.load(b_hh_ptr + 2 * H + units, mask=inside, other=0.0)
    row = b * G + units
    r = _sigmoid(tl.load(gi_ptr + row, mask=inside, other=0.0) + gh_r)
    z = _sigmoid(tl.load(gi_ptr + row + H, mask=inside, other=0.0) + gh_z)
    n = _tanh(tl.load(gi_ptr + row + 2 * H, mask=inside, other=0.0) + r * gh_n)
    at = b * H + units
    c_prev = tl.load(c_prev_ptr + at, mask=inside, other=0.0)
    y_prev = tl.load(y_prev_ptr + at, mask=inside, other=0.0)
    c_hat = (1.0 - z) * n + z * c_prev
    if ZONEOUT == 1:  # training: a keep-mask per unit and step
        m = tl.load(zoneout_ptr + at, mask=inside, other=0.0)
        c_hat = c_prev + m * (c_hat - c_prev)
    if ZONEOUT == 2:  # evaluation: the expectation
        c_hat = zoneout_p * c_prev + (1.0 - zoneout_p) * c_hat
    theta = tl.load(theta_ptr + units, mask=inside, other=0.0)
    fired = c_hat - theta > 0.0
    e = tl.where(fired, 1.0, 0.0).to(c_hat.dtype)
    y = e * c_hat
    c = c_hat - e * theta
    if LENGTHS:  # past a sequence's end: the state is held, no output, no event
        valid = tl.load(valid_ptr + b) != 0
        e = tl.where(valid, e, 0.0)
        y_out = tl.where(valid, y, 0.0)
        y = tl.where(valid, y, y_prev)
        c = tl.where(valid, c, c_prev)
    else:
        y_out = y
    tl.store(y_ptr + at, y, mask=inside)  # the state carried on
    tl.store(c_ptr + at, c, mask=inside)
    tl.store(e_ptr + at, e, mask=inside)
    tl.store(c_hat_ptr + at, c_hat, mask=inside)
    tl.store(gates_ptr + row, r, mask=inside)
    tl.store(gates_ptr + row + H, z, mask=inside)
    tl.store(gates_ptr + row + 2 * H, n, mask=inside)
    tl.store(gh_n_ptr + at, gh_n, mask=inside)
    tl.store(y_ptr + B * H + at, y_out, mask=inside)  # the output of the step (zero when finished)


@triton.jit
def _backward_step(g_y_ptr, g_y_rec_ptr, g_c_hat_ptr, g_e_ptr, d_c_ptr, c_hat_ptr, c_prev_ptr, gates_ptr,
                   gh_n_ptr, theta_ptr, zoneout_ptr, valid_ptr, d_gi_ptr, d_gh_ptr, d_theta_ptr,
                   H, zoneout_p, gamma, support_k,
                   ZONEOUT: tl.constexpr, LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    """The gradients of one step for one sample and a block of units: from the gradient at
    ``y_t`` (``g_y`` from the loss plus ``g_y_rec`` from step t + 1) and at ``c_t`` (``d_c``,
    updated in place to the gradient at ``c_{t−1}``) to ``d_gi``, ``d_gh`` (B, 3H) and the
    threshold's gradient, added to ``d_theta`` (B, H)."""
    b = tl.program_id(0)
    units = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = units < H
    at = b * H + units
    row = b * 3 * H + units
    d_y = tl.load(g_y_ptr + at, mask=inside, other=0.0) + tl.load(g_y_rec_ptr + at, mask=inside, other=0.0)
    d_c = tl.load(d_c_ptr + at, mask=inside, other=0.0)
    c_hat = tl.load(c_hat_ptr + at, mask=inside, other=0.0)
    theta = tl.load(theta_ptr + units, mask=inside, other=0.0)
    v = c_hat - theta
    e = tl.where(v > 0.0, 1.0, 0.0).to(c_hat.dtype)
    slope = gamma * tl.maximum(1.0 - support_k * tl.abs(v), 0.0)
    d_e = d_y * c_hat - d_c * theta + tl.load(g_e_ptr + at, mask=inside, other=0.0)
    g_c_hat = tl.load(g_c_hat_ptr + at, mask=inside, other=0.0)
    d_c_hat = d_y * e + d_c + d_e * slope + g_c_hat
    d_theta = -d_c * e - d_e * slope
    if LENGTHS:  # a finished sequence's step: only ĉ is an output; the state's gradient passes on
        valid = tl.load(valid_ptr + b) != 0
        d_c_hat = tl.where(valid, d_c_hat, g_c_hat)
        d_theta = tl.where(valid, d_theta, 0.0)
        carried = tl.where(valid, 0.0, d_c)
    else:
        carried = tl.zeros([BLOCK], dtype=d_c.dtype)
    c_prev = tl.load(c_prev_ptr + at, mask=inside, other=0.0)
    d_c_prev = carried
    if ZONEOUT == 1:
        m = tl.load(zoneout_ptr + at, mask=inside, other=0.0)
        d_c_prev += (1.0 - m) * d_c_hat
        d_c_hat = m * d_c_hat
    if ZONEOUT == 2:
        d_c_prev += zoneout_p * d_c_hat
        d_c_hat = (1.0 - zoneout_p) * d_c_hat
    r = tl.load(gates_ptr + row, mask=inside, other=0.0)
    z = tl.load(gates_ptr + row + H, mask=inside, other=0.0)
    n = tl.load(gates_ptr + row + 2 * H, mask=inside, other=0.0)
    gh_n = tl.load(gh_n_ptr + at, mask=inside, other=0.0)
    d_c_prev += d_c_hat * z
    d_a_n = d_c_hat * (1.0 - z) * (1.0 - n * n)
    d_a_z = d_c_hat * (c_prev - n) * z * (1.0 - z)
    d_a_r = d_a_n * gh_n * r * (1.0 - r)
    tl.store(d_gi_ptr + row, d_a_r, mask=inside)
    tl.store(d_gi_ptr + row + H, d_a_z, mask=inside)
    tl.store(d_gi_ptr + row + 2 * H, d_a_n, mask=inside)
    tl.store(d_gh_ptr + row, d_a_r, mask=inside)
    tl.store(d_gh_ptr + row + H, d_a_z, mask=inside)
    tl.store(d_gh_ptr + row + 2 * H, d_a_n * r, mask=inside)
    tl.store(d_c_ptr + at, d_c_prev, mask=inside)
    tl.store(d_theta_ptr + at, tl.load(d_theta_ptr + at, mask=inside, other=0.0) + d_theta, mask=inside)


@triton.jit
def _recurrent_grad(d_gh_ptr, index_ptr, count_ptr, w_t_ptr, out_ptr, H,
                    BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    """``out[b, j] = Σ_g W_hh[g, j] · d_gh[b, g]`` at the listed units ``j`` of sample ``b``
    (axis 0), a block of them per program (axis 1); ``out`` is zero elsewhere beforehand."""
    b = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    listed = k < tl.load(count_ptr + b)
    j = tl.load(index_ptr + b * H + k, mask=listed, other=0)
    G = 3 * H
    total = tl.zeros([BLOCK_K], dtype=d_gh_ptr.dtype.element_ty)
    for start in range(0, G, BLOCK_G):
        g = start + tl.arange(0, BLOCK_G)
        inside = g < G
        d = tl.load(d_gh_ptr + b * G + g, mask=inside, other=0.0)
        w = tl.load(w_t_ptr + j[:, None] * G + g[None, :], mask=listed[:, None] & inside[None, :], other=0.0)
        total += tl.sum(w * d[None, :], axis=1)
    tl.store(out_ptr + b * H + j, total, mask=listed)


def interpreted() -> bool:
    """Whether these kernels run in Triton's interpreter (on the CPU): ``TRITON_INTERPRET=1``
    was set when this module was imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_compact, InterpretedFunction)


def _compact_rows(flags: torch.Tensor):
    """Per row of ``flags`` (N, H): the indices of its nonzeros first, in increasing order, and
    their number (for all steps at once, where the flags are known in advance)."""
    order = torch.sort((flags == 0).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return order.contiguous(), (flags != 0).sum(-1).to(torch.int32)


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, valid, zoneout_mask, zoneout_p, gamma, support_k):
        T, B, _ = x.shape
        H = w_hh.shape[1]
        gi = F.linear(x, w_ih, b_ih).contiguous()
        w_t = w_hh.detach().t().contiguous()  # row k: the 3H weights unit k feeds
        zoneout = 0 if zoneout_p == 0 and zoneout_mask is None else (1 if zoneout_mask is not None else 2)
        # per step: [the state carried on, the step's output]
        outputs = x.new_empty(T, 2, B, H)
        c = x.new_empty(T, B, H)
        e = x.new_empty(T, B, H)
        c_hat = x.new_empty(T, B, H)
        gates = x.new_empty(T, B, 3 * H)
        gh_n = x.new_empty(T, B, H)
        index = torch.empty(B, H, dtype=torch.int32, device=x.device)
        count = torch.empty(B, dtype=torch.int32, device=x.device)
        y_prev, c_prev = y0.detach().contiguous(), c0.detach().contiguous()
        grid = (B, triton.cdiv(H, BLOCK_UNITS))
        dummy = gi  # for pointers a configuration never reads
        for t in range(T):
            _compact[(B,)](y_prev, index, count, H, BLOCK=BLOCK_COMPACT)
            _forward_step[grid](
                gi[t], y_prev, c_prev, index, count, w_t, dummy if b_hh is None else b_hh.detach(), theta.detach(),
                dummy if zoneout_mask is None else zoneout_mask[t], dummy if valid is None else valid[t],
                outputs[t], c[t], e[t], c_hat[t], gates[t], gh_n[t], B, H, float(zoneout_p),
                HAS_BIAS=b_hh is not None, ZONEOUT=zoneout, LENGTHS=valid is not None,
                BLOCK=BLOCK_UNITS, BLOCK_K=BLOCK_ACTIVE)
            y_prev, c_prev = outputs[t, 0], c[t]
        y = outputs[:, 1]
        ctx.save_for_backward(x, y0, c0, w_ih, w_hh, theta, valid, zoneout_mask, outputs[:, 0], c, c_hat, gates,
                              gh_n, w_t)
        ctx.settings = (float(zoneout_p), float(gamma), float(support_k), zoneout, b_ih is not None, b_hh is not None)
        ctx.set_materialize_grads(True)  # e's gradient goes through the surrogate, in _backward_step
        return y, c_hat, e, y_prev.clone(), c_prev.clone()

    @staticmethod
    def backward(ctx, g_y, g_c_hat, g_e, g_y_last, g_c_last):
        x, y0, c0, w_ih, w_hh, theta, valid, zoneout_mask, carried_y, c, c_hat, gates, gh_n, w_t = ctx.saved_tensors
        zoneout_p, gamma, support_k, zoneout, has_b_ih, has_b_hh = ctx.settings
        T, B, H = c_hat.shape
        g_y, g_c_hat, g_e = (g.contiguous() for g in (g_y, g_c_hat, g_e))
        d_gi = x.new_empty(T, B, 3 * H)
        d_gh = x.new_empty(T, B, 3 * H)
        d_theta = x.new_zeros(B, H)
        d_c = g_c_last.detach().clone().contiguous()
        g_y_rec = g_y_last.detach().clone().contiguous()  # the gradient at the carried y_t
        # units of each step whose output gradient is used: an event, or inside the support
        # (every unit at a finished sequence's steps, whose held y passes its gradient on)
        v = (c_hat - theta).detach()
        used = (v > 0) | (v.abs() < 1.0 / support_k)
        if valid is not None:
            used |= valid.unsqueeze(-1) == 0
        index, count = _compact_rows(used.reshape(T * B, H))
        index, count = index.view(T, B, H), count.view(T, B)
        grid = (B, triton.cdiv(H, BLOCK_UNITS))
        dummy = d_gi
        c_prevs = torch.cat([c0.detach().unsqueeze(0), c[:-1]])
        every_unit = (torch.arange(H, dtype=torch.int32, device=x.device).expand(B, H).contiguous(),
                      torch.full((B,), H, dtype=torch.int32, device=x.device))
        for t in range(T - 1, -1, -1):
            if valid is not None:  # past the end the carried y is y_{t−1}: its gradient goes on
                passed = g_y_rec * (valid[t].unsqueeze(-1) == 0)
            _backward_step[grid](
                g_y[t], g_y_rec, g_c_hat[t], g_e[t], d_c, c_hat[t], c_prevs[t], gates[t], gh_n[t], theta.detach(),
                dummy if zoneout_mask is None else zoneout_mask[t], dummy if valid is None else valid[t],
                d_gi[t], d_gh[t], d_theta, H, zoneout_p, gamma, support_k,
                ZONEOUT=zoneout, LENGTHS=valid is not None, BLOCK=BLOCK_UNITS)
            # the initial state y0 is given, not fired: its gradient is needed at every unit
            previous = (index[t - 1], count[t - 1]) if t > 0 else every_unit
            rec = x.new_zeros(B, H)
            _recurrent_grad[(B, triton.cdiv(H, BLOCK_ACTIVE))](
                d_gh[t], previous[0], previous[1], w_t, rec, H, BLOCK_K=BLOCK_ACTIVE, BLOCK_G=64)
            g_y_rec = rec if valid is None else rec + passed
        y_prevs = torch.cat([y0.detach().unsqueeze(0), carried_y[:-1]])
        d_x = torch.matmul(d_gi, w_ih) if ctx.needs_input_grad[0] else None
        d_w_ih = d_gi.reshape(T * B, 3 * H).t() @ x.reshape(T * B, -1) if ctx.needs_input_grad[3] else None
        d_w_hh = d_gh.reshape(T * B, 3 * H).t() @ y_prevs.reshape(T * B, H) if ctx.needs_input_grad[4] else None
        d_b_ih = d_gi.sum((0, 1)) if has_b_ih and ctx.needs_input_grad[5] else None
        d_b_hh = d_gh.sum((0, 1)) if has_b_hh and ctx.needs_input_grad[6] else None
        return (d_x, g_y_rec, d_c, d_w_ih, d_w_hh, d_b_ih, d_b_hh, d_theta.sum(0),
                None, None, None, None, None)


def layer(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, valid, zoneout_mask, zoneout_p, gamma, support_k):
    """One layer over ``x`` (T, B, I) in processing order; ``valid`` (T, B) int8 or None. Returns
    ``(y, c_hat, e, y_last, c_last)``."""
    return _Layer.apply(x, y0, c0, w_ih, w_hh, b_ih, b_hh, theta, valid, zoneout_mask, zoneout_p, gamma,
                        support_k)
