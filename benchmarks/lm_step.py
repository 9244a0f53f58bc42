"""Steady-state time of one training step of the language model, per recurrent core.

Forward, cross-entropy, backward and an AdamW step, with the state carried (detached) from step
to step as in training; the median of ``--steps`` steps after ``--warmup`` steps, fixed BPTT
length. Unlike the tokens/s a training run reports, this leaves out data loading, logging and
the first steps.

Two sources of models:

* ``--models egru gru lstm``: fresh models of a preset (``cpu-small`` by default) on random
  tokens. An untrained EGRU fires at its initial activity.
* ``--runs DIR ...``: the best checkpoints of finished runs, stepping through their training
  text (``EGRU_DATA_DIR`` or ``--data-dir``), so that an EGRU runs at the activity it reached;
  the activity per layer during the timed steps is printed with the time.

    python benchmarks/lm_step.py --models egru gru lstm --rounds 2
    python benchmarks/lm_step.py --runs runs/ptb-egru runs/ptb-gru runs/ptb-lstm --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from egru import data
from egru.recipes import harness, lm
from egru.recipes.cores import map_state


def fresh(model_name: str, preset: str, vocab: int, seed: int):
    """A preset's untrained model and random tokens, (rows, batch)."""
    torch.manual_seed(seed)
    cfg = lm.preset(preset, model_name)
    return lm.LanguageModel(cfg, vocab), torch.randint(0, vocab, (4096, cfg.batch_size))


def trained(run_dir: str, data_dir):
    """A finished run's best model and its training text, batchified, (rows, batch)."""
    ckpt = harness.load_checkpoint(f"{run_dir}/best.pt", lm.LanguageModelTask)
    model = lm.model_from_checkpoint(ckpt)
    corpus = data.load_corpus(model.cfg.dataset, data_dir)
    return model, lm.batchify(corpus.train, model.cfg.batch_size)


def step_times(model: lm.LanguageModel, tokens: torch.Tensor, steps: int, warmup: int):
    """Per-step seconds of ``steps`` timed steps, and the mean activity per layer over five more
    steps that record it (recording is left out of the timed ones; a dense layer's is 1)."""
    cfg = model.cfg
    model.train()
    optimizer = harness.make_optimizer(model, cfg)  # the one training uses
    state = model.initial_state(cfg.batch_size)
    times, activity = [], {}
    for i in range(warmup + steps + 5):
        row = (i * cfg.bptt) % (tokens.shape[0] - cfg.bptt - 1)
        chunk = tokens[row:row + cfg.bptt + 1]
        record = i >= warmup + steps
        start = time.perf_counter()
        logits, state, records = model(chunk[:-1], state, record=record)
        state = map_state(torch.Tensor.detach, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if warmup <= i < warmup + steps:
            times.append(time.perf_counter() - start)
        for k, stats in enumerate(model.layer_stats(records)):
            activity.setdefault(k, []).append(stats.activity)
    return times, {k: statistics.mean(v) for k, v in activity.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["egru", "gru", "lstm"])
    parser.add_argument("--runs", nargs="+", help="run directories (their best.pt) instead of fresh models")
    parser.add_argument("--data-dir", help="the runs' data (default: $EGRU_DATA_DIR)")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the models in turn")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sources = args.runs or args.models
    for round_ in range(args.rounds):
        for source in sources:
            if args.runs:
                model, tokens = trained(source, args.data_dir)
            else:
                model, tokens = fresh(source, args.preset, args.vocab, 0)
            times, activity = step_times(model, tokens, args.steps, args.warmup)
            median = statistics.median(times)
            cfg = model.cfg
            active = " / ".join(f"{a:.1%}" for a in activity.values())
            print(f"round {round_ + 1}  {source:<24} {cfg.model:<5} {median * 1e3:7.1f} ms/step  "
                  f"{cfg.bptt * cfg.batch_size / median:8,.0f} tokens/s  activity {active}", flush=True)


if __name__ == "__main__":
    main()
