"""Trains the classification recipe on generated sequences (also under torchrun).

Usage: python classify_worker.py RUN_DIR JSON_CONFIG_OVERRIDES
"""

import json
import sys

import torch

from egru.recipes import classify


def generated_sequences() -> classify.Sequences:
    """64 training and 16 test sequences of 6 steps, 3 features, 4 classes."""
    generator = torch.Generator().manual_seed(0)

    def split(n):
        return torch.randn(n, 6, 3, generator=generator), torch.randint(4, (n,), generator=generator)

    return classify.Sequences({"train": split(64), "test": split(16)}, num_classes=4)


TINY = dict(hidden_size=10, num_layers=2, batch_size=8, eval_batch_size=8, epochs=1, log_every=1)

if __name__ == "__main__":
    cfg = classify.ClassifyConfig(**{**TINY, **json.loads(sys.argv[2])})
    classify.train_and_evaluate(cfg, sys.argv[1], sequences=generated_sequences(), progress=False,
                                plots=False)
