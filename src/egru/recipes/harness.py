"""One training loop for every recipe: config → model → steps → checkpoints → metrics → plots.

A task (``lm.LanguageModelTask``, ``classify.ClassifyTask``) says what is trained; the harness
does the rest, the same way for all: the learning-rate schedule, gradient clipping, the
thresholds' projection into [0, 1], validation and checkpoints (atomic ``last.pt`` and
``best.pt``, resumable to the same numbers), Ctrl-C at a step boundary, DistributedDataParallel
under ``torchrun``, ``metrics.jsonl`` (+ TensorBoard), a progress bar in steps, and plots.

A task has:

* ``KIND``, ``WHAT``, ``KEYS``, ``CONFIG``: its checkpoints' kind, name for messages, keys, and
  config class (a :class:`TrainConfig`);
* ``cfg``; ``splits``: the splits evaluated at the end, ``"valid"`` first when there is one
  (without it nothing is validated during training and ``best.pt`` is the final model);
  ``epoch_starts``: the step at which each epoch starts, then the total number of steps;
* ``build_model()``; ``begin(model, ckpt)``: its own state at the start (ckpt: None or resumed);
* ``batch(step) -> Batch``: this process's part of the step's batch;
* ``loss(net, batch, record) -> (loss, per-layer LayerStats or None)``; ``train_metrics(loss)``:
  what else a training loss says (say, perplexity);
* optionally ``loss_fills_gradients = True``: its ``loss`` leaves the step's gradients in the
  parameters' ``.grad`` itself (say, by real-time recurrent learning), and the loss it returns
  is only logged (default False: the harness backpropagates it). The harness zeroes the
  gradients before every ``loss`` call;
* ``evaluate(model, split, progress, stop) -> dict | None`` (None: ``stop()`` turned true) with
  ``"loss"`` and ``"layers"``; ``score(result)``: lower is better;
* ``checkpoint_state()`` (every process calls it) and ``model_from_checkpoint(ckpt)``;
* ``curves``: (metric, y scale) of each plotted learning curve; ``example_records(model)``: the
  per-layer records of one test sequence, for the event raster;
* optionally ``gradient_through_time(model) -> {layer: [‖∂L/∂s_t‖ for each t]}`` on a fixed
  sample of training sequences (:func:`egru.diagnostics.gradient_through_time`), logged with
  every validation.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

import egru
from egru import prune

from .common import (Checked, DeferredInterrupt, MetricsLog, check, check_model_fits, default_device, is_main_process,
                     option, positive_int, progress_bar, remove_temporaries, rng_state, save_atomic,
                     seed_everything, set_rng_state)


@dataclass(frozen=True)
class TrainConfig(Checked):
    """What the harness needs of a recipe's config (which inherits these fields)."""

    batch_size: int = option(32, "sequences per training step (over all processes)")
    eval_batch_size: int = option(32, "sequences per evaluation batch")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    threshold_lr: float = option(0.0, "the EGRU thresholds' learning rate (0 freezes them)")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay (not on thresholds)")
    beta1: float = option(0.9, "AdamW's first-moment decay")
    beta2: float = option(0.999, "AdamW's second-moment decay")
    clip: float = option(0.0, "largest gradient norm (0: no clipping)")
    epochs: int = option(10, "passes over the training data; the schedule spans them")
    max_steps: Optional[int] = option(None, "stop after this many steps (the schedule still spans epochs)",
                                      none="no limit")
    constant_fraction: float = option(0.0, "part of training at the peak learning rate, then cosine to 0")
    eval_every: int = option(0, "validate every this many steps (0: after each epoch)")
    log_every: int = option(20, "log training loss and per-layer activity every this many steps")
    seed: int = option(0, "random seed")
    # Gradual magnitude pruning of the recurrent weights (egru.prune), for every core.
    prune_to: float = option(0.0, "fraction of the recurrent weights pruned by the end of the "
                                  "pruning schedule (0: no pruning)")
    prune_start: float = option(0.0, "fraction of the training steps done when pruning starts")
    prune_end: float = option(0.5, "fraction of the training steps done when prune_to is reached")
    prune_every: int = option(100, "steps between two pruning updates of the schedule")
    prune_scope: str = option("layerwise", "prune each matrix to the schedule's sparsity, or "
                                           "rank all of them together", choices=prune.SCOPES)
    prune_matrices: str = option("both", "which recurrent weights are pruned: input (ih), "
                                         "recurrent (hh) or both", choices=("both", "ih", "hh"))

    def __post_init__(self):
        super().__post_init__()
        for name in ("batch_size", "eval_batch_size", "epochs", "log_every"):
            check(self, name, "a positive integer", positive_int)
        check(self, "max_steps", "a positive integer or None", lambda v: v is None or positive_int(v))
        check(self, "eval_every", "0 or a positive integer", lambda v: isinstance(v, int) and v >= 0)
        check(self, "seed", "an integer from 0 to 2**32 - 1",  # what numpy's seed accepts
              lambda v: isinstance(v, int) and 0 <= v < 2**32)
        # Comparisons with NaN are false: NaN is refused too.
        check(self, "lr", "a positive number", lambda v: v > 0 and math.isfinite(v))
        for name in ("threshold_lr", "weight_decay", "clip"):
            check(self, name, "a number >= 0", lambda v: v >= 0 and math.isfinite(v))
        for name in ("beta1", "beta2"):
            check(self, name, "a number in [0, 1)", lambda v: 0 <= v < 1)
        check(self, "constant_fraction", "a number in [0, 1]", lambda v: 0 <= v <= 1)
        check(self, "prune_to", "a number in [0, 1)", lambda v: 0 <= v < 1)
        check(self, "prune_start", "a number in [0, 1)", lambda v: 0 <= v < 1)
        check(self, "prune_end", f"a number in (prune_start = {self.prune_start}, 1]",
              lambda v: self.prune_start < v <= 1)
        check(self, "prune_every", "a positive integer", positive_int)
        check(self, "prune_scope", f"one of {prune.SCOPES}", lambda v: v in prune.SCOPES)
        check(self, "prune_matrices", "'both', 'ih' or 'hh'", lambda v: v in ("both", "ih", "hh"))


