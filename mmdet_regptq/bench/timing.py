"""Latency of several variants measured side by side."""
from __future__ import annotations

import time
from typing import Any, Callable

__all__ = ['time_interleaved']


def time_interleaved(runs: dict[str, Callable[[], Any]], n: int | dict[str, int],
                     warmup: int = 3, sync: Callable[[], Any] | None = None
                     ) -> dict[str, list[float]]:
    """Warm every row up, then run the rows round-robin until each has ``n`` timings.

    Why interleaved: on a shared CPU (or GPU) the load changes during a benchmark; running
    the rows in turn spreads it over all of them instead of penalising whichever row ran
    while another job was busy.

    Args:
        runs: row name -> a call without arguments that runs the variant once.
        n: timed runs per row (one number for all, or per row).
        warmup: untimed runs of each row first.
        sync: called before and after each timed run (``torch.cuda.synchronize`` on a GPU).

    Returns:
        row name -> the seconds of each timed run.
    """
    counts = n if isinstance(n, dict) else {key: n for key in runs}
    sync = sync or (lambda: None)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in runs}
    while any(len(times[k]) < counts[k] for k in runs):
        for key, fn in runs.items():
            if len(times[key]) >= counts[key]:
                continue
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - start)
    return times
