"""Word-level language modeling (SPEC §6): an AWD-style model with EGRU, GRU or LSTM layers.

``train_and_evaluate(cfg, run_dir)`` trains, checkpoints (atomically, resumable to the same
losses), logs ``metrics.jsonl`` (+ TensorBoard), evaluates and plots. Under ``torchrun`` it
trains with DistributedDataParallel, each rank on its own columns of the global batch.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import egru
from egru import data

from .common import (DeferredInterrupt, MeasuredTorchThreads, MetricsLog, default_device,
                     is_main_process, progress_bar, rng_state, save_atomic, seed_everything,
                     set_rng_state)

CHECKPOINT_KIND = "egru-language-model"
MODELS = ("egru", "gru", "lstm")


@dataclass(frozen=True)
class LMConfig:
    dataset: str = "ptb"
    model: str = "egru"
    embedding_size: int = 200
    hidden_size: int = 400  # every layer but the last, whose size is embedding_size (tied decoder)
    num_layers: int = 2
    batch_size: int = 32
    eval_batch_size: int = 10
    test_batch_size: int = 1
    bptt: int = 35
    variable_bptt: bool = True  # AWD: bptt (95%) or bptt/2 (5%), then N(·, 5)
    lr: float = 2e-3
    threshold_lr: float = 0.0  # 0 freezes the thresholds
    weight_decay: float = 0.1
    beta2: float = 0.999
    clip: float = 0.25
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many steps (the schedule still spans `epochs`)
    constant_fraction: float = 0.7  # constant learning rate for this part of training, then cosine
    dropout_embedding: float = 0.3  # locked dropout on the embedded words
    dropout_words: float = 0.1  # whole words removed from the embedding matrix
    dropout_between: float = 0.2  # locked dropout between recurrent layers
    dropout_output: float = 0.3  # locked dropout before the decoder
    dropconnect: float = 0.3  # on the recurrent weights (EGRU, and the baselines' weight_hh)
    zoneout: float = 0.0
    dampening_factor: float = 0.7
    pseudo_derivative_support: float = 1.0
    threshold_mean: float = 0.1
    # The last layer's events are all the tied decoder sees: it may get a threshold of its own.
    last_threshold_mean: Optional[float] = dataclasses.field(default=None, metadata={"type": float})
    reset_state_per_chunk: bool = False  # True mimics the reference code, which restarts c
    eval_every: int = 0  # validation every this many steps (0: at the end of each epoch)
    log_every: int = 20
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; expected one of {MODELS}")
        if self.dataset not in data.CORPORA:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(data.CORPORA)}")
        if self.backend not in egru.available_backends():
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {egru.available_backends()}")
        for name in ("embedding_size", "hidden_size", "num_layers", "batch_size", "eval_batch_size",
                     "test_batch_size", "bptt", "epochs", "log_every"):
            _check(self, name, "a positive integer", lambda v: isinstance(v, int) and v > 0)
        _check(self, "max_steps", "a positive integer or None",
               lambda v: v is None or (isinstance(v, int) and v > 0))
        _check(self, "eval_every", "0 or a positive integer", lambda v: isinstance(v, int) and v >= 0)
        _check(self, "seed", "an integer from 0 to 2**32 - 1",  # what numpy's seed accepts
               lambda v: isinstance(v, int) and 0 <= v < 2**32)
        # Comparisons with NaN are false: NaN is refused too.
        for name in ("lr", "clip", "dampening_factor", "pseudo_derivative_support"):
            _check(self, name, "a positive number", lambda v: v > 0 and math.isfinite(v))
        for name in ("threshold_lr", "weight_decay"):
            _check(self, name, "a number >= 0", lambda v: v >= 0 and math.isfinite(v))
        _check(self, "beta2", "a number in [0, 1)", lambda v: 0 <= v < 1)
        _check(self, "constant_fraction", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        for name in ("dropout_embedding", "dropout_words", "dropout_between", "dropout_output",
                     "dropconnect", "zoneout"):
            _check(self, name, "a number in [0, 1)", lambda v: 0 <= v < 1)


def _check(cfg, name: str, expected: str, valid) -> None:
    value = getattr(cfg, name)
    if not valid(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


PRESETS = {
    # EvNN v0.2 recipes (SPEC §6), for GPUs.
    "paper-ptb": LMConfig(
        dataset="ptb", embedding_size=750, hidden_size=1350, num_layers=3, batch_size=64, bptt=70,
        lr=1.2e-3, weight_decay=0.10, epochs=1000, constant_fraction=0.7, dropout_embedding=0.6,
        dropout_words=0.1, dropout_between=0.25, dropout_output=0.5, dropconnect=0.7, clip=0.1,
        dampening_factor=3.6, pseudo_derivative_support=3.6, threshold_mean=0.01, threshold_lr=0.0),
    "paper-wt2": LMConfig(
        dataset="wikitext2", embedding_size=750, hidden_size=1350, num_layers=3, batch_size=128, bptt=70,
        lr=1e-3, weight_decay=0.12, epochs=800, constant_fraction=0.7, dropout_embedding=0.7,
        dropout_words=0.1, dropout_between=0.25, dropout_output=0.5, dropconnect=0.7, clip=0.1,
        dampening_factor=3.6, pseudo_derivative_support=3.6, threshold_mean=0.01, threshold_lr=0.0),
    # A model that trains to a meaningful perplexity on two CPU cores (10 epochs of PTB in about
    # 40 minutes). The thresholds and the baselines' half-default dropouts were picked by short
    # sweeps (docs/results.md): a high threshold keeps the first layer silent, a low one lets the
    # last layer, whose events are all the tied decoder sees, speak. The EGRU's own learning rate
    # and dropouts are in PER_MODEL.
    "cpu-small": LMConfig(threshold_mean=0.6, last_threshold_mean=0.15, dropout_embedding=0.15,
                          dropout_between=0.1, dropout_output=0.15, dropconnect=0.15),
}

# Settings of a preset that each recurrent core gets on its own, the best found for that model
# by the sweeps and full runs in docs/results.md: the EGRU needs far less regularisation than
# the GRU and LSTM (its silent units already withhold most of its outputs); the EGRU and the GRU
# both did better with a higher learning rate (the LSTM was not run with it).
PER_MODEL = {
    "cpu-small": {
        "egru": dict(lr=3e-3, dropout_embedding=0.05, dropout_words=0.0, dropout_between=0.0,
                     dropout_output=0.05, dropconnect=0.0),
        "gru": dict(lr=3e-3),
    },
}


def preset(name: str, model: Optional[str] = None) -> LMConfig:
    """The configuration of preset ``name`` for ``model`` (default: the preset's model)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    model = model or PRESETS[name].model
    return dataclasses.replace(PRESETS[name], model=model, **PER_MODEL.get(name, {}).get(model, {}))


# --- model ------------------------------------------------------------------------------------

def locked_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with one mask per sequence, shared over time steps. x: (T, B, F)."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


def embedded_dropout(embedding: nn.Embedding, tokens: torch.Tensor, p: float, training: bool):
    """Drop whole words: zero random rows of the embedding matrix (rescaled), then look up."""
    weight = embedding.weight
    if training and p > 0:
        mask = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - p) / (1 - p)
        weight = weight * mask
    return nn.functional.embedding(tokens, weight)