class Batch(NamedTuple):
    data: Any  # what the task's loss takes
    epoch: int
    progress: float  # fraction of the schedule done before this step, in [0, 1)
    tokens: int  # (sequence, step) pairs of this process, for the throughput
    # The task's own factor on this step's learning rate, as (numerator, denominator): multiplied,
    # then divided, as AWD's code does, which keeps its learning rates to the last bit.
    lr_ratio: tuple = (1, 1)


@dataclass
class Position:
    """Where a run stands; with the model, optimizer, random generators and the task's own state
    in a checkpoint, all that resuming needs."""

    step: int = 0
    epoch: int = 0  # epochs completed
    best: float = math.inf  # best validation score so far (lower is better)
    validated_step: int = 0  # the last step validated (an interrupted validation is redone)

    @classmethod
    def restore(cls, saved: dict) -> "Position":
        """From a checkpoint, written by this version or by the language model's first one."""
        return cls(step=saved["step"], epoch=saved["epoch"],
                   best=saved.get("best", saved.get("best_valid", math.inf)),
                   validated_step=saved.get("validated_step", saved["step"]))


def lr_factor(progress: float, constant_fraction: float) -> float:
    """Constant, then cosine to zero. ``progress`` in [0, 1] is the fraction of training done."""
    if progress <= constant_fraction:
        return 1.0
    x = (progress - constant_fraction) / max(1 - constant_fraction, 1e-12)
    return 0.5 * (1 + math.cos(math.pi * min(x, 1.0)))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; the thresholds in a group of their own, at their own rate, without weight decay."""
    thresholds = [p for n, p in model.named_parameters() if ".threshold" in n]
    others = [p for n, p in model.named_parameters() if ".threshold" not in n]
    groups = [{"params": others, "lr": cfg.lr, "base_lr": cfg.lr}]
    if thresholds:
        groups.append({"params": thresholds, "lr": cfg.threshold_lr, "base_lr": cfg.threshold_lr,
                       "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


class LayerTotals:
    """Per-layer :class:`egru.LayerStats` summed over calls: rates per step, MACs per token
    (a token: one step of one sequence)."""

    def __init__(self):
        self.sums: dict = {}

    RATES = ("activity", "backward_activity")  # per step: weighted by steps
    MACS = ("effective_macs", "dense_macs", "backward_effective_macs", "backward_dense_macs")
    DENSITIES = ("weight_density_ih", "weight_density_hh")  # of the last call

    def add(self, stats: list) -> "LayerTotals":
        for i, s in enumerate(stats):
            sums = self.sums.setdefault(i, dict.fromkeys(self.RATES + self.MACS + ("steps",), 0))
            for name in self.RATES:
                sums[name] += getattr(s, name) * s.steps
            for name in self.MACS + ("steps",):
                sums[name] += getattr(s, name)
            sums.update({name: getattr(s, name) for name in self.DENSITIES})
            if s.health is not None:  # an event layer's: per step, weighted by steps
                health = sums.setdefault("health", {})
                for name, value in s.health.as_dict().items():
                    health[name] = health.get(name, 0.0) + value * s.steps
        return self

    def summary(self) -> dict:
        def per_step(value, sums):
            return value / max(sums["steps"], 1)

        return {f"layer{i}": {**{name: per_step(sums[name], sums) for name in self.RATES},
                              **{f"{name}_per_token": per_step(sums[name], sums) for name in self.MACS},
                              **{name: sums[name] for name in self.DENSITIES},
                              **{name: per_step(v, sums) for name, v in sums.get("health", {}).items()}}
                for i, sums in sorted(self.sums.items())}


def gradient_norms(model: nn.Module) -> dict:
    """Each parameter's gradient norm, and ``"total"`` (what clipping compares with its bound)."""
    norms = {name: p.grad.detach().norm().item() for name, p in model.named_parameters() if p.grad is not None}
    norms["total"] = math.sqrt(sum(v * v for v in norms.values()))
    return norms


