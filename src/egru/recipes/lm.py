"""Word-level language modeling (SPEC §6): an AWD-style model with EGRU, GRU or LSTM layers.

``train_and_evaluate(cfg, run_dir)`` trains it through the harness (:mod:`.harness`: resumable
checkpoints, ``metrics.jsonl``, DDP under ``torchrun``, plots); this module supplies the model,
the batches (truncated BPTT with a carried state and AWD's variable length) and the evaluation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from egru import data

from . import harness
from .common import MeasuredTorchThreads, check, default_device, option, positive_int, progress_bar
from .cores import MODELS, CoreConfig, core_config, gradient_through_time, make_core, map_state
from .harness import Batch, LayerTotals, TrainConfig


@dataclass(frozen=True)
class LMConfig(TrainConfig, CoreConfig):
    dataset: str = option("ptb", "the corpus", choices=tuple(sorted(data.CORPORA)))
    embedding_size: int = option(200, "word embedding size, also the last layer's (tied decoder)")
    hidden_size: int = option(400, "units of every recurrent layer but the last")
    num_layers: int = option(2, "recurrent layers")
    test_batch_size: int = option(1, "sequences per batch of the final test evaluation")
    bptt: int = option(35, "steps of truncated backpropagation through time")
    variable_bptt: bool = option(True, "AWD's random BPTT lengths: around bptt (95%) or bptt/2 (5%)")
    dropout_embedding: float = option(0.3, "locked dropout on the embedded words")
    dropout_words: float = option(0.1, "fraction of words removed from the embedding matrix")
    dropout_between: float = option(0.2, "locked dropout between recurrent layers")
    dropout_output: float = option(0.3, "locked dropout before the decoder")
    # The last layer's events are all the tied decoder sees: it may get a threshold of its own.
    last_threshold_mean: Optional[float] = option(
        None, "EGRU: the last layer's threshold mean", type=float, none="--threshold-mean's")
    reset_state_per_chunk: bool = option(False, "restart the state every chunk (as the reference code)")
    # The language model's own defaults of the harness's and the cores' fields:
    eval_batch_size: int = 10
    lr: float = 2e-3
    weight_decay: float = 0.1
    beta1: float = 0.0
    clip: float = 0.25
    constant_fraction: float = 0.7
    dropconnect: float = 0.3

    def __post_init__(self):
        super().__post_init__()
        if self.dataset not in data.CORPORA:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(data.CORPORA)}")
        for name in ("embedding_size", "hidden_size", "num_layers", "test_batch_size", "bptt"):
            check(self, name, "a positive integer", positive_int)
        for name in ("dropout_embedding", "dropout_words", "dropout_between", "dropout_output"):
            check(self, name, "a number in [0, 1)", lambda v: 0 <= v < 1)


# Each preset lists what differs from LMConfig's defaults; what is listed is what runs.
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
    # Models that train to a meaningful perplexity on two CPU cores (10 epochs of PTB in about
    # 40 minutes), each core with the settings that did best for it in the sweeps and full runs
    # of docs/results.md. A high threshold keeps the EGRU's first layer silent, a low one lets
    # the last layer, whose events are all the tied decoder sees, speak; the EGRU needs far less
    # regularisation than the GRU and LSTM (its silent units already withhold most of its
    # outputs); the EGRU and the GRU did better with a higher learning rate (the LSTM was not
    # run with it). The GRU and LSTM presets keep the EGRU's thresholds, which they do not use.
    "cpu-small-egru": LMConfig(
        model="egru", lr=3e-3, threshold_mean=0.6, last_threshold_mean=0.15, dropout_embedding=0.05,
        dropout_words=0.0, dropout_between=0.0, dropout_output=0.05, dropconnect=0.0),
    "cpu-small-gru": LMConfig(
        model="gru", lr=3e-3, threshold_mean=0.6, last_threshold_mean=0.15, dropout_embedding=0.15,
        dropout_words=0.1, dropout_between=0.1, dropout_output=0.15, dropconnect=0.15),
    "cpu-small-lstm": LMConfig(
        model="lstm", lr=2e-3, threshold_mean=0.6, last_threshold_mean=0.15, dropout_embedding=0.15,
        dropout_words=0.1, dropout_between=0.1, dropout_output=0.15, dropconnect=0.15),
}
# Names that take the model from --model: "cpu-small" with --model gru is the preset cpu-small-gru.
FAMILIES = sorted({name.rsplit("-", 1)[0] for name in PRESETS if name.rsplit("-", 1)[1] in MODELS})


def preset(name: str, model: Optional[str] = None) -> LMConfig:
    """The preset ``name``; with a model, the preset ``name-model`` when there is one (a name
    lookup: ``cpu-small`` + ``gru`` is ``cpu-small-gru``), else ``name`` with that model (a
    family's EGRU preset for a model it has none of: ``cpu-small`` + ``embedded``)."""
    named = f"{name}-{model or 'egru'}"
    if named in PRESETS:
        return PRESETS[named]
    if name in FAMILIES and name not in PRESETS:  # a model the family has no preset of
        name = f"{name}-egru"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS) + FAMILIES}")
    return PRESETS[name] if model is None else dataclasses.replace(PRESETS[name], model=model)


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


