"""Online learning (SPEC §4): one EGRU cell and a linear readout, trained by real-time recurrent
learning (:mod:`egru.rtrl`) or by backpropagation through time on the same budget, through the
harness (:mod:`.harness`).

Tasks, each a classification of a sequence by the readout of the cell's output ``y`` at its
last step (the loss: the cross-entropy there, the mean over the batch):

* ``rowmnist``: an MNIST image (:func:`egru.data.load_mnist`) as 28 steps of its 28-pixel rows,
  scaled to [0, 1]; ``train_size``/``test_size`` take the first so many images. No validation
  split: nothing is validated during training and ``best.pt`` is the final model.
* ``delay``: generated from ``seed``: a cue, one of ``classes`` one-hot on as many input
  channels, at step 0; ``delay`` steps of blank input (Gaussian noise of std ``noise`` on the cue
  channels); then a go signal on a channel of its own, at which the class must be given:
  ``delay + 2`` steps that test memory across the delay.

One harness step takes ``update_every`` (k; by default the sequence's length T) time steps of a
batch of sequences, then the optimizer steps. The task carries the learner's state from one
harness step to the next within a sequence and starts afresh at each sequence:

* ``rtrl``: each time step advances the state and the influence matrix, and the gradient of a
  loss at that step is accumulated as the step is taken (``RTRL.accumulate``). With k = T the
  optimizer steps once per sequence and the gradient is exactly BPTT's. With k < T the
  parameters may change inside a sequence and the influence, carried across the changes, gives
  the usual online approximation of the gradient. (Here the only loss is at the last step: the
  harness steps before it have no gradient and change no parameter, AdamW skipping parameters
  without one; so both learnings update once per sequence whatever k is.)
* ``bptt``: the k steps are unrolled with autograd from the carried state, which is cut from
  the graph at each harness step (truncated BPTT, as the language model does): with k < T the
  loss at the last step reaches back over the sequence's last harness step only.

Both learnings start from the same model and see the same examples in the same order under the
same seed, so comparisons at an equal number of examples seen (or of steps) are fair. The task
fills the gradients itself for both (``loss_fills_gradients``): RTRL's do not come from a
backward pass, and a harness step without a loss has none.

The training loss logged at a harness step is the cross-entropy of the readout at its last time
step: the loss trained on when the step ends a sequence, else the prediction so far (not
trained on). Evaluation is a forward pass alone, the cell over each test sequence from the zero
state in eval mode: loss, accuracy and the layer's activity and MACs (``layers``, as for every
recipe). In training the ``layers`` statistics are those of the forward pass (their backward
figures are what BPTT's backward costs); for RTRL, ``influence_macs_per_token`` is what its
influence update costs (:attr:`egru.rtrl.RTRL.macs`), per time step of one sequence: that of
the logged step in a training record, that of the whole training with the final evaluations.

Checkpoints resume exactly: a checkpoint inside a sequence (with k < T, on Ctrl-C, after a
validation or at ``max_steps``) holds the carried state, BPTT's ``(y, c)`` or the RTRL learner's
state and influence matrix (B × H × P numbers, P the trained parameter entries: it can be
large); one at a sequence boundary (every one when k = T) holds none.

Limits: RTRL runs in one process (under ``torchrun`` it is refused: its gradients bypass DDP's
all-reduce; BPTT trains under DDP as the other recipes do), and needs zoneout and DropConnect 0,
and pruning only with k = T (an RTRL learner keeps the pruning masks for a whole sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import egru
from egru import data
from egru.modules import _effective_weight
from egru.rtrl import RTRL
from egru.state import EGRUState

from . import classify, harness
from .common import MeasuredTorchThreads, check, option, positive_int
from .cores import CoreConfig, core_config, make_core, map_state
from .harness import Batch, LayerTotals, TrainConfig

TASK_NAMES = ("rowmnist", "delay")  # the keys of TASKS, below
LEARNINGS = ("rtrl", "bptt")
MNIST_ROWS = 28  # rowmnist's steps, of 28 pixels each
DELAY_SIZES = {"train": 4096, "test": 1024}  # delay sequences generated when no size is given


@dataclass(frozen=True)
class OnlineConfig(TrainConfig, CoreConfig):
    task: str = option("delay", "the task", choices=TASK_NAMES)
    learning: str = option("rtrl", "how gradients are computed: real-time recurrent learning or "
                                   "(truncated) backpropagation through time", choices=LEARNINGS)
    hidden_size: int = option(32, "units of the EGRU cell")
    update_every: Optional[int] = option(None, "time steps per training step: the optimizer steps after "
                                               "every this many steps of a sequence", type=int,
                                         none="the sequence length")
    train_size: Optional[int] = option(None, "training sequences: the first this many MNIST images, or "
                                             "this many generated delay sequences", type=int,
                                       none="all MNIST's, 4096 delay sequences")
    test_size: Optional[int] = option(None, "test sequences, as train_size", type=int,
                                      none="all MNIST's, 1024 delay sequences")
    classes: int = option(4, "delay: the cues (classes), one-hot on as many input channels")
    delay: int = option(20, "delay: steps between the cue and the go signal")
    noise: float = option(0.0, "delay: standard deviation of the Gaussian noise on the cue channels "
                               "during the delay")
    dtype: str = option("float32", "floating-point type of the parameters and inputs",
                        choices=("float32", "float64"))
    # Online learning's own defaults of the harness's and the core's fields (those of classification
    # but the learning rate; not tuned):
    eval_batch_size: int = 1000
    lr: float = 3e-3
    pseudo_derivative_support: float = 2.0
    # One EGRU cell: the other cores and the embedded model's quantisation have no place here.
    FIXED = ("model", "quantize", "quantize_start", "q15_ranges", "threshold_parametrization")

    def __post_init__(self):
        super().__post_init__()
        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASK_NAMES}")
        check(self, "learning", f"one of {LEARNINGS}", lambda v: v in LEARNINGS)
        check(self, "model", "'egru' (online learning trains one EGRU cell)", lambda v: v == "egru")
        check(self, "threshold_parametrization", "'projected' (RTRL learns the threshold itself)",
              lambda v: v == "projected")
        check(self, "dtype", "'float32' or 'float64'", lambda v: v in ("float32", "float64"))
        check(self, "hidden_size", "a positive integer", positive_int)
        check(self, "classes", "an integer >= 2", lambda v: positive_int(v) and v >= 2)
        check(self, "delay", "an integer >= 0", lambda v: isinstance(v, int) and v >= 0)
        check(self, "noise", "a number >= 0", lambda v: v >= 0 and math.isfinite(v))
        for name in ("train_size", "test_size"):
            check(self, name, "a positive integer or None", lambda v: v is None or positive_int(v))
        T = self.sequence_length
        check(self, "update_every", f"None or an integer from 1 to the sequence length, {T}",
              lambda v: v is None or (positive_int(v) and v <= T))
        if self.learning == "rtrl":
            for name in ("zoneout", "dropconnect"):
                check(self, name, "0 with learning rtrl", lambda v: v == 0)
            check(self, "prune_to", f"0 with learning rtrl and update_every below the sequence length "
                                    f"({T}): an RTRL learner keeps the pruning masks for a whole sequence",
                  lambda v: v == 0 or self.steps_per_update == T)

    @property
    def sequence_length(self) -> int:
        return MNIST_ROWS if self.task == "rowmnist" else self.delay + 2

    @property
    def steps_per_update(self) -> int:
        return self.update_every or self.sequence_length


# --- data -------------------------------------------------------------------------------------

def load_rowmnist(cfg: OnlineConfig, data_dir=None, download: bool = False) -> classify.Sequences:
    """MNIST's images as sequences of their rows: x (N, 28, 28) uint8 pixels, 10 classes."""
    return classify.Sequences(data.load_mnist(data_dir, download), num_classes=10)


