"""Experiments built on the public API: configs, recurrent cores, one training harness, recipes."""
