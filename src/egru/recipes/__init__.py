"""Experiments built on the public API: data, configs and thin training loops."""