def generate_delay(cfg: OnlineConfig, data_dir=None, download: bool = False) -> classify.Sequences:
    """The delay task (module docstring) from ``cfg.seed``: x (N, delay + 2, classes + 1)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    C, T = cfg.classes, cfg.sequence_length

    def split(n):
        labels = torch.randint(C, (n,), generator=generator)
        x = torch.zeros(n, T, C + 1)
        x[:, 1:-1, :C] = cfg.noise * torch.randn(n, T - 2, C, generator=generator)
        x[torch.arange(n), 0, labels] = 1.0  # the cue
        x[:, -1, C] = 1.0  # go: answer now
        return x, labels

    sizes = {"train": cfg.train_size, "test": cfg.test_size}
    return classify.Sequences({s: split(n or DELAY_SIZES[s]) for s, n in sizes.items()}, num_classes=C)


TASKS = {"rowmnist": load_rowmnist, "delay": generate_delay}


def scaled(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Data as the cell's input, in ``dtype``: uint8 pixels scaled to [0, 1], other values as
    they are."""
    return x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)


# --- model ------------------------------------------------------------------------------------

class OnlineModel(nn.Module):
    """One :class:`egru.EGRUCell` and a linear readout of its output ``y``.

    The cell holds the parameters (what RTRL learns). Whole stretches of a sequence (BPTT,
    evaluation) run through an EGRU core (:mod:`.cores`) that computes with the cell's
    parameters, for its backends, records and statistics."""

    def __init__(self, cfg: OnlineConfig, input_size: int, num_classes: int):
        super().__init__()
        dtype = getattr(torch, cfg.dtype)
        self.cell = egru.EGRUCell(input_size, cfg.hidden_size, dtype=dtype, threshold_mean=cfg.threshold_mean,
                                  dampening_factor=cfg.dampening_factor, zoneout=cfg.zoneout,
                                  pseudo_derivative_support=cfg.pseudo_derivative_support, init=cfg.init)
        self.readout = nn.Linear(cfg.hidden_size, num_classes, dtype=dtype)
        # Not a submodule: its own parameters are never used, the cell's take their place.
        self.__dict__["layer"] = make_core(core_config(cfg), input_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, state: Optional[EGRUState] = None, record: bool = False):
        """x (T, B, I) from ``state`` ((1, B, H) each; zeros if None) → the readout of ``y`` at
        the last step (B, classes), the state after, and (with record) the layer's record."""
        cell, layer = self.cell, self.layer
        layer.train(self.training)
        params = {"weight_ih_l0": _effective_weight(cell, "weight_ih"),  # a pruned weight: masked
                  "weight_hh_l0": _effective_weight(cell, "weight_hh"),
                  "bias_ih_l0": cell.bias_ih, "bias_hh_l0": cell.bias_hh, "threshold_l0": cell.threshold}
        y, state, record = torch.func.functional_call(layer, params, (x, state), {"record": record})
        return self.readout(y[-1]), state, record

    @property
    def dtype(self) -> torch.dtype:
        return self.readout.weight.dtype