class WeightDropped(nn.Module):
    """A ``torch.nn.GRU``/``LSTM`` whose ``weight_hh_l0`` gets a DropConnect mask per call."""

    def __init__(self, rnn: nn.Module, p: float):
        super().__init__()
        self.rnn, self.p = rnn, p

    def forward(self, x, state):
        if not self.training or self.p == 0:
            return self.rnn(x, state)
        w = self.rnn.weight_hh_l0
        dropped = {"weight_hh_l0": w * egru.functional.dropconnect_mask(w, self.p)}
        return torch.func.functional_call(self.rnn, dropped, (x, state))


def recurrent_layer(cfg: LMConfig, input_size: int, hidden_size: int, last: bool) -> nn.Module:
    if cfg.model == "egru":
        threshold_mean = cfg.threshold_mean
        if last and cfg.last_threshold_mean is not None:
            threshold_mean = cfg.last_threshold_mean
        return egru.EGRU(input_size, hidden_size, dropconnect=cfg.dropconnect, zoneout=cfg.zoneout,
                         dampening_factor=cfg.dampening_factor,
                         pseudo_derivative_support=cfg.pseudo_derivative_support,
                         threshold_mean=threshold_mean, backend=cfg.backend)
    rnn = (nn.GRU if cfg.model == "gru" else nn.LSTM)(input_size, hidden_size)
    return WeightDropped(rnn, cfg.dropconnect)