class LanguageModel(nn.Module):
    """Embedding → stacked recurrent cores → tied decoder, with AWD-style dropouts."""

    def __init__(self, cfg: LMConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        E, H, L = cfg.embedding_size, cfg.hidden_size, cfg.num_layers
        self.sizes = [H] * (L - 1) + [E]
        self.embedding = nn.Embedding(vocab_size, E)
        cores = [core_config(cfg)] * (L - 1)
        if cfg.last_threshold_mean is None:
            cores.append(core_config(cfg))
        else:
            cores.append(core_config(cfg, threshold_mean=cfg.last_threshold_mean))
        inputs = [E] + self.sizes[:-1]
        self.layers = nn.ModuleList(make_core(c, i, h) for c, i, h in zip(cores, inputs, self.sizes))
        self.decoder = nn.Linear(E, vocab_size)
        self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def initial_state(self, batch_size: int) -> list:
        return [layer.initial_state(batch_size, self.embedding.weight) for layer in self.layers]

    def forward(self, tokens: torch.Tensor, state: list, record: bool = False):
        """tokens (T, B) → logits (T, B, V), new state, and (with record) each layer's record."""
        cfg, training = self.cfg, self.training
        x = embedded_dropout(self.embedding, tokens, cfg.dropout_words, training)
        x = locked_dropout(x, cfg.dropout_embedding, training)
        new_state, records = [], []
        for i, layer in enumerate(self.layers):
            x, s, rec = layer(x, state[i], record=record)
            new_state.append(s)
            if record:
                records.append(rec)
            last = i == len(self.layers) - 1
            x = locked_dropout(x, cfg.dropout_output if last else cfg.dropout_between, training)
        return self.decoder(x), new_state, records

    def layer_stats(self, records: list) -> list:
        return [layer.stats(rec) for layer, rec in zip(self.layers, records)]

    def gradient_through_time(self, tokens: torch.Tensor, targets: torch.Tensor) -> dict:
        """``‖∂L/∂s_t‖`` of every layer's state at every step (:func:`.cores.gradient_through_time`)
        from the zero state, L the mean cross-entropy of ``targets`` given ``tokens`` (T, B)."""
        def loss_of(out):
            return nn.functional.cross_entropy(self.decoder(out).flatten(0, 1), targets.flatten())

        return gradient_through_time(self.layers, self.embedding(tokens).detach(), loss_of)


# --- data -------------------------------------------------------------------------------------

def batchify(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(N,) token ids → (N // B, B): B contiguous streams, one per column."""
    n = ids.numel() // batch_size
    return ids[: n * batch_size].view(batch_size, n).t().contiguous()


def chunk_length(cfg: LMConfig, rng: random.Random) -> int:
    """AWD variable-length BPTT: around bptt most of the time, around bptt/2 sometimes."""
    if not cfg.variable_bptt:
        return cfg.bptt
    base = cfg.bptt if rng.random() < 0.95 else cfg.bptt / 2
    return max(5, int(rng.gauss(base, 5)))


def chunk_plan(cfg: LMConfig, rows: int) -> list:
    """(epoch, first row, rows) of every training step. The lengths come from a generator of
    their own, seeded by cfg.seed, so the plan is known before training: the progress bar
    counts real steps and a resumed run finds its place by the step alone."""
    rng, plan = random.Random(cfg.seed), []
    for epoch in range(cfg.epochs):
        row = 0
        while row < rows:
            n = min(chunk_length(cfg, rng), rows - row)
            plan.append((epoch, row, n))
            row += n
    return plan


def _check_corpus_fits(cfg: LMConfig, corpus) -> None:
    """Refuse batch sizes that leave a split without a single (input, target) pair."""
    for name, split in (("batch_size", "train"), ("eval_batch_size", "valid"), ("test_batch_size", "test")):
        tokens = corpus.split(split).numel()
        if tokens // getattr(cfg, name) < 2:
            raise ValueError(f"{name} {getattr(cfg, name)} is too large: {cfg.dataset}'s {split} "
                             f"split has {tokens} tokens")


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: LanguageModel, ids: torch.Tensor, batch_size: int, bptt: int,
             progress: bool = False, stop=lambda: False) -> Optional[dict]:
    """Mean cross-entropy, perplexity and per-layer sparsity over a whole split; None when
    ``stop()`` turns true between two batches (training's Ctrl-C: the evaluation is redone)."""
    model.eval()
    stream = batchify(ids, batch_size)
    state = model.initial_state(batch_size)
    total_loss, tokens = 0.0, 0
    layers = LayerTotals()
    bar = progress_bar(stream.shape[0] - 1, "evaluate", progress)
    threads = MeasuredTorchThreads()
    try:
        for i in range(0, stream.shape[0] - 1, bptt):
            if stop():
                return None
            n = min(bptt, stream.shape[0] - 1 - i)
            inputs, targets = stream[i:i + n], stream[i + 1:i + 1 + n]
            with threads.step(batch_size, n):
                logits, state, records = model(inputs, state, record=True)
                total_loss += nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                          reduction="sum").item()
            tokens += targets.numel()
            layers.add(model.layer_stats(records))
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    loss = total_loss / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "layers": layers.summary()}