@torch.no_grad()
def evaluate(model: OnlineModel, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             stop=lambda: False) -> Optional[dict]:
    """Mean cross-entropy, accuracy and the layer's activity and MACs over a split, by a forward
    pass from the zero state; None when ``stop()`` turns true between two batches."""
    model.eval()
    total_loss, correct, layers = 0.0, 0, LayerTotals()
    for i in range(0, len(x), batch_size):
        if stop():
            return None
        targets = y[i:i + batch_size]
        logits, _, record = model(scaled(x[i:i + batch_size], model.dtype).transpose(0, 1), record=True)
        total_loss += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += int((logits.argmax(-1) == targets).sum())
        layers.add([model.layer.stats(record)])
    return {"loss": total_loss / len(x), "accuracy": correct / len(x), "sequences": len(x),
            "layers": layers.summary()}


def model_from_checkpoint(ckpt: dict) -> OnlineModel:
    cfg = OnlineConfig(**ckpt["config"])
    model = OnlineModel(cfg, ckpt["input_size"], ckpt["num_classes"])
    return harness.load_model(model, ckpt, "an online-learning EGRU")


# --- the RTRL learner's state -----------------------------------------------------------------

def learner_state(learner: RTRL) -> EGRUState:
    """The learner's ``(y, c)`` now, as a core's state ((1, B, H) each)."""
    y, c = learner.state
    return EGRUState(y.unsqueeze(0), c.unsqueeze(0))


