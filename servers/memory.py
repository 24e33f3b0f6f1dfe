"""The resident memory of process trees, sampled in the background while something runs.

Used by the benchmarks (the peak memory of a build or a training run) and the tests (how much the
workers grow under hostile traffic): one sampler, whatever is measured.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import psutil


def tree_rss(pids: Sequence[int]) -> int:
    """Resident bytes of the processes ``pids`` and all their descendants; a process gone counts nothing."""
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)] if p.is_running())
        except psutil.Error:
            pass
    return total


class PeakRss:
    """:func:`tree_rss` of ``pids`` every ``interval`` seconds from construction until :meth:`stop`.

    ``baseline`` is the first sample, ``peak`` the largest; used as a context manager, it stops on exit.
    """

    def __init__(self, pids: Sequence[int], interval: float = 0.5) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.baseline = tree_rss(self.pids)
        self.peak = self.baseline
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(self.interval):
            self.peak = max(self.peak, tree_rss(self.pids))

    def stop(self) -> int:
        """Stop sampling; the peak."""
        self._stopped.set()
        self._thread.join()
        return self.peak

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> PeakRss:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
