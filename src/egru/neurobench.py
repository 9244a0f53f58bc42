"""EGRU models measured by stock NeuroBench (PyPI ``neurobench``; ``pip install 'egru[neurobench]'``).

NeuroBench counts synaptic operations with forward pre-hooks on ``nn.Linear``, ``nn.Conv*`` and
recurrent *cells*, and activation sparsity with forward hooks on activation modules. It cannot
see inside a layer that runs a whole sequence (``egru.EGRU``; ``torch.nn.GRU`` and ``LSTM``
raise inside its counter). :func:`stepwise` makes a copy that computes one step at a time
with modules it can hook, the same numbers as the original:

* an :class:`egru.EGRU` becomes a :class:`StepwiseEGRU`: per layer an ``nn.Linear`` for the
  input product ``W_i x_t + b_i``, one for the recurrent product ``W_h y_{t-1} + b_h`` (its
  input is the previous step's events), the cell of :mod:`egru.functional`, and an
  :class:`EventOutput` whose output is ``y_t``;
* a ``torch.nn.GRU`` or ``LSTM`` becomes a :class:`StepwiseRNN` of ``nn.GRUCell``/``LSTMCell``.

:func:`measure` runs NeuroBench's ``Benchmark`` on such a model. How its figures relate to
:func:`egru.model_stats`' (``tests/test_neurobench.py`` checks each statement):

* **Effective MACs** per sample: NeuroBench counts, for every hooked layer and call, the
  nonzero entries of its input times the nonzero weights they meet. For the recurrent product
  that is egru's count exactly. For the input product of an ``egru.EGRU``'s first layer egru
  counts every input (it computes that product densely); NeuroBench counts nonzero inputs
  only, fewer where the data has zeros (black MNIST pixels). NeuroBench also counts every other
  ``Linear``/``Conv`` of the model (readout, frame CNN), which egru's layer statistics leave out.
* **Dense** synaptic operations: ``3H(I + H)`` per step for an EGRU layer in both. For a GRU or
  LSTM cell NeuroBench adds the gates' elementwise products.
* **Activation sparsity**: the zeros among all hooked activation outputs; with only event
  outputs hooked, ``1 − activity``. ReLUs of a readout or a frame CNN add theirs.
* **Connection sparsity**: the zeros among the weights and biases of the layers it knows.
"""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import nn

from . import functional
from .modules import EGRU
from .state import EGRUState


class EventOutput(nn.Identity):
    """Marks a layer's output ``y_t`` (its events) so that activation hooks see it."""


class StepwiseEGRU(nn.Module):
    """An :class:`egru.EGRU` (unidirectional, no packed sequences) computed one step at a time
    with hookable modules. Inference only: a copy of the weights it computes with (pruned
    weights as their product with the mask), no zoneout or DropConnect."""

    def __init__(self, source: EGRU):
        super().__init__()
        if source.bidirectional:
            raise ValueError("StepwiseEGRU runs unidirectional EGRUs; this one is bidirectional")
        self.hidden_size, self.batch_first = source.hidden_size, source.batch_first
        self.surrogate = source.surrogate
        self.inputs, self.recurrents, self.events = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        thresholds = []
        for layer in range(source.num_layers):
            w_ih, w_hh, b_ih, b_hh, threshold = (None if p is None else p.detach().clone()
                                                 for p in source._layer_params(layer, ""))
            self.inputs.append(_linear(w_ih, b_ih))
            self.recurrents.append(_linear(w_hh, b_hh))
            self.events.append(EventOutput())
            thresholds.append(threshold)
        self.register_buffer("threshold", torch.stack(thresholds))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, state=None):
        """``x`` (T, B, I) (or (B, T, I) when the source was batch-first) → ``(output, state)``
        as :class:`egru.EGRU` returns them."""
        x = x.transpose(0, 1) if self.batch_first else x
        L, B, H = len(self.inputs), x.shape[1], self.hidden_size
        if state is None:
            state = EGRUState.zeros(L, B, H, dtype=x.dtype, device=x.device)
        finals = []
        for layer in range(L):
            s, outputs = state.layer(layer), []
            for x_t in x:
                step = functional.gated_step(self.inputs[layer](x_t), self.recurrents[layer](s.y), s.c,
                                             self.threshold[layer], self.surrogate)
                s = EGRUState(self.events[layer](step.state.y), step.state.c)
                outputs.append(s.y)
            x = torch.stack(outputs)
            finals.append(s)
        return (x.transpose(0, 1) if self.batch_first else x), EGRUState.stack(finals)