def make_pruner(model: nn.Module, cfg: TrainConfig, total_steps: int) -> Optional[prune.GradualPruning]:
    """The gradual pruning the config asks for, over ``total_steps`` (None: no pruning). Made
    before a checkpoint is loaded: it gives the model the parameter names pruned ones have."""
    if not cfg.prune_to:
        return None
    start = round(cfg.prune_start * total_steps)
    end = max(round(cfg.prune_end * total_steps), start + 1)
    matrices = prune.MATRICES if cfg.prune_matrices == "both" else (cfg.prune_matrices,)
    return prune.GradualPruning(model, cfg.prune_to, start_step=start, end_step=end,
                                every=cfg.prune_every, scope=cfg.prune_scope, matrices=matrices)


def load_model(model: nn.Module, ckpt: dict, what: str) -> nn.Module:
    """``model`` with a checkpoint's weights (pruned ones included); a ValueError naming
    ``what`` and the first tensor that does not fit when they do not."""
    state = ckpt["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"the checkpoint's model is not a state dict of tensors, so it does not fit {what}")
    prune.prepare_for_load(model, state)
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"the checkpoint does not fit {what}: {mismatch}")
    model.load_state_dict(state)
    return model


def state_dict_mismatch(expected: dict, given: dict) -> Optional[str]:
    """What first keeps ``given`` from loading where ``expected`` is (None: nothing), in one line:
    a tensor that is missing, one that is not expected, or one of another shape."""
    for name, tensor in expected.items():
        if name not in given:
            return f"it lacks {name} {tuple(tensor.shape)}"
        if given[name].shape != tensor.shape:
            return (f"{name} has shape {tuple(given[name].shape)} where the model expects "
                    f"{tuple(tensor.shape)}")
    unexpected = [name for name in given if name not in expected]
    if unexpected:
        return f"it holds {unexpected[0]} {tuple(given[unexpected[0]].shape)}, which the model does not have"
    return None


# --- processes --------------------------------------------------------------------------------

class World(NamedTuple):
    rank: int
    size: int
    group: Any  # a gloo group for Ctrl-C flags (None in a single process)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes."""
        value = value.detach().clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.size
        return value.item()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process; every process calls this at the same points.
        Through gloo: a CPU all-reduce, which does not wait for a GPU."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([float(flag)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return tensor.item() > 0

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every process's ``t`` concatenated along ``dim`` (the inverse of :func:`shard`)."""
        if not self.distributed:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)