def eval_batch_size(cfg: LMConfig, split: str) -> int:
    """The test at the test batch size, the other splits at the evaluation batch size."""
    return cfg.test_batch_size if split == "test" else cfg.eval_batch_size


def model_from_checkpoint(ckpt: dict) -> LanguageModel:
    cfg = LMConfig(**ckpt["config"])
    model = LanguageModel(cfg, ckpt["vocab_size"])
    return harness.load_model(model, ckpt, f"a {cfg.model} language model")


# --- the task the harness trains --------------------------------------------------------------

class LanguageModelTask:
    """The language model for :func:`harness.train`: each process trains on its own columns of
    the global batch and carries their state from chunk to chunk (truncated BPTT)."""

    KIND = "egru-language-model"
    WHAT = "egru language-model checkpoint"
    KEYS = ("config", "vocab_size", "model", "optimizer", "position", "rng", "carried_state")
    CONFIG = LMConfig
    splits = ("valid", "test")
    curves = (("perplexity", "log"),)
    model_from_checkpoint = staticmethod(model_from_checkpoint)

    def __init__(self, cfg: LMConfig, corpus, device, world: harness.World):
        _check_corpus_fits(cfg, corpus)
        self.cfg, self.corpus, self.device, self.world = cfg, corpus, device, world
        self.title = f"{cfg.model} on {cfg.dataset}"
        self.stream = harness.shard(batchify(corpus.train, cfg.batch_size).to(device), world)
        self.rows = self.stream.shape[0] - 1  # rows of (input, target) pairs per epoch
        self.plan = chunk_plan(cfg, self.rows)
        starts = [step for step, (_, row, _) in enumerate(self.plan) if row == 0]
        self.epoch_starts = starts + [len(self.plan)]

    def build_model(self) -> LanguageModel:
        return LanguageModel(self.cfg, len(self.corpus.vocab))

    def begin(self, model: LanguageModel, ckpt: Optional[dict]) -> None:
        self.model = model
        carried = model.initial_state(self.cfg.batch_size)
        if ckpt is not None:
            carried = map_state(lambda t: t.to(self.device), ckpt["carried_state"])
        self.carried = map_state(lambda t: harness.shard(t, self.world), carried)  # (1, B, H) each

    GRADIENT_SAMPLE = 8  # training streams whose first chunk's gradient through time is logged

    def gradient_through_time(self, model: LanguageModel) -> dict:
        """The state gradients of the first chunk of the first streams, by the model in eval mode."""
        columns, n = min(self.GRADIENT_SAMPLE, self.stream.shape[1]), min(self.cfg.bptt, self.rows)
        model.eval()
        return model.gradient_through_time(self.stream[:n, :columns], self.stream[1:n + 1, :columns])

    def batch(self, step: int) -> Batch:
        epoch, row, n = self.plan[step]
        inputs, targets = self.stream[row:row + n], self.stream[row + 1:row + 1 + n]
        progress = (epoch * self.rows + row) / (self.cfg.epochs * self.rows)
        # AWD: the learning rate follows the chunk length
        return Batch((inputs, targets), epoch, progress, targets.numel(), (n, self.cfg.bptt))

    def loss(self, net, batch: Batch, record: bool):
        inputs, targets = batch.data
        if self.cfg.reset_state_per_chunk:
            self.carried = self.model.initial_state(inputs.shape[1])
        logits, state, records = net(inputs, self.carried, record=record)
        self.carried = map_state(torch.Tensor.detach, state)  # truncated BPTT
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, self.model.layer_stats(records) if record else None

    def train_metrics(self, loss: float) -> dict:
        return {"perplexity": math.exp(loss)}

    def evaluate(self, model, split: str, progress: bool = False, stop=lambda: False) -> Optional[dict]:
        return evaluate(model, self.corpus.split(split).to(self.device), eval_batch_size(self.cfg, split),
                        self.cfg.bptt, progress, stop)

    def score(self, result: dict) -> float:
        return result["perplexity"]

    def checkpoint_state(self) -> dict:
        carried = map_state(self.world.gather, self.carried)  # a collective: every process takes part
        return {"vocab_size": len(self.corpus.vocab), "carried_state": map_state(torch.Tensor.cpu, carried)}

    @torch.no_grad()
    def example_records(self, model: LanguageModel, tokens: int = 120) -> list:
        model.eval()
        text = self.corpus.test[:tokens].view(-1, 1).to(self.device)
        return model(text, model.initial_state(1), record=True)[2]


