"""Moved to :mod:`egru.kernels.thread_modes`."""
from .kernels.thread_modes import ThreadModes  # noqa: F401
