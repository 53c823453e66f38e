"""Interleaved wall-clock timing, robust summaries and a monitor of the machine's other load.

Every benchmark in this package times its variants the same way:

* each variant is a zero-argument callable that does one complete unit of work (e.g. one
  forward+backward) and leaves nothing behind that the next call could reuse;
* ``warmup`` untimed rounds first, then ``repeats`` timed rounds; in each round every variant
  runs once, in an order rotated by one per round, so slow drifts and position effects (cache
  state, allocator state, another process waking up) hit all variants alike;
* each call is timed alone with ``time.perf_counter`` (after a device synchronisation on GPU);
* summaries are median / min / max, and comparisons are *paired*: the ratio of two variants is
  computed per round and then summarised, which cancels load that lasts longer than one round;
* optionally, rounds during which other processes loaded the machine are set aside and re-run
  (see :func:`time_interleaved`), and every result says how many were.
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
    rounds_run: int = 0
    rounds_set_aside: int = 0  # timed rounds dropped because other processes loaded the machine
    round_loads: list[float | None] | None = None  # other processes' busy cores in each kept round
    contended: bool = False  # True when loaded rounds had to be kept to reach `repeats`
    quiet_wait_s: float = 0.0  # time spent waiting for other processes to go quiet

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
    max_other_load: float | None = None,
    max_rounds: int | None = None,
    max_quiet_wait_s: float = 30.0,
) -> TimingResult:
    """Time ``variants`` in interleaved, rotated rounds; see the module docstring.

    ``before_each(name)`` runs untimed before each call (e.g. dropping gradients), ``sync``
    around each timed call (``torch.cuda.synchronize`` on GPU).

    With ``max_other_load`` (cores), a round during which other processes took more than that
    (:attr:`LoadMonitor.contention`) is set aside and another round is run, up to ``max_rounds`` timed rounds in all
    (default ``3 * repeats``). On a shared machine every parallel kernel then waits for a
    descheduled thread, which inflates a variant in proportion to its number of kernels rather
    than its work. If too few clean rounds come, the least loaded set-aside rounds fill up to
    ``repeats`` and :attr:`TimingResult.contended` says so. After a loaded round the next one
    waits (:func:`wait_for_quiet`, at most ``max_quiet_wait_s`` per call in all) until the other
    processes' load drops below ``max_other_load``.
    """
    names = list(variants)
    rounds: list[tuple[float | None, dict[str, float], dict[str, int]]] = []
    limit = max_rounds if max_rounds is not None else 3 * repeats
    start = time.perf_counter()
    waited = 0.0
    round_index = 0
    while True:
        timed = round_index >= warmup
        clean = sum(1 for load, _, _ in rounds if max_other_load is None or (load or 0.0) <= max_other_load)
        if timed and (clean >= repeats or len(rounds) >= max(limit, repeats)):
            break
        if timed and max_other_load is not None and rounds and (rounds[-1][0] or 0.0) > max_other_load:
            # the last round was loaded: give the other process a moment to finish first
            waited += wait_for_quiet(max_other_load, max(0.0, max_quiet_wait_s - waited))
        shift = round_index % len(names) if names else 0
        times: dict[str, float] = {}
        faults: dict[str, int] = {}
        with LoadMonitor() as load:
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
                times[name] = time.perf_counter() - t0
                faults[name] = _minor_faults() - f0
        if timed:
            rounds.append((load.contention, times, faults))
        round_index += 1

    def is_clean(entry) -> bool:
        return max_other_load is None or (entry[0] or 0.0) <= max_other_load

    kept = [r for r in rounds if is_clean(r)][:repeats]
    contended = len(kept) < repeats
    if contended:
        extra = sorted((r for r in rounds if not is_clean(r)), key=lambda r: r[0] or 0.0)
        kept += extra[: repeats - len(kept)]
        kept.sort(key=rounds.index)  # back to round order, so that pairs stay aligned
    return TimingResult(
        samples={name: [r[1][name] for r in kept] for name in names},
        wall_s=time.perf_counter() - start,
        minor_faults={name: [r[2][name] for r in kept] for name in names} if resource is not None else None,
        rounds_run=len(rounds),
        rounds_set_aside=len(rounds) - sum(1 for r in rounds if is_clean(r)),
        round_loads=[r[0] for r in kept],
        contended=contended,
        quiet_wait_s=waited,
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
    """How much other processes competed for the CPUs while the block ran.

    ``waiting_cores``: the time this process's threads spent runnable but waiting for a CPU
    (``/proc/self/task/*/schedstat``, nanoseconds), per second of wall time. It is the direct
    measure of contention: 0 on an idle machine, about 1 when another process held one of two
    cores throughout. ``other_cores_busy``: CPU time of all other processes per second of wall
    time (``/proc/stat``, 10 ms ticks, so coarse for short blocks). ``contention`` is the first
    of the two that is available. Linux only; elsewhere all three stay None.
    """

    def __init__(self) -> None:
        self.other_cores: float | None = None
        self.own_cores: float | None = None
        self.waiting_cores: float | None = None
        self.cores = os.cpu_count()

    def __enter__(self) -> LoadMonitor:
        self._stat0 = _read_proc_stat()
        self._own0 = _own_cpu_seconds()
        self._wait0 = _own_runqueue_wait_seconds()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall0
        stat1 = _read_proc_stat()
        own = _own_cpu_seconds() - self._own0
        wait1 = _own_runqueue_wait_seconds()
        if wall <= 0:
            return
        self.own_cores = own / wall
        if self._stat0 is not None and stat1 is not None:
            busy = stat1[0] - self._stat0[0]
            self.other_cores = max(0.0, (busy - own) / wall)
        if self._wait0 is not None and wait1 is not None:
            self.waiting_cores = max(0.0, (wait1 - self._wait0) / wall)

    @property
    def contention(self) -> float | None:
        return self.waiting_cores if self.waiting_cores is not None else self.other_cores

    def as_dict(self) -> dict:
        return {
            "cores": self.cores,
            "own_cores_busy": self.own_cores,
            "other_cores_busy": self.other_cores,
            "waiting_cores": self.waiting_cores,
        }


def wait_for_quiet(max_other_cores: float, max_wait_s: float, window_s: float = 0.25) -> float:
    """Sleep in ``window_s`` steps until other processes keep at most ``max_other_cores`` cores busy
    (``/proc/stat``; this process sleeps meanwhile), or ``max_wait_s`` passed. Returns seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait_s:
        before = _read_proc_stat()
        time.sleep(window_s)
        after = _read_proc_stat()
        if before is None or after is None:
            break
        if (after[0] - before[0]) / window_s <= max_other_cores:
            break
    return time.perf_counter() - start


def _own_runqueue_wait_seconds() -> float | None:
    """Total run-queue wait of this process's live threads, or None without per-thread schedstat."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total, seen = 0, False
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
                seen = True
        except (OSError, IndexError, ValueError):
            continue  # the thread ended, or no schedstat
    return total / 1e9 if seen else None


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
