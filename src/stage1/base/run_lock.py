"""One writer per run folder: a training holds an exclusive lock on results_dir/.lock while it runs, and a second
training into the same folder (which would resume the first's checkpoint and write the same metrics file) stops in one
error line. The lock is the operating system's (flock): a run that dies, however, holds it no longer."""

from __future__ import annotations

import os
from contextlib import contextmanager

LOCK_NAME = ".lock"


@contextmanager
def run_lock(folder: str, rank: int = 0):
    """Hold results_dir's lock while the block runs (the first rank only: the other ranks are the same job)."""
    if rank != 0:
        yield
        return
    import fcntl

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()[:40]
            raise OSError(f"{folder} is in use by another training ({holder or 'a running process'}): two runs "
                          f"writing one results_dir would resume each other's checkpoints and mix their metrics; "
                          f"wait for it, or give this run another results_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
