"""Steady-state time of one training step of the language model, per recurrent core.

The model of a preset (``cpu-small`` by default) on random tokens of a 10,000-word vocabulary:
forward, cross-entropy, backward and an AdamW step, with the state carried (detached) from step
to step as in training; the median of ``--steps`` steps after ``--warmup`` steps. Unlike the
tokens/s a training run reports, this leaves out data loading, logging and the first steps.

    python benchmarks/lm_step.py --models egru gru lstm --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from egru.recipes import lm


def step_times(model_name: str, preset: str, vocab: int, steps: int, warmup: int, seed: int) -> list:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(lm.PRESETS[preset], model=model_name)
    model = lm.LanguageModel(cfg, vocab).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    tokens = torch.randint(0, vocab, (cfg.bptt + 1, cfg.batch_size))
    state = [None] * cfg.num_layers
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        logits, state, _ = model(tokens[:-1], state)
        state = lm.map_state(torch.Tensor.detach, state)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["egru", "gru", "lstm"])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--vocab", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the models in turn")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = lm.PRESETS[args.preset]
    for round_ in range(args.rounds):
        for name in args.models:
            median = statistics.median(step_times(name, args.preset, args.vocab, args.steps, args.warmup, 0))
            print(f"round {round_ + 1}  {name:<5} {median * 1e3:7.1f} ms/step  "
                  f"{cfg.bptt * cfg.batch_size / median:8,.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
