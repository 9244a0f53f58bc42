"""The ``egru`` command: parse arguments, call a recipe, print what it returns."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import egru

PREFIX = "config_"  # where a config field's option lands in the parsed arguments


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


def _choice(name: str, choices):
    """An argparse type: one of ``choices``, else ``unknown <name> 'x'; expected one of ...``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown {name} {text!r}; expected one of {list(choices)}")
        return text

    return parse


def _declared(config_cls, name: str):
    """The field ``name`` where it is first declared (a subclass may redeclare it with another
    default, but the meaning stays with the first declaration), and that class."""
    for klass in reversed(config_cls.__mro__):
        if name in klass.__dict__.get("__annotations__", {}):
            return klass.__dataclass_fields__[name], klass


def _config_arguments(parser: argparse.ArgumentParser, config_cls, title: str, shown, shown_as: str) -> None:
    """One ``--option`` per field of a config dataclass, grouped by the class that declares it
    (the recipe's own under ``title``), with its meaning, its choices and the value it takes when
    not given (``shown``'s, described by ``shown_as``). Fields in ``config_cls.FIXED`` get none."""
    groups = {config_cls.__name__: parser.add_argument_group(title),
              "CoreConfig": parser.add_argument_group("recurrent core"),
              "TrainConfig": parser.add_argument_group("training")}
    for f in dataclasses.fields(config_cls):
        if f.name in config_cls.FIXED:  # the recipe allows only one value: no option to offer
            continue
        declared, klass = _declared(config_cls, f.name)
        group = groups[klass.__name__]
        flag, choices = "--" + f.name.replace("_", "-"), declared.metadata.get("choices")
        default = getattr(shown, f.name)
        if default is None:  # a field's metadata may say what None stands for
            default = declared.metadata.get("none", "none")
        text = f"{declared.metadata['help']} ({shown_as}: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text,
                               dest=PREFIX + f.name)
        elif choices:
            group.add_argument(flag, type=_choice(f.name, choices), choices=choices, default=None,
                               help=text, dest=PREFIX + f.name)
        else:
            kind = declared.metadata.get("type") or (type(f.default) if f.default is not None else int)
            group.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=text,
                               dest=PREFIX + f.name)


def _overrides(args) -> dict:
    """The config fields given on the command line."""
    return {k[len(PREFIX):]: v for k, v in vars(args).items() if k.startswith(PREFIX) and v is not None}


def lm_config(args):
    """The preset (for the chosen model) with the options given on top."""
    from egru.recipes import lm

    return dataclasses.replace(lm.preset(args.preset, getattr(args, PREFIX + "model")), **_overrides(args))


def classify_config(args):
    """The preset (or the defaults) with the options given on top."""
    from egru.recipes import classify

    return dataclasses.replace(classify.preset(args.preset), **_overrides(args))


def online_config(args):
    from egru.recipes import online

    return online.OnlineConfig(**_overrides(args))


def demo_config(args):
    from egru.recipes import classify

    return classify.ClassifyConfig(**_overrides(args))


def _summary(name: str, result: dict, metric: str, fmt: str) -> str:
    """The final evaluations and, per layer, sparsity and MACs (and RTRL's, when it learned)."""
    splits = [s for s in ("valid", "test") if s in result]
    lines = [f"{name}: " + ", ".join(f"{s} {metric} {result[s][metric]:{fmt}}" for s in splits)]
    for name, layer in result[splits[-1]]["layers"].items():
        lines.append(f"  {name}: activity sparsity {1 - layer['activity']:.1%}, "
                     f"backward sparsity {1 - layer['backward_activity']:.1%}, "
                     f"MACs/token {layer['effective_macs_per_token']:,.0f} "
                     f"of {layer['dense_macs_per_token']:,.0f}")
    if "influence_macs_per_token" in result[splits[-1]]:
        lines.append(f"  RTRL influence update: {result[splits[-1]]['influence_macs_per_token']:,.0f} "
                     "MACs/token in training")
    if "neurobench" in result:  # the same model measured by NeuroBench (egru.neurobench: definitions)
        nb = result["neurobench"]
        ops = nb["SynapticOperations"]
        lines.append(f"  NeuroBench, first {nb['sequences']} test sequences: activation sparsity "
                     f"{nb['ActivationSparsity']:.1%}, connection sparsity {nb['ConnectionSparsity']:.1%}, "
                     f"synaptic operations per sequence {ops['Effective_MACs']:,.0f} MACs + "
                     f"{ops['Effective_ACs']:,.0f} ACs of {ops['Dense']:,.0f} dense")
    if "train_tokens_per_second" in result:
        sequences = (f", {result['train_sequences_per_second']:,.1f} sequences/s"
                     if "train_sequences_per_second" in result else "")
        lines.append(f"  training: {result['train_tokens_per_second']:,.0f} tokens/s{sequences}")
    return "\n".join(lines)


def _finish(args, name: str, result: dict, metric: str, fmt: str) -> int:
    from egru.recipes.common import write_json_atomic

    if result:  # only the main process of a distributed run has one
        print(_summary(name, result, metric, fmt))
        write_json_atomic(result, Path(args.run_dir) / "results.json")
    return 0