# --- the task the harness trains --------------------------------------------------------------

class OnlineTask(classify.ClassifyTask):
    """Online learning for :func:`harness.train`: classification's data, splits and epochs (one
    shuffled pass over the training set each, in whole batches), each sequence taken
    ``update_every`` time steps per harness step."""

    KIND = "egru-online"
    WHAT = "egru online-learning checkpoint"
    KEYS = ("config", "input_size", "num_classes", "model", "optimizer", "position", "rng", "carried",
            "influence_macs")
    CONFIG = OnlineConfig
    loss_fills_gradients = True  # see the module docstring
    model_from_checkpoint = staticmethod(model_from_checkpoint)

    def __init__(self, cfg: OnlineConfig, sequences: classify.Sequences, device, world: harness.World):
        if world.distributed and cfg.learning == "rtrl":
            raise ValueError("learning rtrl runs in one process: its gradients would bypass DDP's "
                             "all-reduce; start it without torchrun, or use learning bptt")
        super().__init__(cfg, sequences, device, world)
        self.title = f"{cfg.learning} on {cfg.task}"
        T, k = cfg.sequence_length, cfg.steps_per_update
        if self.data["train"][0].shape[1] != T:
            raise ValueError(f"{cfg.task}'s sequences have {self.data['train'][0].shape[1]} steps, not {T}")
        self.chunks = [(start, min(k, T - start)) for start in range(0, T, k)]  # (first step, steps)
        train = len(self.data["train"][0])
        if train < cfg.batch_size:
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {train} training sequences "
                             "(online learning takes whole batches only)")
        self.batches_per_epoch = train // cfg.batch_size
        self.steps_per_epoch = self.batches_per_epoch * len(self.chunks)
        self.epoch_starts = [e * self.steps_per_epoch for e in range(cfg.epochs + 1)]

    def build_model(self) -> OnlineModel:
        return OnlineModel(self.cfg, self.input_size, self.num_classes)

    def begin(self, model: OnlineModel, ckpt: Optional[dict]) -> None:
        super().begin(model, ckpt)
        # Within a sequence: BPTT's state (y, c), or the RTRL learner; None at a sequence boundary.
        self.carried, self.step_macs, self.step_tokens = None, 0, 0
        self.influence_macs, self.influence_tokens = 0, 0  # RTRL's, over the whole training
        # An RTRL step is some hundred small operations on the influence matrix, each of which
        # synchronises torch's threads: when another process takes a core, the threads stall at
        # every one, and a step can take tens of times longer than on one thread (on idle cores
        # the threads win). The learner's numbers are the same on any number of threads.
        self.learner_threads = MeasuredTorchThreads()
        if ckpt is not None:
            self.influence_macs, self.influence_tokens = ckpt["influence_macs"]
            if ckpt["carried"] is not None:
                self.carried = self._restore(ckpt["carried"])

    def _learner(self, batch_size: int) -> RTRL:
        """A fresh RTRL learner for a batch of new sequences (it takes the cell's pruning masks)."""
        learner = RTRL(self.model.cell, train_threshold=self.cfg.threshold_lr > 0)
        learner.reset(batch_size)
        return learner

    def _restore(self, carried):
        if self.cfg.learning == "rtrl":
            learner = self._learner(carried["y"].shape[0])
            learner.load_state_dict(carried)
            return learner
        return map_state(lambda t: harness.shard(t.to(self.device), self.world), carried)

    def batch(self, step: int) -> Batch:
        epoch, within = divmod(step, self.steps_per_epoch)
        i, chunk = divmod(within, len(self.chunks))
        start, steps = self.chunks[chunk]
        bs = self.cfg.batch_size
        index = self._order(epoch)[i * bs:(i + 1) * bs].tensor_split(self.world.size)[self.world.rank]
        x, y = self.data["train"]
        index = index.to(x.device)
        inputs = scaled(x[index, start:start + steps], self.model.dtype).transpose(0, 1)  # (steps, B, I)
        return Batch((inputs, y[index], start), epoch, step / self.epoch_starts[-1],
                     inputs.shape[0] * inputs.shape[1])

    def loss(self, net, batch: Batch, record: bool):
        """Take the batch's time steps, filling the gradients of a loss among them (there: the
        sequence's last step); return the loss logged (module docstring) and the statistics."""
        inputs, targets, start = batch.data
        first, last = start == 0, start + len(inputs) == self.cfg.sequence_length
        if self.cfg.learning == "rtrl":
            loss, stats = self._rtrl(net, inputs, targets, start, last, record)
        else:
            loss, stats = self._bptt(net, inputs, targets, first, last, record)
        if last:
            self.carried = None
        return loss.detach(), stats

    def _bptt(self, net, inputs, targets, first: bool, last: bool, record: bool):
        with torch.set_grad_enabled(last):
            logits, state, layer_record = net(inputs, None if first else self.carried, record=record)
            loss = nn.functional.cross_entropy(logits, targets)
        if last:
            loss.backward()
        self.carried = state.detach()  # truncated BPTT
        return loss, [self.model.layer.stats(layer_record)] if record else None

    def _rtrl(self, net, inputs, targets, start: int, last: bool, record: bool):
        if start == 0:
            self.carried = self._learner(len(targets))
        learner, stats = self.carried, None
        if record:  # the same steps as a forward pass, for the layer's statistics
            with torch.no_grad():
                layer_record = self.model(inputs, learner_state(learner), record=True)[2]
            stats = [self.model.layer.stats(layer_record)]
        # on all of torch's threads or on one, as measured at this place of a sequence (the cost
        # of a step changes along it: the influence starts at zero)
        with self.learner_threads.step(("rtrl", len(targets), start), inputs.shape[0] * inputs.shape[1]):
            for x in inputs:
                y = learner.step(x)
            with torch.set_grad_enabled(last):
                loss = nn.functional.cross_entropy(self.model.readout(y), targets)
            if last:
                loss.backward()  # the readout's gradient, and ∂L/∂y_T into y.grad
                learner.accumulate(y.grad)  # the cell's
        self.step_macs, self.step_tokens = learner.macs, inputs.shape[0] * inputs.shape[1]
        self.influence_macs += self.step_macs
        self.influence_tokens += self.step_tokens
        learner.macs = 0
        return loss, stats

    def train_metrics(self, loss: float) -> dict:
        if self.cfg.learning != "rtrl":
            return {}
        return {"influence_macs_per_token": self.step_macs / self.step_tokens}

    def evaluate(self, model, split: str, progress: bool = False, stop=lambda: False) -> Optional[dict]:
        result = evaluate(model, *self.data[split], self.cfg.eval_batch_size, stop)
        if result is not None and self.cfg.learning == "rtrl":
            result["influence_macs_per_token"] = self.influence_macs / max(self.influence_tokens, 1)
        return result

    def checkpoint_state(self) -> dict:
        carried = self.carried
        if isinstance(carried, RTRL):
            carried = {name: t.cpu() for name, t in carried.state_dict().items()}
        elif carried is not None:  # a collective under DDP: every process takes part
            carried = map_state(torch.Tensor.cpu, map_state(self.world.gather, carried))
        return {**super().checkpoint_state(), "carried": carried,
                "influence_macs": (self.influence_macs, self.influence_tokens)}

    @torch.no_grad()
    def example_records(self, model: OnlineModel) -> list:
        model.eval()
        return [model(scaled(self.data["test"][0][:1], model.dtype).transpose(0, 1), record=True)[2]]


def train_and_evaluate(cfg: OnlineConfig, run_dir, *, data_dir=None, download: bool = False,
                       sequences: Optional[classify.Sequences] = None, resume: bool = False,
                       progress: bool = True, tensorboard: bool = True, plots: bool = True) -> dict:
    """Train online (see :func:`harness.train`); return the final evaluations. ``sequences``: the
    task's data when already loaded."""

    def make_task(device, world):
        return OnlineTask(cfg, sequences or TASKS[cfg.task](cfg, data_dir, download), device, world)

    return harness.train(make_task, cfg, run_dir, resume=resume, progress=progress, tensorboard=tensorboard,
                         plots=plots, desc=f"train {cfg.learning}")
