"""An independent implementation of SPEC §1, sharing no code with the package.

Written sample by sample and unit by unit in the plainest form; the surrogate gradient comes
from a straight-through construction (forward value: the hard step; derivative: the triangle)
rather than a custom autograd function.
"""

import torch


def triangle_step(v, gamma, k):
    hard = (v > 0).to(v.dtype)
    slope = (gamma * torch.clamp(1 - k * v.abs(), min=0)).detach()
    return hard.detach() + slope * (v - v.detach())


def step(x, y, c, w_ih, w_hh, b_ih, b_hh, theta, gamma, k, zoneout_p=0.0, zoneout_keep=None):
    """One step for one sample: x (I,), y, c (H,)."""
    H = y.shape[0]
    gi = w_ih @ x + (b_ih if b_ih is not None else 0)
    gh = w_hh @ y + (b_hh if b_hh is not None else 0)
    r = torch.sigmoid(gi[:H] + gh[:H])
    z = torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
    n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
    c_hat = (1 - z) * n + z * c
    if zoneout_keep is not None:
        c_hat = c + zoneout_keep * (c_hat - c)
    elif zoneout_p > 0:
        c_hat = zoneout_p * c + (1 - zoneout_p) * c_hat
    e = triangle_step(c_hat - theta, gamma, k)
    return e * c_hat, c_hat - e * theta


def run(params, x, y0, c0, num_layers, bidirectional, gamma, k, zoneout_p=0.0,
        zoneout_keep=None, w_hh_masks=None):
    """Whole stack for one sample. x (T, I); y0, c0 (L*D, H); params: dict of nn.GRU-named tensors.

    zoneout_keep: dict (layer, direction) -> (T, H) keep-mask in processing order.
    w_hh_masks: dict (layer, direction) -> DropConnect mask (already rescaled).
    Returns output (T, D*H), y_n, c_n (L*D, H).
    """
    D = 2 if bidirectional else 1
    T = x.shape[0]
    inp = x
    y_n, c_n = [], []
    for layer in range(num_layers):
        outs = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            w_hh = params["weight_hh_" + sfx]
            if w_hh_masks is not None:
                w_hh = w_hh * w_hh_masks[(layer, d)]
            y, c = y0[layer * D + d], c0[layer * D + d]
            order = range(T - 1, -1, -1) if d else range(T)
            ys = [None] * T
            for i, t in enumerate(order):
                keep = None if zoneout_keep is None else zoneout_keep[(layer, d)][i]
                y, c = step(inp[t], y, c, params["weight_ih_" + sfx], w_hh,
                            params.get("bias_ih_" + sfx), params.get("bias_hh_" + sfx),
                            params["threshold_" + sfx], gamma, k, zoneout_p, keep)
                ys[t] = y
            outs.append(torch.stack(ys))
            y_n.append(y)
            c_n.append(c)
        inp = torch.cat(outs, dim=-1)
    return inp, torch.stack(y_n), torch.stack(c_n)