class LanguageModel(nn.Module):
    """Embedding → stacked recurrent layers → tied decoder, with AWD-style dropouts."""

    def __init__(self, cfg: LMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        E, H, L = cfg.embedding_size, cfg.hidden_size, cfg.num_layers
        self.sizes = [H] * (L - 1) + [E]
        self.embedding = nn.Embedding(vocab_size, E)
        self.layers = nn.ModuleList(
            recurrent_layer(cfg, E if i == 0 else self.sizes[i - 1], self.sizes[i], last=i == L - 1)
            for i in range(L))
        self.decoder = nn.Linear(E, vocab_size)
        self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def initial_state(self, batch_size: int) -> list:
        states = []
        for size in self.sizes:
            zero = self.embedding.weight.new_zeros(1, batch_size, size)
            states.append(zero if self.cfg.model == "gru" else (zero, zero.clone()))
        return states

    def forward(self, tokens: torch.Tensor, state: list, record: bool = False):
        """tokens (T, B) → logits (T, B, V), new state, and the EGRU layers' records."""
        cfg, training = self.cfg, self.training
        x = embedded_dropout(self.embedding, tokens, cfg.dropout_words, training)
        x = locked_dropout(x, cfg.dropout_embedding, training)
        new_state, records = [], []
        for i, layer in enumerate(self.layers):
            if cfg.model == "egru":
                out = layer(x, state[i], record=record)
                if record:
                    records.extend(out[2])
                x, s = out[0], out[1]
            else:
                x, s = layer(x, state[i])
            new_state.append(s)
            last = i == len(self.layers) - 1
            x = locked_dropout(x, cfg.dropout_output if last else cfg.dropout_between, training)
        return self.decoder(x), new_state, records


def map_state(fn, state):
    """Apply ``fn`` to every tensor of a (nested) state, keeping its structure."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    items = [map_state(fn, s) for s in state]
    return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)


# --- data -------------------------------------------------------------------------------------

def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) token ids → (N // B, B): B contiguous streams, one per column."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def world() -> tuple:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_columns(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's columns of a global (T, B, ...) batch (B divisible by the world size)."""
    per = batch.shape[1] // world_size
    return batch[:, rank * per:(rank + 1) * per]


# --- schedule ---------------------------------------------------------------------------------

def lr_factor(progress: float, constant_fraction: float) -> float:
    """Constant, then cosine to zero. ``progress`` in [0, 1] is the fraction of training done."""
    if progress <= constant_fraction:
        return 1.0
    x = (progress - constant_fraction) / max(1 - constant_fraction, 1e-12)
    return 0.5 * (1 + math.cos(math.pi * min(x, 1.0)))


def chunk_length(cfg: LMConfig, rng: random.Random) -> int:
    """AWD variable-length BPTT: around bptt most of the time, around bptt/2 sometimes."""
    if not cfg.variable_bptt:
        return cfg.bptt
    base = cfg.bptt if rng.random() < 0.95 else cfg.bptt / 2
    return max(5, int(rng.gauss(base, 5)))


# --- evaluation -------------------------------------------------------------------------------

class StatsAccumulator:
    """Per-layer sparsity statistics summed over many calls."""

    def __init__(self):
        self.layers: dict = {}
        self.tokens = 0

    def add(self, records: list, tokens: int) -> None:
        self.tokens += tokens
        for i, rec in enumerate(records):
            s = egru.layer_stats(rec)
            acc = self.layers.setdefault(i, [0.0, 0.0, 0, 0, 0])
            acc[0] += s.activity * s.steps
            acc[1] += s.backward_activity * s.steps
            acc[2] += s.effective_macs
            acc[3] += s.dense_macs
            acc[4] += s.steps

    def summary(self) -> dict:
        tokens = self.tokens
        out = {}
        for i, (act, back, eff, dense, steps) in sorted(self.layers.items()):
            out[f"layer{i}"] = {
                "activity": act / max(steps, 1),
                "backward_activity": back / max(steps, 1),
                "effective_macs_per_token": eff / max(tokens, 1),
                "dense_macs_per_token": dense / max(tokens, 1),
            }
        return out


@torch.no_grad()
def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int,
             progress: bool = False, stop=lambda: False) -> Optional[dict]:
    """Mean cross-entropy, perplexity and (EGRU) sparsity over a whole split; None when
    ``stop()`` turns true between two batches (training's Ctrl-C: the evaluation is redone)."""
    model.eval()
    stream = batchify(ids, batch_size)
    state = model.initial_state(batch_size)
    total_loss, tokens = 0.0, 0
    stats = StatsAccumulator()
    record = model.cfg.model == "egru"
    bar = progress_bar(stream.shape[0] - 1, "evaluate", progress)
    threads = MeasuredTorchThreads()
    for i in range(0, stream.shape[0] - 1, bptt):
        if stop():
            if bar is not None:
                bar.close()
            return None
        n = min(bptt, stream.shape[0] - 1 - i)
        inputs, targets = stream[i:i + n], stream[i + 1:i + 1 + n]
        with threads.step(batch_size, n):
            logits, state, records = model(inputs, state, record=record)
            total_loss += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                      reduction="sum").item()
        tokens += targets.numel()
        if record:
            stats.add(records, targets.numel())
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    loss = total_loss / tokens
    result = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
    if record:
        result["layers"] = stats.summary()
    else:
        factor = 3 if model.cfg.model == "gru" else 4
        result["layers"] = {
            f"layer{i}": {"activity": 1.0, "backward_activity": 1.0,
                          "effective_macs_per_token": factor * h * (layer.rnn.input_size + h),
                          "dense_macs_per_token": factor * h * (layer.rnn.input_size + h)}
            for i, (h, layer) in enumerate(zip(model.sizes, model.layers))}
    return result


