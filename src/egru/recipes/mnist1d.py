"""MNIST-1D sequence classification: a small EGRU and a same-size ``torch.nn.GRU`` side by side.

MNIST-1D (Greydanus & Kobak) is generated locally by the ``mnist1d`` package: 4,000 training and
1,000 test sequences of 40 steps, 10 classes. Each sequence is fed one value per step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import egru

from .common import progress_bar


@dataclass(frozen=True)
class DemoConfig:
    hidden_size: int = 128
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2
    threshold_mean: float = 0.1
    dampening_factor: float = 0.7
    pseudo_derivative_support: float = 2.0
    seed: int = 0
    train_size: int = 4000  # at most 4,000
    test_size: int = 1000  # at most 1,000
    backend: str = "auto"


def load_mnist1d(seed: int = 42):
    """MNIST-1D as float32 tensors ``(x, y, x_test, y_test)``, ``x`` of shape (N, 40)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError("the MNIST-1D demo needs the mnist1d package: pip install 'egru[demo]'") from err
    args = get_dataset_args()
    args.seed = seed
    state = np.random.get_state()  # make_dataset reseeds numpy's global generator
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    as_x = lambda a: torch.from_numpy(np.ascontiguousarray(a)).float()  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a)).long()  # noqa: E731
    return as_x(data["x"]), as_y(data["y"]), as_x(data["x_test"]), as_y(data["y_test"])


class EGRUClassifier(nn.Module):
    """EGRU over the sequence; a linear readout of the output trace at the last step."""

    def __init__(self, cfg: DemoConfig):
        super().__init__()
        self.rnn = egru.EGRU(1, cfg.hidden_size, threshold_mean=cfg.threshold_mean, backend=cfg.backend,
                             dampening_factor=cfg.dampening_factor,
                             pseudo_derivative_support=cfg.pseudo_derivative_support)
        self.readout = nn.Linear(cfg.hidden_size, 10)

    def forward(self, x, record: bool = False):
        out, _, records = self.rnn(x, record=True)
        logits = self.readout(egru.functional.output_trace(out)[-1])
        return (logits, records) if record else logits


class GRUClassifier(nn.Module):
    """``torch.nn.GRU`` over the sequence; a linear readout of the last hidden state."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.rnn = nn.GRU(1, hidden_size)
        self.readout = nn.Linear(hidden_size, 10)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.readout(out[-1])


def _train(model: nn.Module, data, cfg: DemoConfig, desc: str, progress: bool) -> float:
    x, y, _, _ = data
    generator = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    egru.keep_thresholds_in_range(opt, model)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    bar = progress_bar(cfg.epochs * steps_per_epoch, desc, progress)
    start = time.perf_counter()
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx].T.unsqueeze(-1)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if bar is not None:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
    if bar is not None:
        bar.close()
    return time.perf_counter() - start


@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x.T.unsqueeze(-1)).argmax(-1) == y).float().mean().item()


def train_and_evaluate(cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Train an EGRU and a GRU of the same size on MNIST-1D; return their test metrics."""
    x, y, x_test, y_test = load_mnist1d()
    data = (x[:cfg.train_size], y[:cfg.train_size], x_test[:cfg.test_size], y_test[:cfg.test_size])
    x_test, y_test = data[2], data[3]

    torch.manual_seed(cfg.seed)
    model = EGRUClassifier(cfg)
    egru_seconds = _train(model, data, cfg, "EGRU", progress)
    egru_acc = _accuracy(model, x_test, y_test)
    with torch.no_grad():
        _, records = model.eval()(x_test.T.unsqueeze(-1), record=True)
    stats = egru.model_stats(records)

    torch.manual_seed(cfg.seed)
    baseline = GRUClassifier(cfg.hidden_size)
    gru_seconds = _train(baseline, data, cfg, "GRU", progress)
    gru_acc = _accuracy(baseline, x_test, y_test)

    return {
        "config": dataclasses.asdict(cfg),
        "egru": {
            "test_accuracy": egru_acc,
            "activity_sparsity": stats.activity_sparsity,
            "backward_sparsity": stats.backward_sparsity,
            "effective_macs_per_step": stats.effective_macs / stats.steps,
            "train_seconds": egru_seconds,
        },
        "gru": {
            "test_accuracy": gru_acc,
            "dense_macs_per_step": stats.dense_macs / stats.steps,
            "train_seconds": gru_seconds,
        },
    }


def format_table(results: dict) -> str:
    e, g = results["egru"], results["gru"]
    rows = [
        ("", "EGRU", "GRU"),
        ("test accuracy", f"{e['test_accuracy']:.1%}", f"{g['test_accuracy']:.1%}"),
        ("activity sparsity", f"{e['activity_sparsity']:.1%}", "0.0%"),
        ("backward sparsity", f"{e['backward_sparsity']:.1%}", "0.0%"),
        ("MACs per step (recurrent layer)", f"{e['effective_macs_per_step']:,.0f}",
         f"{g['dense_macs_per_step']:,.0f}"),
        ("MACs relative to GRU", f"{e['effective_macs_per_step'] / g['dense_macs_per_step']:.2f}", "1.00"),
        ("training time", f"{e['train_seconds']:.0f} s", f"{g['train_seconds']:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows)
