"""Interleaved wall-clock timing, robust summaries and a monitor of the machine's other load.

Every benchmark in this package times its variants the same way:

* each variant is a zero-argument callable that does one complete unit of work (e.g. one
  forward+backward) and leaves nothing behind that the next call could reuse;
* ``warmup`` untimed rounds first, then ``repeats`` timed rounds; in each round every variant
  runs once, in an order rotated by one per round, so slow drifts and position effects (cache
  state, allocator state, another process waking up) hit all variants alike;
* each call is timed alone with ``time.perf_counter`` (after a device synchronisation on GPU);
* summaries are median / min / max, and comparisons are *paired*: the ratio of two variants is
  computed per round and then summarised, which cancels load that lasts longer than one round.
"""

from __future__ import annotations

import os
import statistics
import time

try:  # Unix only: page-fault counts next to the times
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None
from collections.abc import Callable
from dataclasses import dataclass


def summarize(samples: list[float], scale: float = 1.0) -> dict:
    """``{"median", "min", "max", "n"}`` of ``samples`` times ``scale`` (e.g. 1e3 for milliseconds)."""
    if not samples:
        return {"median": None, "min": None, "max": None, "n": 0}
    values = [s * scale for s in samples]
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def paired_ratio(numerator: list[float], denominator: list[float], factor: float = 1.0) -> dict:
    """Summary of ``numerator[i] / (factor * denominator[i])`` over the rounds both were timed in."""
    ratios = [a / (factor * b) for a, b in zip(numerator, denominator) if b > 0]
    return summarize(ratios)


@dataclass
class TimingResult:
    """Per-variant lists of seconds (and minor page faults), one per timed round, in round order."""

    samples: dict[str, list[float]]
    wall_s: float
    minor_faults: dict[str, list[int]] | None = None

    def stats_ms(self) -> dict[str, dict]:
        return {name: summarize(values, 1e3) for name, values in self.samples.items()}

    def median_faults(self) -> dict[str, float] | None:
        if self.minor_faults is None:
            return None
        return {name: statistics.median(v) if v else None for name, v in self.minor_faults.items()}


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def time_interleaved(
    variants: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    before_each: Callable[[str], None] | None = None,
) -> TimingResult:
    """Time ``variants`` in interleaved, rotated rounds; see the module docstring.

    ``before_each(name)`` runs untimed before each call (e.g. dropping gradients), ``sync``
    around each timed call (``torch.cuda.synchronize`` on GPU).
    """
    names = list(variants)
    samples: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_index in range(warmup + repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if before_each is not None:
                before_each(name)
            if sync is not None:
                sync()
            f0 = _minor_faults()
            t0 = time.perf_counter()
            variants[name]()
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - t0
            if round_index >= warmup:
                samples[name].append(elapsed)
                faults[name].append(_minor_faults() - f0)
    return TimingResult(
        samples=samples,
        wall_s=time.perf_counter() - start,
        minor_faults=faults if resource is not None else None,
    )


def _read_proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / hz, total / hz


class LoadMonitor:
    """Average number of CPU cores busy with *other* processes while the block ran.

    Linux only (``/proc/stat`` and ``os.times``); elsewhere ``other_cores`` stays None. A value
    near 0 means the timings are clean; a value near the core count means every parallel kernel
    competed with another process for the cores, and medians are inflated accordingly.
    """

    def __init__(self) -> None:
        self.other_cores: float | None = None
        self.own_cores: float | None = None
        self.cores = os.cpu_count()

    def __enter__(self) -> LoadMonitor:
        self._stat0 = _read_proc_stat()
        self._own0 = _own_cpu_seconds()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall0
        stat1 = _read_proc_stat()
        own = _own_cpu_seconds() - self._own0
        if wall <= 0:
            return
        self.own_cores = own / wall
        if self._stat0 is not None and stat1 is not None:
            busy = stat1[0] - self._stat0[0]
            self.other_cores = max(0.0, (busy - own) / wall)

    def as_dict(self) -> dict:
        return {"cores": self.cores, "own_cores_busy": self.own_cores, "other_cores_busy": self.other_cores}


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
