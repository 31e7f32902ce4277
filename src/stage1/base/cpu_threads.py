"""How many intra-op threads a CPU training process runs (train.cpu_threads; null: chosen here).

torch's default is one thread per core whatever else the machine runs: on a shared 2-core machine the quickstart ran
2.5x slower with it than with one thread, as its threads waited on each other for cores other work held. The choice
here counts the cores this process may use (its affinity mask), less the share the rest of the machine keeps busy
now (/proc/stat over a quarter of a second before the run starts; the load average instead lags a minute behind,
and counted the previous command's work as load), less the DataLoader workers, shared by the ranks on this machine;
at least 1. OMP_NUM_THREADS, when set, is the user's choice and is kept.
"""

from __future__ import annotations

import os
import time

SAMPLE_SECONDS = 0.25
USERS_CHOICE = ("train.cpu_threads", "OMP_NUM_THREADS")  # the reasons cpu_threads gives for a count the user set


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_share() -> float:
    """The share of the machine's CPU time spent busy over the next SAMPLE_SECONDS (/proc/stat); 0 where there is
    no /proc."""
    def times() -> tuple[int, int]:  # (idle incl. iowait, total) jiffies of all cores
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return values[3] + values[4], sum(values)

    try:
        idle, total = times()
        time.sleep(SAMPLE_SECONDS)
        idle2, total2 = times()
    except (OSError, ValueError, IndexError):
        return 0.0
    return 1.0 - (idle2 - idle) / max(1, total2 - total)


def cpu_threads(requested: int | None, workers: int, local_processes: int) -> tuple[int, str]:
    """(threads, why): `requested` if given, else OMP_NUM_THREADS if set, else the idle usable cores less the
    DataLoader `workers`, shared by `local_processes` ranks."""
    if requested is not None:
        return requested, USERS_CHOICE[0]
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), USERS_CHOICE[1]
    cores = usable_cores()
    busy = min(cores - 1, round(busy_share() * cores))
    threads = max(1, (cores - busy - workers) // max(1, local_processes))
    return threads, (f"{cores} usable core(s), {busy} busy with other work, {workers} DataLoader worker(s), "
                     f"{local_processes} rank(s) on this machine; train.cpu_threads=N to choose")