# --- training ---------------------------------------------------------------------------------

@dataclass
class Position:
    epoch: int = 0
    row: int = 0  # next row of the batchified training stream
    step: int = 0
    best_valid: float = math.inf
    validated_step: int = 0  # the last step validated (an interrupted validation is redone)


def make_optimizer(model: LanguageModel, cfg: LMConfig) -> torch.optim.Optimizer:
    thresholds = [p for n, p in model.named_parameters() if ".threshold" in n]
    others = [p for n, p in model.named_parameters() if ".threshold" not in n]
    groups = [{"params": others, "lr": cfg.lr, "base_lr": cfg.lr}]
    if thresholds:
        groups.append({"params": thresholds, "lr": cfg.threshold_lr, "base_lr": cfg.threshold_lr,
                       "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.0, cfg.beta2), weight_decay=cfg.weight_decay)


CHECKPOINT_KEYS = ("config", "vocab_size", "model", "optimizer", "position", "rng", "bptt_rng",
                   "carried_state")


def checkpoint_dict(cfg, vocab_size, model, optimizer, position, bptt_rng, carried) -> dict:
    return {
        "kind": CHECKPOINT_KIND,
        "config": dataclasses.asdict(cfg),
        "vocab_size": vocab_size,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "position": dataclasses.asdict(position),
        "rng": rng_state(),
        "bptt_rng": bptt_rng.getstate(),
        "carried_state": carried,
    }


def load_checkpoint(path) -> dict:
    """A checkpoint written by ``train_and_evaluate``; a ValueError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # what torch.load raises on a foreign file depends on its bytes
        raise ValueError(f"{path} is not an egru language-model checkpoint "
                         f"({type(err).__name__}: {err})".replace("\n", " ")) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} is not an egru language-model checkpoint")
    missing = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete egru language-model checkpoint: "
                         f"it lacks {', '.join(missing)}")
    try:
        LMConfig(**ckpt["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds a configuration this version cannot use: {err}") from None
    return ckpt


def model_from_checkpoint(ckpt: dict) -> LanguageModel:
    cfg = LMConfig(**ckpt["config"])
    model = LanguageModel(cfg, ckpt["vocab_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise ValueError(f"the checkpoint does not fit a {cfg.model} language model: {err}") from err
    return model


def _gather_columns(state, world_size: int):
    """All ranks' carried states concatenated along the batch axis (for the checkpoint)."""
    if world_size == 1:
        return state

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=1)

    return map_state(gather, state)


def _check_corpus_fits(cfg: LMConfig, corpus) -> None:
    """Refuse batch sizes that leave a split without a single (input, target) pair."""
    for name, split in (("batch_size", "train"), ("eval_batch_size", "valid"), ("test_batch_size", "test")):
        tokens = corpus.split(split).numel()
        if tokens // getattr(cfg, name) < 2:
            raise ValueError(f"{name} {getattr(cfg, name)} is too large: {cfg.dataset}'s {split} "
                             f"split has {tokens} tokens")


def train_and_evaluate(cfg: LMConfig, run_dir, *, data_dir=None, download: bool = False,
                       resume: bool = False, progress: bool = True) -> dict:
    """Train a language model; return the final validation and test metrics.

    Checkpoints go to ``run_dir/last.pt`` (after every evaluation, at the end, and on Ctrl-C)
    and ``run_dir/best.pt`` (best validation perplexity). A first Ctrl-C stops at the next step
    boundary (abandoning an evaluation under way, which resuming redoes), saves ``last.pt``
    there and raises KeyboardInterrupt; a second one raises at once and saves nothing.
    """
    run_dir = Path(run_dir)
    device = default_device()
    distributed = _init_distributed(device)
    rank, world_size = world()
    if cfg.batch_size % world_size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world_size} processes")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"{run_dir} already holds a run: continue it with --resume, "
                         "or choose another --run-dir")
    corpus = data.load_corpus(cfg.dataset, data_dir, download)
    _check_corpus_fits(cfg, corpus)

    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / "last.pt")
        saved = LMConfig(**ckpt["config"])
        if dataclasses.replace(saved, max_steps=cfg.max_steps) != cfg:
            raise ValueError("the run directory holds a run with a different configuration; "
                             "resume it without changing options other than --max-steps")
    seed_everything(cfg.seed)
    model = LanguageModel(cfg, len(corpus.vocab)).to(device)
    optimizer = make_optimizer(model, cfg)
    egru.keep_thresholds_in_range(optimizer, model)
    position, bptt_rng = Position(), random.Random(cfg.seed)
    carried = model.initial_state(cfg.batch_size)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # Checkpoints older than `validated_step` were all written after their step's validation.
        position = Position(**{"validated_step": ckpt["position"]["step"], **ckpt["position"]})
        set_rng_state(ckpt["rng"])
        bptt_rng.setstate(ckpt["bptt_rng"])
        carried = map_state(lambda t: t.to(device), ckpt["carried_state"])
    carried = map_state(lambda t: shard_columns(t, rank, world_size), carried)  # (1, B, H) each
    # Each rank trains on its own columns of the global batch.
    train = batchify(corpus.train, cfg.batch_size).to(device)
    train = shard_columns(train, rank, world_size)
    net = nn.parallel.DistributedDataParallel(model) if distributed else model
    log = MetricsLog(run_dir) if is_main_process() else None
    if log is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume:  # what comes after the checkpoint is redone, a finished run's summary too
            log.keep(lambda r: r["step"] <= position.step and not r["split"].startswith("best_"))
    rows_per_epoch = train.shape[0] - 1
    total_rows = cfg.epochs * rows_per_epoch
    # The ranks agree on Ctrl-C (one stopping alone would leave the others waiting in a
    # collective) through a gloo group: a CPU all-reduce per step, which does not wait for a GPU.
    flag_group = dist.new_group(backend="gloo") if distributed else None

    def save(*names: str) -> None:
        gathered = _gather_columns(carried, world_size)  # a collective: every rank takes part
        if is_main_process():
            ckpt = checkpoint_dict(cfg, len(corpus.vocab), model, optimizer, position, bptt_rng,
                                   map_state(lambda t: t.cpu(), gathered))
            for name in names:
                save_atomic(ckpt, run_dir / name)

    def finished() -> bool:
        return position.epoch >= cfg.epochs or (cfg.max_steps is not None and position.step >= cfg.max_steps)

    def validation_due() -> bool:
        if position.validated_step == position.step:
            return False
        if cfg.eval_every:
            return position.step % cfg.eval_every == 0 or finished()
        return position.row == 0 or finished()  # row 0: an epoch has just ended

    def validate() -> None:
        """Validate on the main process (the others wait in save()) and checkpoint. A validation
        abandoned for Ctrl-C stays due in the checkpoint."""
        improved, done = False, True
        if is_main_process():
            result = evaluate(model, corpus.valid.to(device), cfg.eval_batch_size, cfg.bptt,
                              stop=lambda: interrupt.requested)
            model.train()
            done = result is not None
            if done:
                log.write({"step": position.step, "epoch": position.epoch, "split": "valid",
                           "loss": result["loss"], "perplexity": result["perplexity"],
                           "layers": result["layers"]})
                improved = result["perplexity"] < position.best_valid
                position.best_valid = min(position.best_valid, result["perplexity"])
        if done:
            position.validated_step = position.step
        save("last.pt", "best.pt") if improved else save("last.pt")

    def stop_requested() -> bool:
        """Whether Ctrl-C reached any rank; every rank calls this at the same points."""
        if not distributed:
            return interrupt.requested
        flag = torch.tensor([float(interrupt.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=flag_group)
        return flag.item() > 0

    def stop():
        """End the run as Ctrl-C does, saying how to continue it."""
        if is_main_process():
            print(f"\ninterrupted at step {position.step}: continue from {run_dir / 'last.pt'} with --resume")
        raise KeyboardInterrupt

    bar = progress_bar(total_rows, "train", progress, initial=position.epoch * rows_per_epoch + position.row)
    train_seconds, tokens_seen = 0.0, 0
    stats = StatsAccumulator()
    result = {}
    with DeferredInterrupt() as interrupt:
        try:
            model.train()
            while True:
                # A step boundary: the only place where the position, the parameters, the
                # optimizer, the random generators and the carried state all agree.
                if validation_due():
                    validate()
                if stop_requested():
                    save("last.pt")
                    stop()
                if finished():
                    break
                n = min(chunk_length(cfg, bptt_rng), rows_per_epoch - position.row)
                inputs = train[position.row:position.row + n]
                targets = train[position.row + 1:position.row + 1 + n]
                progress_done = (position.epoch * rows_per_epoch + position.row) / total_rows
                for group in optimizer.param_groups:  # AWD: the learning rate follows the chunk length
                    group["lr"] = group["base_lr"] * lr_factor(progress_done, cfg.constant_fraction) * n / cfg.bptt
                if cfg.reset_state_per_chunk:
                    carried = model.initial_state(inputs.shape[1])
                step_start = time.perf_counter()
                record = cfg.model == "egru" and position.step % cfg.log_every == 0
                logits, carried, records = net(inputs, carried, record=record)
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
                optimizer.step()
                carried = map_state(torch.Tensor.detach, carried)  # truncated BPTT
                train_seconds += time.perf_counter() - step_start
                position.row += n
                position.step += 1
                tokens_seen += targets.numel() * world_size
                if record:
                    stats.add(records, targets.numel())
                if position.step % cfg.log_every == 0 or position.step == 1:
                    value = loss.detach().clone()
                    if distributed:
                        dist.all_reduce(value)
                        value /= world_size
                    entry = {"step": position.step, "epoch": position.epoch, "split": "train",
                             "loss": value.item(), "perplexity": math.exp(value.item()),
                             "lr": optimizer.param_groups[0]["lr"],
                             "tokens_per_second": tokens_seen / max(train_seconds, 1e-9)}
                    if stats.layers:
                        entry["layers"] = stats.summary()
                        stats = StatsAccumulator()
                    if log is not None:
                        log.write(entry)
                    if bar is not None:
                        activity = ""
                        if "layers" in entry:
                            mean = sum(v["activity"] for v in entry["layers"].values()) / len(entry["layers"])
                            activity = f"{mean:.1%}"
                        bar.set_postfix(loss=f"{entry['loss']:.3f}", ppl=f"{entry['perplexity']:.0f}",
                                        tok_s=f"{entry['tokens_per_second']:.0f}", act=activity, refresh=False)
                if bar is not None:
                    bar.update(n)
                if position.row >= rows_per_epoch:
                    position.epoch += 1
                    position.row = 0
        finally:
            if bar is not None:
                bar.close()
        if is_main_process():  # the best model's final evaluations, by the main process alone
            result["config"] = dataclasses.asdict(cfg)
            best = model_from_checkpoint(load_checkpoint(run_dir / "best.pt")).to(device)
            for split, batch_size, shown in (("valid", cfg.eval_batch_size, False),
                                             ("test", cfg.test_batch_size, progress)):
                result[split] = evaluate(best, corpus.split(split).to(device), batch_size, cfg.bptt,
                                         shown, stop=lambda: interrupt.requested)
        if stop_requested():  # the other ranks wait here for the main one
            stop()  # last.pt, from the last validation, already holds the finished training
    if is_main_process():
        result["train_tokens_per_second"] = tokens_seen / max(train_seconds, 1e-9)
        for split in ("valid", "test"):
            log.write({"step": position.step, "epoch": position.epoch, "split": f"best_{split}",
                       "loss": result[split]["loss"], "perplexity": result[split]["perplexity"],
                       "layers": result[split]["layers"]})
        log.close()
        try:
            from .plots import plot_language_model_run

            plot_language_model_run(run_dir, best, corpus, device)
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'egru[plots]')")
    return result


def _init_distributed(device: torch.device) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any: NCCL
    between GPUs, gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def evaluate_checkpoint(path, split: str = "test", data_dir=None, download: bool = False,
                        progress: bool = True) -> dict:
    """Evaluate a saved model on a split (test at the test batch size, valid as in training)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    cfg = model.cfg
    corpus = data.load_corpus(cfg.dataset, data_dir, download)
    if len(corpus.vocab) != ckpt["vocab_size"]:
        raise ValueError(f"the checkpoint's vocabulary ({ckpt['vocab_size']}) does not match "
                         f"{cfg.dataset} ({len(corpus.vocab)})")
    batch = cfg.test_batch_size if split == "test" else cfg.eval_batch_size
    device = default_device()  # where training evaluated it: the same numbers
    return evaluate(model.to(device), corpus.split(split).to(device), batch, cfg.bptt, progress)
