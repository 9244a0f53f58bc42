"""The ``egru`` command: parse arguments, call a recipe, print what it returns."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import egru


def _demo(args) -> int:
    from egru.recipes import mnist1d

    overrides = {k: v for k, v in vars(args).items()
                 if k in {f.name for f in dataclasses.fields(mnist1d.DemoConfig)} and v is not None}
    cfg = mnist1d.DemoConfig(**overrides)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"Training an EGRU and a torch.nn.GRU ({cfg.hidden_size} units each) on MNIST-1D "
          f"for {cfg.epochs} epochs, seed {cfg.seed}.", flush=True)
    results = mnist1d.train_and_evaluate(cfg, progress=not args.no_progress)
    print()
    print(mnist1d.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egru", description="Event-based GRUs: activity-sparse RNNs.")
    parser.add_argument("--version", action="version", version=f"egru {egru.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train an EGRU and a GRU side by side on MNIST-1D (~2 minutes)",
                          description="Train a small EGRU and a torch.nn.GRU of the same size on "
                                      "MNIST-1D (generated locally) and compare accuracy, sparsity "
                                      "and multiply-accumulates.")
    demo.add_argument("--seed", type=int, help="random seed (default 0)")
    demo.add_argument("--epochs", type=int, help="training epochs for each model")
    demo.add_argument("--hidden-size", type=int, help="units in each recurrent layer")
    demo.add_argument("--train-size", type=int, help="training sequences to use (at most 4000)")
    demo.add_argument("--test-size", type=int, help="test sequences to use (at most 1000)")
    demo.add_argument("--backend", help=f"EGRU backend, one of {egru.available_backends()}")
    demo.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, ImportError) as err:
        print(f"egru {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"egru {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
