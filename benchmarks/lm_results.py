"""Markdown table of finished language-model runs (their ``results.json``), for docs/results.md.

    python benchmarks/lm_results.py runs/ptb-egru runs/ptb-gru runs/ptb-lstm

Each row: validation and test perplexity of the best checkpoint, activity and backward sparsity
per layer (test; in brackets, of all the model's unit-steps), effective MACs per token of the
recurrent layers relative to a dense GRU of the same shapes, and training throughput.
"""

import json
import sys
from pathlib import Path

from egru.sparsity import dense_macs


def row(run_dir: Path) -> str:
    result = json.loads((run_dir / "results.json").read_text())
    if "config" not in result:  # results.json of early versions: the checkpoint has it
        import torch

        result["config"] = torch.load(run_dir / "best.pt", weights_only=False)["config"]
    layers = result["test"]["layers"]
    sparsity = " / ".join(f"{1 - l['activity']:.1%}" for l in layers.values())
    cfg = result["config"]
    sizes = [cfg["hidden_size"]] * (cfg["num_layers"] - 1) + [cfg["embedding_size"]]
    inputs = [cfg["embedding_size"]] + sizes[:-1]
    # the model as a whole: its unit-steps, every layer's units counted
    active = sum(size * l["activity"] for size, l in zip(sizes, layers.values()))
    sparsity += f" ({1 - active / sum(sizes):.1%})"
    backward = " / ".join(f"{1 - l['backward_activity']:.1%}" for l in layers.values())
    effective = sum(l["effective_macs_per_token"] for l in layers.values())
    gru_dense = sum(dense_macs(i, h) for i, h in zip(inputs, sizes))  # a dense GRU of the same shapes
    return (f"| {cfg['model']} ({run_dir.name}) | {result['valid']['perplexity']:.1f} | "
            f"{result['test']['perplexity']:.1f} | {sparsity} | {backward} | {effective / gru_dense:.2f} | "
            f"{result['train_tokens_per_second']:,.0f} |")


if __name__ == "__main__":
    print("| run | valid ppl | test ppl | activity sparsity (per layer; all units) | backward sparsity | "
          "MACs/token vs dense GRU | train tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print(row(Path(path)))
