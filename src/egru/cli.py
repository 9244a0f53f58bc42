"""The ``egru`` command: parse arguments, call a recipe, print what it returns."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import egru


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, ``egru <command>: error: ...`` (exit status 2),
    like every other error of the command; ``--help`` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_in(low: int, high: int | None = None):
    """An argparse type: an integer from ``low`` to ``high`` (None: no upper bound)."""
    expected = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def _backend(name: str) -> str:
    if name not in egru.available_backends():
        raise argparse.ArgumentTypeError(
            f"unknown backend {name!r}; expected one of {egru.available_backends()}")
    return name


def _demo(args) -> int:
    from egru.recipes import mnist1d

    cfg = mnist1d.DemoConfig(**_overrides(args, mnist1d.DemoConfig))
    if args.json and not Path(args.json).parent.is_dir():  # found out now, not after training
        raise ValueError(f"cannot write {args.json}: its folder does not exist")
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


def _config_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One ``--option`` per field of a config dataclass; unset options keep the preset's value."""
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = f.metadata.get("type") or (type(f.default) if f.default is not None else int)
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper())


def _overrides(args, config_cls) -> dict:
    names = {f.name for f in dataclasses.fields(config_cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def lm_config(args):
    """The preset's configuration for the chosen model, with the options given on top."""
    from egru.recipes import lm

    return dataclasses.replace(lm.preset(args.preset, args.model), **_overrides(args, lm.LMConfig))


def _train_lm(args) -> int:
    from egru.recipes import lm

    cfg = lm_config(args)
    result = lm.train_and_evaluate(cfg, args.run_dir, data_dir=args.data_dir, download=args.download,
                                   resume=args.resume, progress=not args.no_progress)
    if result:
        print(_lm_summary(cfg.model, result))
        with open(f"{args.run_dir}/results.json", "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _lm_summary(model: str, result: dict) -> str:
    lines = [f"{model}: valid perplexity {result['valid']['perplexity']:.2f}, "
             f"test perplexity {result['test']['perplexity']:.2f}"]
    for name, layer in result["test"]["layers"].items():
        lines.append(f"  {name}: activity sparsity {1 - layer['activity']:.1%}, "
                     f"backward sparsity {1 - layer['backward_activity']:.1%}, "
                     f"MACs/token {layer['effective_macs_per_token']:,.0f} of {layer['dense_macs_per_token']:,.0f}")
    if "train_tokens_per_second" in result:
        lines.append(f"  training: {result['train_tokens_per_second']:,.0f} tokens/s")
    return "\n".join(lines)


def _eval_lm(args) -> int:
    from egru.recipes import lm

    result = lm.evaluate_checkpoint(args.checkpoint, args.split, data_dir=args.data_dir,
                                    download=args.download, progress=not args.no_progress)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="egru", description="Event-based GRUs: activity-sparse RNNs.")
    parser.add_argument("--version", action="version", version=f"egru {egru.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train an EGRU and a GRU side by side on MNIST-1D (~2 minutes)",
                          description="Train a small EGRU and a torch.nn.GRU of the same size on "
                                      "MNIST-1D (generated locally) and compare accuracy, sparsity "
                                      "and multiply-accumulates.")
    demo.add_argument("--seed", type=_int_in(0, 2**32 - 1), help="random seed (default 0)")
    demo.add_argument("--epochs", type=_int_in(1), help="training epochs for each model")
    demo.add_argument("--hidden-size", type=_int_in(1), help="units in each recurrent layer")
    demo.add_argument("--train-size", type=_int_in(1, 4000),
                      help="training sequences to use (at most 4000)")
    demo.add_argument("--test-size", type=_int_in(1, 1000), help="test sequences to use (at most 1000)")
    demo.add_argument("--backend", type=_backend, help=f"EGRU backend, one of {egru.available_backends()}")
    demo.add_argument("--threads", type=_int_in(0), default=0,
                      help="torch threads (default: torch's choice)")
    demo.add_argument("--json", help="also write the results to this JSON file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    from egru.recipes.lm import LMConfig, PRESETS

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    train_lm = train.add_parser("lm", help="word-level language model (PTB, WikiText-2)",
                                description="Train an EGRU, GRU or LSTM language model. Options not "
                                            "given keep the preset's value.")
    train_lm.add_argument("--preset", default="cpu-small", help=f"one of {sorted(PRESETS)}")
    train_lm.add_argument("--run-dir", required=True, help="checkpoints, logs, metrics and plots go here")
    train_lm.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    _data_arguments(train_lm)
    _config_arguments(train_lm, LMConfig)
    train_lm.set_defaults(run=_train_lm)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="task", required=True)
    eval_lm = evaluate.add_parser("lm", help="perplexity of a language-model checkpoint")
    eval_lm.add_argument("checkpoint")
    eval_lm.add_argument("--split", default="test", choices=["train", "valid", "test"])
    eval_lm.add_argument("--json", action="store_true", help="print everything as JSON")
    _data_arguments(eval_lm)
    eval_lm.set_defaults(run=_eval_lm)
    return parser


def _data_arguments(parser) -> None:
    parser.add_argument("--data-dir", help="folder with the data files (default: $EGRU_DATA_DIR)")
    parser.add_argument("--download", action="store_true", help="download missing data into the cache")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exited:  # --help, --version, or a usage error (already printed)
        return exited.code
    name = " ".join(filter(None, ["egru", args.command, getattr(args, "task", None)]))
    try:
        return args.run(args)
    except (ValueError, ImportError, OSError) as err:  # OSError: say, a file that cannot be written
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