def train_and_evaluate(cfg: LMConfig, run_dir, *, data_dir=None, download: bool = False,
                       resume: bool = False, progress: bool = True) -> dict:
    """Train a language model (see :func:`harness.train`); return the best model's validation
    and test metrics."""

    def make_task(device, world):
        return LanguageModelTask(cfg, data.load_corpus(cfg.dataset, data_dir, download), device, world)

    return harness.train(make_task, cfg, run_dir, resume=resume, progress=progress)


def evaluate_checkpoint(path, split: str = "test", data_dir=None, download: bool = False,
                        progress: bool = True) -> dict:
    """Evaluate a saved model on a split (test at the test batch size, others as in training)."""
    ckpt = harness.load_checkpoint(path, LanguageModelTask)
    model = model_from_checkpoint(ckpt)
    cfg = model.cfg
    corpus = data.load_corpus(cfg.dataset, data_dir, download)
    if len(corpus.vocab) != ckpt["vocab_size"]:
        raise ValueError(f"the checkpoint's vocabulary ({ckpt['vocab_size']}) does not match "
                         f"{cfg.dataset} ({len(corpus.vocab)})")
    device = default_device()  # where training evaluated it: the same numbers
    return evaluate(model.to(device), corpus.split(split).to(device), eval_batch_size(cfg, split), cfg.bptt,
                    progress)