def start_processes(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any: NCCL
    between GPUs, gloo between CPU processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(0, 1, None)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), dist.new_group(backend="gloo"))


def shard(batch: torch.Tensor, world: World, dim: int = 1) -> torch.Tensor:
    """This process's equal part of a batch along ``dim`` (its size divisible by the world's)."""
    per = batch.shape[dim] // world.size
    return batch.narrow(dim, world.rank * per, per)


# --- checkpoints ------------------------------------------------------------------------------

RUN_FILES = ("last.pt", "best.pt", "results.json", "metrics.jsonl")  # written atomically

def load_checkpoint(path, task_class) -> dict:
    """A checkpoint of ``task_class``'s kind; a ValueError for anything else."""
    path, what = Path(path), task_class.WHAT
    if not path.is_file():
        raise ValueError(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # what torch.load raises on a foreign file depends on its bytes
        message = f"{path} is not an {what} ({type(err).__name__}: {err})"
        raise ValueError(message.replace("\n", " ")) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != task_class.KIND:
        raise ValueError(f"{path} is not an {what}")
    missing = [key for key in task_class.KEYS if key not in ckpt]
    if missing:
        raise ValueError(f"{path} is an incomplete {what}: it lacks {', '.join(missing)}")
    try:
        task_class.CONFIG(**ckpt["config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds a configuration this version cannot use: {err}") from None
    return ckpt


# --- the loop ---------------------------------------------------------------------------------

class Progress:
    """A progress bar in steps (on the main process, when tqdm is installed)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.bar = progress_bar(total, desc, enabled, initial=initial)

    def show(self, entry: dict, metrics: dict) -> None:
        """A training log entry and the task's metrics of it, after the bar."""
        if self.bar is None:
            return
        shown = {"loss": f"{entry['loss']:.3f}", **{k: f"{v:.4g}" for k, v in metrics.items()}}
        shown["tok_s"] = f"{entry['tokens_per_second']:.0f}"
        if "layers" in entry:
            layers = entry["layers"].values()
            shown["act"] = f"{sum(v['activity'] for v in layers) / len(layers):.1%}"
        self.bar.set_postfix(shown, refresh=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(make_task, cfg: TrainConfig, run_dir, *, resume: bool = False, progress: bool = True,
          tensorboard: bool = True, plots: bool = True, desc: str = "train") -> dict:
    """Train the task ``make_task(device, world)`` builds; return its final evaluations.

    Checkpoints go to ``run_dir/last.pt`` (after every validation, at the end, and on Ctrl-C)
    and ``run_dir/best.pt`` (best validation score). A first Ctrl-C stops at the next step
    boundary (abandoning an evaluation under way, which resuming redoes), saves ``last.pt``
    there and raises KeyboardInterrupt; a second one raises at once and saves nothing.
    """
    run_dir = Path(run_dir)
    device = default_device()
    joined = not dist.is_initialized()
    world = start_processes(device)
    if cfg.batch_size % world.size:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by {world.size} processes")
    started = (run_dir / "metrics.jsonl").exists()
    if not resume and started:
        raise ValueError(f"{run_dir} already holds a run: continue it with --resume, "
                         "or choose another --run-dir")
    if is_main_process():
        remove_temporaries(run_dir, RUN_FILES)
    task = make_task(device, world)
    ckpt = None
    if resume and (started or (run_dir / "last.pt").exists()):
        if (run_dir / "last.pt").exists():
            ckpt = load_checkpoint(run_dir / "last.pt", type(task))
        elif is_main_process():  # stopped before its first checkpoint: resuming is starting again
            print(f"{run_dir} holds no checkpoint yet: starting the run from step 0")
    elif resume:
        raise ValueError(f"{run_dir} holds no run to resume (no metrics.jsonl, no last.pt)")
    if ckpt is not None:
        if dataclasses.replace(task.CONFIG(**ckpt["config"]), max_steps=cfg.max_steps) != cfg:
            raise ValueError("the run directory holds a run with a different configuration; "
                             "resume it without changing options other than --max-steps")
    result = Trainer(task, run_dir, device, world, ckpt, started, progress, tensorboard, plots, desc).run()
    if world.distributed and joined:
        # Leave the group together: a process exiting while gloo's threads still talk to the
        # others can abort ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
    return result


class Trainer:
    """The loop of :func:`train`, one small method per concern."""

    def __init__(self, task, run_dir: Path, device, world: World, ckpt, started: bool, progress, tensorboard,
                 plots, desc):
        self.task, self.cfg, self.run_dir, self.device, self.world = task, task.cfg, run_dir, device, world
        self.progress, self.plots = progress, plots
        check_model_fits(task.build_model, device)
        seed_everything(self.cfg.seed)
        self.model = task.build_model().to(device)
        planned = task.epoch_starts[-1]
        self.total_steps = min(planned, self.cfg.max_steps or planned)
        self.pruner = make_pruner(self.model, self.cfg, planned)  # spans the planned schedule
        self.optimizer = make_optimizer(self.model, self.cfg)
        egru.keep_thresholds_in_range(self.optimizer, self.model)
        self.position = Position()
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.position = Position.restore(ckpt["position"])
            self.agree_with_best()
            set_rng_state(ckpt["rng"])
            if self.pruner is not None:
                self.pruner.load_state_dict(ckpt["pruning"])
        task.begin(self.model, ckpt)
        self.net = nn.parallel.DistributedDataParallel(self.model) if world.distributed else self.model
        self.log = MetricsLog(run_dir, tensorboard) if is_main_process() else None
        if self.log is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            if started:  # what comes after the checkpoint is redone, a finished run's summary too
                step, validated = self.position.step, self.position.validated_step
                self.log.keep(lambda r: r["step"] <= step and not r["split"].startswith("best_")
                              and not (r["split"] == "valid" and r["step"] == step != validated))
        self.bar = Progress(self.total_steps, self.position.step, desc, progress)
        self.train_seconds, self.tokens_seen = 0.0, 0

    def agree_with_best(self) -> None:
        """Take the best score from ``best.pt``, the model it describes. ``best.pt`` is written
        before the ``last.pt`` that records its score, so a crash between the two leaves a
        ``best.pt`` ahead of ``last.pt``: the validation redone from ``last.pt`` then finds no
        improvement on what ``best.pt`` holds. Without a readable ``best.pt`` (removed by hand)
        nothing is best yet, and a validation that made one at the checkpoint's step is redone."""
        position = self.position
        try:
            best = load_checkpoint(self.run_dir / "best.pt", type(self.task))
        except ValueError:
            if math.isfinite(position.best) or self.finished():
                position.validated_step = -1
            position.best = math.inf
            return
        position.best = Position.restore(best["position"]).best

    def run(self) -> dict:
        with DeferredInterrupt() as self.interrupt:
            try:
                self.model.train()
                while True:
                    # A step boundary: the only place where the position, the parameters, the
                    # optimizer, the random generators and the task's state all agree.
                    if self.validation_due():
                        self.validate()
                    if self.world.any(self.interrupt.requested):
                        self.save("last.pt")
                        self.stop()
                    if self.finished():
                        break
                    self.step()
            finally:
                self.bar.close()
            result = self.evaluate_best() if is_main_process() else {}
            if self.world.any(self.interrupt.requested):  # the other processes wait here for the main one
                self.stop()  # last.pt, from the last validation, already holds the finished training
        if is_main_process():
            self.summarise(result)
        return result

    def step(self) -> None:
        task, cfg, position = self.task, self.cfg, self.position
        batch = task.batch(position.step)
        numerator, denominator = batch.lr_ratio
        for group in self.optimizer.param_groups:
            lr = group["base_lr"] * lr_factor(batch.progress, cfg.constant_fraction)
            group["lr"] = lr * numerator / denominator
        record = self.logged(position.step + 1)  # activity is recorded at the steps that log it
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        for module in self.model.modules():  # modules whose computation follows the schedule
            if hasattr(module, "schedule"):
                module.schedule(batch.progress)
        loss, stats = task.loss(self.net, batch, record)
        if not getattr(task, "loss_fills_gradients", False):
            loss.backward()
        grad_norms = gradient_norms(self.model) if record else None  # before clipping
        if cfg.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        position.step += 1
        if self.pruner is not None:  # every process alike: the masks follow the weights
            self.pruner.step(position.step)
        self.train_seconds += time.perf_counter() - start
        self.tokens_seen += batch.tokens * self.world.size
        position.epoch = bisect.bisect_right(task.epoch_starts, position.step) - 1
        if record:
            self.log_training(batch, loss, stats, grad_norms)
        self.bar.update()

    def logged(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == 1

    def log_training(self, batch: Batch, loss: torch.Tensor, stats, grad_norms: dict) -> None:
        value = self.world.mean(loss)
        metrics = self.task.train_metrics(value)
        entry = {"step": self.position.step, "epoch": batch.epoch, "split": "train", "loss": value,
                 **metrics, "lr": self.optimizer.param_groups[0]["lr"],
                 "tokens_per_second": self.tokens_seen / max(self.train_seconds, 1e-9),
                 "layers": LayerTotals().add(stats).summary(), "grad_norms": grad_norms}
        if self.log is not None:
            self.log.write(entry)
        self.bar.show(entry, metrics)

    def finished(self) -> bool:
        return self.position.step >= self.total_steps

    def validation_due(self) -> bool:
        position = self.position
        if position.validated_step == position.step:
            return False
        if self.cfg.eval_every:
            return position.step % self.cfg.eval_every == 0 or self.finished()
        return position.step in self.task.epoch_starts or self.finished()  # an epoch has just ended

    def validate(self) -> None:
        """Validate on the main process (the others wait in save()) and checkpoint. A validation
        abandoned for Ctrl-C stays due in the checkpoint. Without a validation split, best.pt
        is the final model."""
        position, validated, done = self.position, "valid" in self.task.splits, True
        improved = not validated and self.finished()
        if validated and is_main_process():
            result = self.task.evaluate(self.model, "valid", False, lambda: self.interrupt.requested)
            self.model.train()
            done = result is not None
            if done and hasattr(self.task, "gradient_through_time"):
                result["gradient_through_time"] = self.task.gradient_through_time(self.model)
                self.model.train()
            if done:
                self.log.write({"step": position.step, "epoch": position.epoch, "split": "valid", **result})
                score = self.task.score(result)
                improved = score < position.best
                position.best = min(position.best, score)
        if done:
            position.validated_step = position.step
        # best.pt first: a last.pt recording a best score is never ahead of the best.pt it describes
        self.save("best.pt", "last.pt") if improved else self.save("last.pt")

    def save(self, *names: str) -> None:
        state = self.task.checkpoint_state()  # may be a collective: every process takes part
        if not is_main_process():
            return
        ckpt = {"kind": self.task.KIND, "config": dataclasses.asdict(self.cfg), **state,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "position": dataclasses.asdict(self.position), "rng": rng_state()}
        if self.pruner is not None:
            ckpt["pruning"] = self.pruner.state_dict()
        for name in names:
            save_atomic(ckpt, self.run_dir / name)

    def stop(self):
        """End the run as Ctrl-C does, saying how to continue it."""
        if is_main_process():
            print(f"\ninterrupted at step {self.position.step}: continue from "
                  f"{self.run_dir / 'last.pt'} with --resume")
        raise KeyboardInterrupt

    def evaluate_best(self) -> dict:
        """The best model's final evaluations, by the main process alone."""
        task = self.task
        self.best = task.model_from_checkpoint(load_checkpoint(self.run_dir / "best.pt", type(task)))
        self.best.to(self.device)
        result = {"config": dataclasses.asdict(self.cfg)}
        for split in task.splits:
            result[split] = task.evaluate(self.best, split, self.progress, lambda: self.interrupt.requested)
        return result

    def summarise(self, result: dict) -> None:
        """Throughput, the final evaluations in metrics.jsonl, plots."""
        result["train_seconds"] = self.train_seconds
        result["train_tokens_per_second"] = self.tokens_seen / max(self.train_seconds, 1e-9)
        for split in self.task.splits:
            self.log.write({"step": self.position.step, "epoch": self.position.epoch,
                            "split": f"best_{split}", **result[split]})
        self.log.close()
        if self.plots:
            try:
                from . import plots
            except ImportError:
                print("matplotlib is not installed: no plots (pip install matplotlib)")
                return
            plots.plot_run(self.run_dir, self.task, self.best)