def _train_lm(args) -> int:
    from egru.recipes import lm

    cfg = lm_config(args)
    result = lm.train_and_evaluate(cfg, args.run_dir, data_dir=args.data_dir, download=args.download,
                                   resume=args.resume, progress=not args.no_progress)
    return _finish(args, cfg.model, result, "perplexity", ".2f")


def _train_classify(args) -> int:
    from egru.recipes import classify

    cfg = classify_config(args)
    result = classify.train_and_evaluate(cfg, args.run_dir, data_dir=args.data_dir, download=args.download,
                                         resume=args.resume, progress=not args.no_progress)
    return _finish(args, cfg.model, result, "accuracy", ".1%")


def _train_online(args) -> int:
    from egru.recipes import online

    cfg = online_config(args)
    result = online.train_and_evaluate(cfg, args.run_dir, data_dir=args.data_dir, download=args.download,
                                       resume=args.resume, progress=not args.no_progress)
    return _finish(args, f"{cfg.model} ({cfg.learning})", result, "accuracy", ".1%")


def _eval_lm(args) -> int:
    from egru.recipes import lm

    result = lm.evaluate_checkpoint(args.checkpoint, args.split, data_dir=args.data_dir,
                                    download=args.download, progress=not args.no_progress)
    print(json.dumps(result, indent=2) if args.json else
          f"{args.split}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
    return 0


def _export_c(args) -> int:
    from egru.recipes import classify

    result = classify.export_checkpoint(args.checkpoint, args.out, args.name, args.vectors,
                                        data_dir=args.data_dir, download=args.download)
    engine = result["engine"]
    layers = engine.layer_sizes if isinstance(engine, egru.mcu.EGRUQ15) else engine.recurrent.hidden_sizes
    print(f"wrote {result['header']}, {result['source']} (recurrent layers {layers}, "
          f"{result['stored_bytes']:,} bytes of weights and biases)\n"
          f"test vectors: {result['vectors']}; check them with\n"
          f"  cc -std=c99 -O2 -o check {result['source']} {result['check']} && ./check")
    return 0


def _demo(args) -> int:
    from egru.recipes import classify

    cfg = demo_config(args)
    if args.json and not Path(args.json).parent.is_dir():  # found out now, not after training
        raise ValueError(f"cannot write {args.json}: its folder does not exist")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"Training an EGRU and a torch.nn.GRU ({cfg.hidden_size} units each) on MNIST-1D "
          f"for {cfg.epochs} epochs, seed {cfg.seed}.", flush=True)
    results = classify.demo(cfg, args.run_dir, progress=not args.no_progress)
    print()
    print(classify.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nresults written to {args.json}")
    return 0


def _demo_arguments(demo, defaults) -> None:
    """The demo's few options: the classification recipe's, with its defaults."""
    def option(flag, kind, help, **kw):
        name = flag[2:].replace("-", "_")
        kw.setdefault("metavar", None if "choices" in kw else name.upper())
        demo.add_argument(flag, type=kind, dest=PREFIX + name, help=help, **kw)

    option("--seed", _int_in(0, 2**32 - 1), "random seed (default: %(default)s)", default=defaults.seed)
    option("--epochs", _int_in(1), "training epochs for each model (default: %(default)s)",
           default=defaults.epochs)
    option("--hidden-size", _int_in(1), "units in each recurrent layer (default: %(default)s)",
           default=defaults.hidden_size)
    option("--train-size", _int_in(1, 4000), "training sequences to use, at most 4000 (default: all)")
    option("--test-size", _int_in(1, 1000), "test sequences to use, at most 1000 (default: all)")
    option("--backend", _choice("backend", egru.available_backends()), "how the EGRU is computed "
           "(default: %(default)s)", default=defaults.backend, choices=egru.available_backends())
    demo.add_argument("--threads", type=_int_in(0), default=0, help="torch threads (default: torch's choice)")
    demo.add_argument("--json", help="also write the results to this JSON file (default: only print them)")
    demo.add_argument("--run-dir", help="keep both runs (checkpoints, metrics, plots) in RUN_DIR/egru and "
                                        "RUN_DIR/gru (default: a temporary folder, removed)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from egru.recipes import classify, lm, online

    parser = _Parser(prog="egru", description="Event-based GRUs: activity-sparse RNNs.")
    parser.add_argument("--version", action="version", version=f"egru {egru.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train an EGRU and a GRU side by side on MNIST-1D (~1 minute)",
                          description="Train a small EGRU and a torch.nn.GRU of the same size on "
                                      "MNIST-1D (generated locally) with `egru train classify --task "
                                      "mnist1d`'s defaults, and compare accuracy, sparsity and "
                                      "multiply-accumulates.")
    _demo_arguments(demo, classify.ClassifyConfig())
    demo.set_defaults(run=_demo, config=demo_config)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    shown = "cpu-small-egru"
    train_lm = train.add_parser(
        "lm", help="word-level language model (PTB, WikiText-2)",
        description="Train an EGRU, GRU or LSTM language model. Each option not given keeps the "
                    f"preset's value; shown in brackets: {shown}'s (the default preset and model).")
    train_lm.add_argument(
        "--preset", default="cpu-small", type=_choice("preset", sorted(lm.PRESETS) + lm.FAMILIES),
        choices=sorted(lm.PRESETS) + lm.FAMILIES,
        help="the configuration to start from (default: %(default)s). A name without a model, "
             "cpu-small, takes it from --model: cpu-small with --model gru is the preset "
             "cpu-small-gru (its own learning rate and dropouts, not cpu-small-egru's with another "
             "model); with other presets --model only changes the model")
    _run_arguments(train_lm)
    _data_arguments(train_lm)
    _config_arguments(train_lm, lm.LMConfig, "language model", lm.PRESETS[shown], shown)
    train_lm.set_defaults(run=_train_lm, config=lm_config)

    train_classify = train.add_parser(
        "classify", help="sequence classification (MNIST-1D, sequential MNIST, spoken digits)",
        description="Train an EGRU, GRU, LSTM or embedded-eGRU sequence classifier. Each option not "
                    "given keeps the preset's value (without --preset, the defaults shown in brackets).")
    train_classify.add_argument(
        "--preset", default=None, type=_choice("preset", sorted(classify.PRESETS)), choices=sorted(classify.PRESETS),
        help="the configuration to start from (default: none, the defaults below)")
    _run_arguments(train_classify)
    _data_arguments(train_classify)
    _config_arguments(train_classify, classify.ClassifyConfig, "classification", classify.ClassifyConfig(),
                      "default")
    train_classify.set_defaults(run=_train_classify, config=classify_config)

    train_online = train.add_parser(
        "online", help="online learning of one EGRU cell by RTRL or BPTT (row-wise MNIST, a delay task)",
        description="Train one EGRU cell and a linear readout by real-time recurrent learning (RTRL) "
                    "or by backpropagation through time (BPTT), on the same examples in the same order. "
                    "Shown in brackets: the defaults.")
    _run_arguments(train_online)
    _data_arguments(train_online)
    _config_arguments(train_online, online.OnlineConfig, "online learning", online.OnlineConfig(), "default")
    train_online.set_defaults(run=_train_online, config=online_config)

    export = sub.add_parser(
        "export-c", help="write a trained embedded-eGRU or EGRU classifier as a C99 library",
        description="Convert a checkpoint of `egru train classify --model embedded` (3-bit recurrent "
                    "weights as shifts, int16 dense weights, Q15 states) or `--model egru` (int16 weights "
                    "with power-of-two scales, Q15 states and thresholds, products only over the units "
                    "that fired, the readout on the output trace) to fixed point and write it as C99: "
                    "NAME.h, NAME.c (no floating point, no allocation, only <stdint.h>), test vectors "
                    "(NAME_vectors.h: test sequences of the task and saturating ones, with what the "
                    "Python engine computes) and NAME_check.c, a program that checks them.")
    export.add_argument("checkpoint", help="a best.pt or last.pt of `egru train classify --model embedded` "
                                           "or `--model egru`")
    export.add_argument("--out", required=True, help="folder for the C files")
    export.add_argument("--name", default="egru_mcu", help="prefix of the files and functions (default: %(default)s)")
    export.add_argument("--vectors", type=_int_in(0), default=20,
                        help="test sequences of the task in the test vectors (default: %(default)s)")
    export.add_argument("--data-dir", help="folder with the data files (default: $EGRU_DATA_DIR)")
    export.add_argument("--download", action="store_true", help="download missing data into the cache")
    export.set_defaults(run=_export_c)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint").add_subparsers(dest="task", required=True)
    eval_lm = evaluate.add_parser("lm", help="perplexity of a language-model checkpoint")
    eval_lm.add_argument("checkpoint", help="a last.pt or best.pt of `egru train lm`")
    eval_lm.add_argument("--split", default="test", choices=["train", "valid", "test"],
                         help="the split to evaluate (default: %(default)s)")
    eval_lm.add_argument("--json", action="store_true", help="print everything as JSON")
    _data_arguments(eval_lm)
    eval_lm.set_defaults(run=_eval_lm)
    return parser


def _run_arguments(parser) -> None:
    parser.add_argument("--run-dir", required=True,
                        help="checkpoints (last.pt, best.pt), metrics.jsonl, tensorboard/, plots and "
                             "results.json go here")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last.pt (options other than "
                             "--max-steps must stay as they were)")


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
    except (ValueError, ImportError, OSError, MemoryError) as err:  # OSError: say, a file that cannot be written
        return _error(name, err)
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise  # a fault of egru's, not of what was asked: the traceback is for its report
        return _error(name, f"not enough memory for the sizes asked for ({err})")
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocation that failed (the device's own error, or the CPU allocator's)."""
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def _error(name: str, err) -> int:
    """``name: error: ...`` on one line (a message of several lines joined), exit status 2."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    print(f"{name}: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
