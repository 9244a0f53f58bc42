"""Fast kernels behind :mod:`egru.backends`; nothing here imports the rest of the package.

``event``: the event-driven CPU layer as ``torch.library`` operators (``egru::event_layer``
and its backward) around the numba code of ``_event_numba``, which works on plain numpy arrays
(numba is imported on first use: ``import egru`` needs only torch). ``thread_modes``: choosing
parallel or serial kernels by timing both as they run.
"""
