"""Choosing between a parallel and a serial way of doing work by measuring both as it runs.

A machine is rarely idle: data loaders, a second job, a notebook. Threads that synchronise
often stall whenever one of them is descheduled, so which way is faster depends on the moment,
not only on the work. :class:`ThreadModes` keeps running averages of both and retries the
slower one now and then. Used by the event kernels (the backward pass and the sparse input
product) and by the recipes' evaluation loops (torch's intra-op threads). Standard library
only.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional


class ThreadModes:
    """Whether the parallel or the serial way of running some work is faster on this machine
    now, per kind of work (``key``), from the times of recent runs.

    Parallel code that synchronises its threads often (the event backend's backward kernel:
    twice per step; torch's thread pool on the small operations of a batch-1 evaluation) wins
    on idle cores (≈ 1.5× for the backward at B = 1, H = 1024) and stalls when another process
    takes a core: a descheduled thread holds up every synchronisation, and the parallel way can
    be several to tens of times slower than the serial one. So the mode with the lower running
    average of seconds per unit of work is used, and the other one is tried again after
    ``first_probe`` runs, an interval that doubles (up to ``max_interval``) while it stays
    slower: a stalled parallel mode then costs one slow run in hundreds, and cores that become
    idle again are noticed at the next try (a try's time replaces the tried mode's average,
    which dates from other conditions). The first run of each mode (which may compile) is not
    counted. Use: ``with modes.timed(key, units) as parallel: ...`` (or ``choose`` and
    ``record`` by hand).
    """

    def __init__(self, first_probe: int = 8, max_interval: int = 256, smoothing: float = 0.5):
        self.first_probe, self.max_interval, self.smoothing = first_probe, max_interval, smoothing
        self._sites: dict = {}

    def choose(self, key) -> bool:
        """True: run the parallel kernel for this call; False: the serial twin."""
        site = self._sites.setdefault(key, {"calls": {True: 0, False: 0}, "time": {},
                                            "interval": self.first_probe,
                                            "countdown": self.first_probe, "probing": False})
        for parallel in (True, False):  # each mode's warm-up call, then one timed call
            if parallel not in site["time"] and site["calls"][parallel] < 2:
                return parallel
        best = site["time"][True] <= site["time"][False]
        site["countdown"] -= 1
        site["probing"] = site["countdown"] <= 0
        return (not best) if site["probing"] else best

    def record(self, key, parallel: bool, seconds_per_unit: float) -> None:
        site = self._sites[key]
        site["calls"][parallel] += 1
        if site["calls"][parallel] == 1:
            return  # the warm-up call
        previous = site["time"].get(parallel)
        if previous is None or site["probing"]:  # a probe replaces what the machine was then
            site["time"][parallel] = seconds_per_unit
        else:
            site["time"][parallel] = (self.smoothing * previous
                                      + (1 - self.smoothing) * seconds_per_unit)
        if site["probing"]:
            site["probing"] = False
            other = site["time"].get(not parallel)
            still_slower = other is not None and site["time"][parallel] > other
            site["interval"] = (min(2 * site["interval"], self.max_interval) if still_slower
                                else self.first_probe)
            site["countdown"] = site["interval"]

    @contextlib.contextmanager
    def timed(self, key, units: float, enabled: bool = True):
        """Chooses the mode for ``key`` (yielded: True for parallel) and records the block's
        time per unit of work. ``enabled=False`` (one thread): always serial, nothing recorded."""
        if not enabled:
            yield False
            return
        parallel = self.choose(key)
        start = time.perf_counter()
        yield parallel
        self.record(key, parallel, (time.perf_counter() - start) / max(units, 1))

    def preferred(self, key) -> Optional[bool]:
        """The mode in use for ``key`` (None before both were timed)."""
        site = self._sites.get(key)
        if site is None or len(site["time"]) < 2:
            return None
        return site["time"][True] <= site["time"][False]
