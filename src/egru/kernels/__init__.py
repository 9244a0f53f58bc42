"""Fast kernels behind :mod:`egru.backends`.

``event``: the event-driven CPU layer (numba, imported lazily: ``import egru`` needs only torch).
The numba code itself is in ``_event_numba`` and works on plain numpy arrays.
"""
