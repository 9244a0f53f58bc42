"""Runs a small language-model training on a slice of Penn Treebank (also under torchrun).

Usage: python lm_worker.py RUN_DIR JSON_CONFIG_OVERRIDES
"""

import json
import os
import sys

from egru import data
from egru.recipes import lm

REAL_LOAD_CORPUS = data.load_corpus
SLICE = {"train": 4000, "valid": 800, "test": 800}


def small_corpus(name="ptb", data_dir=None, download=False):
    corpus = REAL_LOAD_CORPUS(name, data_dir or os.environ["EGRU_DATA_DIR"])
    return data.Corpus(name, corpus.vocab, *(corpus.split(s)[:SLICE[s]] for s in data.SPLITS))


# cpu-small's shared settings (before each model got a preset of its own), made tiny.
TINY = dict(embedding_size=16, hidden_size=24, num_layers=2, batch_size=4, bptt=12, eval_batch_size=4,
            test_batch_size=4, epochs=2, log_every=1, lr=1e-2, threshold_mean=0.2, last_threshold_mean=0.15,
            dropout_embedding=0.15, dropout_between=0.1, dropout_output=0.15, dropconnect=0.15)


def tiny_config(**overrides):
    return lm.LMConfig(**{**TINY, **overrides})


if __name__ == "__main__":
    data.load_corpus = small_corpus
    lm.train_and_evaluate(tiny_config(**json.loads(sys.argv[2])), sys.argv[1], progress=False)
