"""The choice between parallel and serial work by measurement (``egru.kernels.thread_modes``)."""

from egru.kernels.thread_modes import ThreadModes


def test_thread_modes_follow_the_measured_faster_mode():
    """The backward's thread mode: parallel while it is faster, serial once the parallel
    kernel stalls (cores taken by another process), parallel again when the cores are free;
    the slower mode is retried at intervals that double while it stays slower."""
    modes = ThreadModes(first_probe=4, max_interval=16)
    key = ("backward", 1, 8)
    per_step = {True: 1.0, False: 2.0}  # idle cores: the parallel kernel is faster
    chosen = []

    def calls(n):
        for _ in range(n):
            parallel = modes.choose(key)
            chosen.append(parallel)
            modes.record(key, parallel, per_step[parallel])

    calls(4)  # a warm-up and a timed call of each mode
    assert chosen == [True, True, False, False] and modes.preferred(key) is True
    calls(20)
    assert sum(not p for p in chosen[4:]) <= 3  # the serial twin only as a probe
    per_step[True] = 50.0  # another process takes a core: every synchronisation stalls
    calls(12)
    assert modes.preferred(key) is False
    chosen.clear()
    calls(100)
    probes = [i for i, parallel in enumerate(chosen) if parallel]
    assert 4 <= len(probes) <= 10 and modes.preferred(key) is False  # retried, ever more rarely
    assert probes[-1] - probes[-2] == 16
    per_step[True] = 1.0  # the cores are free again
    calls(40)
    assert modes.preferred(key) is True


def test_measured_torch_threads_switch_and_restore():
    """The evaluation loops' torch threads: all of them or one per step, as measured, and the
    process's setting restored after every step."""
    import torch

    from egru.recipes.common import MeasuredTorchThreads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threads = MeasuredTorchThreads()
        inside = []
        for _ in range(6):
            with threads.step("eval", units=1):
                inside.append(torch.get_num_threads())
            assert torch.get_num_threads() == 2
        assert inside[:4] == [2, 2, 1, 1]  # a warm-up and a timed step of each mode
        assert set(inside[4:]) <= {1, 2} and threads.modes.preferred("eval") is not None
    finally:
        torch.set_num_threads(before)