class StepwiseRNN(nn.Module):
    """A unidirectional ``torch.nn.GRU`` or ``LSTM`` as cells (``nn.GRUCell``/``LSTMCell``)
    sharing copies of its weights, one call per step."""

    CELLS = {nn.GRU: nn.GRUCell, nn.LSTM: nn.LSTMCell}

    def __init__(self, source: nn.RNNBase):
        super().__init__()
        if type(source) not in self.CELLS or source.bidirectional or getattr(source, "proj_size", 0):
            raise ValueError(f"StepwiseRNN runs unidirectional nn.GRU and nn.LSTM without projections, "
                             f"not {source}")
        self.lstm, self.batch_first = isinstance(source, nn.LSTM), source.batch_first
        self.cells = nn.ModuleList()
        for layer in range(source.num_layers):
            cell = self.CELLS[type(source)](source.input_size if layer == 0 else source.hidden_size,
                                            source.hidden_size, bias=source.bias)
            for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if source.bias else ()):
                getattr(cell, name).data.copy_(getattr(source, f"{name}_l{layer}"))
            self.cells.append(cell.to(source.weight_ih_l0))
        self.hidden_size = source.hidden_size

    @torch.no_grad()
    def forward(self, x: torch.Tensor, state=None):
        """As the source module: ``(output, h)`` for a GRU, ``(output, (h, c))`` for an LSTM."""
        x = x.transpose(0, 1) if self.batch_first else x
        L, B = len(self.cells), x.shape[1]
        if state is None:
            zero = x.new_zeros(L, B, self.hidden_size)
            state = (zero, zero.clone()) if self.lstm else zero
        finals = []
        for layer, cell in enumerate(self.cells):
            s = (state[0][layer], state[1][layer]) if self.lstm else state[layer]
            outputs = []
            for x_t in x:
                s = cell(x_t, s)
                outputs.append(s[0] if self.lstm else s)
            x = torch.stack(outputs)
            finals.append(s)
        final = (tuple(torch.stack(p) for p in zip(*finals)) if self.lstm else torch.stack(finals))
        return (x.transpose(0, 1) if self.batch_first else x), final


def stepwise(module: nn.Module) -> nn.Module:
    """The step-by-step copy of a recurrent layer (see the module docs)."""
    if isinstance(module, EGRU):
        return StepwiseEGRU(module)
    if isinstance(module, (nn.GRU, nn.LSTM)):
        return StepwiseRNN(module)
    raise TypeError(f"no step-by-step form of {type(module).__name__}; expected egru.EGRU, nn.GRU or nn.LSTM")


def _linear(weight: torch.Tensor, bias) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                       dtype=weight.dtype, device=weight.device)
    linear.weight.data.copy_(weight)
    if bias is not None:
        linear.bias.data.copy_(bias)
    return linear


def measure(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 100) -> dict:
    """NeuroBench's figures for ``network`` on ``(inputs, targets)``: ``network(batch)`` takes a
    batch of ``inputs`` (first dimension: samples) and returns logits (B, classes), as
    NeuroBench's ``TorchModel`` calls it. Returns NeuroBench's results dict
    (``ClassificationAccuracy``, ``ActivationSparsity``, ``SynapticOperations`` with
    ``Effective_MACs``, ``Effective_ACs`` and ``Dense`` per sample, ``ConnectionSparsity``,
    ``ParameterCount``)."""
    try:
        from neurobench.benchmarks import Benchmark
        from neurobench.metrics.static import ConnectionSparsity, ParameterCount
        from neurobench.metrics.workload import ActivationSparsity, ClassificationAccuracy, SynapticOperations
        from neurobench.models import TorchModel
    except ImportError as err:
        raise ImportError("measuring with NeuroBench needs it: pip install 'egru[neurobench]'") from err
    model = TorchModel(copy.deepcopy(network))  # NeuroBench leaves hooks on what it measures
    model.add_activation_module(EventOutput)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=batch_size)
    benchmark = Benchmark(model, loader, [], [lambda logits: logits.argmax(-1)],
                          [[ConnectionSparsity, ParameterCount],
                           [ClassificationAccuracy, ActivationSparsity, SynapticOperations]])
    # NeuroBench reports a metric that failed only by a line on stdout, and its value as 0.
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):
        results = benchmark.run()
    errors = [line for line in log.getvalue().splitlines() if line.startswith("Error")]
    if errors:
        raise RuntimeError("NeuroBench failed on this model: " + "; ".join(errors))
    return results
