"""Weight sparsity × activity sparsity on the language model: the study of docs/results.md.

EGRU and GRU (``cpu-small`` presets) pruned gradually to 0, 50, 80, 90 and 95 % of their
recurrent weights on Penn Treebank, the two end points on WikiText-2, and an EGRU made wider so
that it trains in the GRU's wall time. Every run is an ordinary ``egru train lm`` command (printed
with ``commands``); ``run`` trains the missing ones, ``--jobs`` at a time with one thread each,
resuming interrupted ones; ``report`` prints the table and draws perplexity against effective
MACs per token.

    export EGRU_DATA_DIR=../shared/data
    python benchmarks/prune_study.py run --jobs 2
    python benchmarks/prune_study.py report --plot docs/prune-study.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from egru.sparsity import dense_macs

sys.path.insert(0, str(Path(__file__).resolve().parent))
import studies  # noqa: E402  (benchmarks/studies.py: how a study's runs are trained)

RECIPE = "lm"

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)
# The budget per corpus: two epochs of PTB; the first 600 steps (0.32 of an epoch) of WikiText-2,
# whose steps cost three times PTB's (its 33,278-word decoder).
LENGTH = {"ptb": ["--epochs", "2"], "wikitext2": ["--epochs", "1", "--max-steps", "600"]}
# --full: the presets' own ten epochs on both corpora (about 40 minutes per PTB run alone, many
# hours per WikiText-2 run on two cores), the PTB schedule on both
FULL_LENGTH = {"ptb": [], "wikitext2": []}
# Pruning (fractions of the epochs' steps): on PTB it starts after a tenth of training and
# reaches its target at 60 %, so that the last 40 % (the cosine decay included) trains the
# final connectivity; on WikiText-2 the same within the 600 steps run (at 2 % and 20 % of the
# epoch: steps 37 to 373).
SCHEDULE = {"ptb": ["--prune-start", "0.1", "--prune-end", "0.6", "--prune-every", "50"],
            "wikitext2": ["--prune-start", "0.02", "--prune-end", "0.2", "--prune-every", "25"]}
WIDE_HIDDEN = 600  # the EGRU whose training takes the GRU's wall time (first layer's units)


def runs(full: bool = False) -> dict:
    """Run name → the arguments of its ``egru train lm`` command (``full``: the presets' length)."""
    grid = {}

    def add(name, dataset, model, sparsity, *extra):
        length = FULL_LENGTH if full else LENGTH
        args = ["--preset", "cpu-small", "--model", model, "--dataset", dataset, *length[dataset], *extra]
        if sparsity:
            args += ["--prune-to", str(sparsity), *SCHEDULE["ptb" if full else dataset]]
        grid[name] = args

    for sparsity in SPARSITIES:
        for model in ("egru", "gru"):
            add(f"ptb-{model}-p{round(sparsity * 100):02d}", "ptb", model, sparsity)
    add(f"ptb-egru{WIDE_HIDDEN}-p00", "ptb", "egru", 0.0, "--hidden-size", str(WIDE_HIDDEN))
    for sparsity in (SPARSITIES[0], SPARSITIES[-1]):
        for model in ("egru", "gru"):
            add(f"wt2-{model}-p{round(sparsity * 100):02d}", "wikitext2", model, sparsity)
    return grid


def command(name: str, args: list, root: Path) -> list:
    return studies.command(RECIPE, name, args, root)


def measure(run_dir: Path) -> dict:
    """What the table and the plot show of one finished run."""
    result = json.loads((run_dir / "results.json").read_text())
    cfg, layers = result["config"], list(result["test"]["layers"].values())
    sizes = [cfg["hidden_size"]] * (cfg["num_layers"] - 1) + [cfg["embedding_size"]]
    inputs = [cfg["embedding_size"]] + sizes[:-1]
    # the reference of every row: the unpruned cpu-small GRU's dense count
    base = [400] * (cfg["num_layers"] - 1) + [cfg["embedding_size"]]
    gru_dense = sum(dense_macs(i, h) for i, h in zip([cfg["embedding_size"]] + base[:-1], base))
    density = [(l["weight_density_ih"] * i + l["weight_density_hh"] * h) / (i + h)
               for l, i, h in zip(layers, inputs, sizes)]
    return {
        "model": cfg["model"], "hidden": cfg["hidden_size"], "prune_to": cfg["prune_to"],
        "valid": result["valid"]["perplexity"], "test": result["test"]["perplexity"],
        "activity": [l["activity"] for l in layers],
        "weight_density": density,
        "macs": sum(l["effective_macs_per_token"] for l in layers) / gru_dense,
        "tokens_per_second": result["train_tokens_per_second"],
        "train_seconds": result.get("train_seconds"),
    }


def report(root: Path, plot, full: bool = False) -> None:
    rows = {name: measure(root / name) for name in runs(full) if (root / name / "results.json").exists()}
    print("| run | pruned | test ppl | valid ppl | activity sparsity per layer | weight density per layer "
          "| effective MACs/token vs dense GRU | train tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(f"| {name} | {m['prune_to']:.0%} | {m['test']:.1f} | {m['valid']:.1f} | "
              f"{' / '.join(f'{1 - a:.1%}' for a in m['activity'])} | "
              f"{' / '.join(f'{d:.1%}' for d in m['weight_density'])} | {m['macs']:.3f} "
              f"(1/{1 / m['macs']:.{0 if m['macs'] < 0.1 else 1}f}) | {m['tokens_per_second']:,.0f} |")
    if plot:
        draw(rows, plot)


def draw(rows: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dataset in ("ptb",):
        for model, style in (("egru", "o-"), ("gru", "s--")):
            points = sorted((m["macs"], m["test"]) for name, m in rows.items()
                            if name.startswith(f"{dataset}-{model}-p"))
            if points:
                ax.plot(*zip(*points), style, label=f"{model.upper()} ({dataset.upper()}, pruned 0–95 %)")
        for name, m in rows.items():
            if name.startswith(f"{dataset}-egru") and m["hidden"] != 400:
                ax.plot(m["macs"], m["test"], "^", label=f"EGRU, {m['hidden']} units (GRU's wall time)")
    gru = rows.get("ptb-gru-p00")
    if gru:  # the paper's point: ≥ 20× fewer MACs than the dense GRU within 15 % of its perplexity
        ax.axvline(1 / 20, color="grey", lw=0.8, ls=":")
        ax.axhline(gru["test"] * 1.15, color="grey", lw=0.8, ls=":")
        ax.annotate("20× fewer MACs, +15 % ppl", (1 / 20, gru["test"] * 1.15), fontsize=8,
                    xytext=(4, 4), textcoords="offset points", color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("effective MACs per token, relative to the dense GRU")
    ax.set_ylabel("test perplexity")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    studies.save(fig, path)


def main(argv=None) -> None:
    parser = studies.arguments(__doc__, "folder of the runs (default: runs/prune-study, "
                                        "runs/prune-study-full with --full)")
    parser.add_argument("--full", action="store_true", help="the presets' ten epochs (default: the short study)")
    args = parser.parse_args(argv)
    args.root = args.root or Path("runs/prune-study-full" if args.full else "runs/prune-study")
    studies.act(args, RECIPE, runs(args.full), lambda: report(args.root, args.plot, args.full))


if __name__ == "__main__":
    sys.exit(main())
