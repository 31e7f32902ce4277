"""Preemption: SIGTERM and SIGUSR1, what SLURM and Kubernetes send before they kill a job, turned into a request to
stop that the training loop reads between steps (it then checkpoints and exits)."""

from __future__ import annotations

import os
import signal
import threading


class StopSignals:
    """Inside `with`, SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before a kill) only note a request to
    stop in `received` (the first signal's number); the loop checks it between steps. The previous handlers come
    back on exit. Python sets handlers in the main thread only: elsewhere nothing is installed."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received, self._previous = 0, {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():  # None: a handler set outside Python, which cannot be restored
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _note(self, signum: int, frame) -> None:
        self.received = self.received or signum  # a second signal (say while saving) changes nothing

    @staticmethod
    def pass_over_in_worker(worker_id: int) -> None:
        """A DataLoader worker_init_fn. SLURM signals every process of a job step, and a worker that died of the
        signal would make torch raise in the training process (or a batch in flight unreadable) before the
        checkpoint: a worker lets these signals pass unless its parent sends them (torch's own shutdown), when it
        exits as torch's handler does."""
        signal.pthread_sigmask(signal.SIG_BLOCK, StopSignals.SIGNALS)  # threads started later inherit the mask

        def wait() -> None:
            while signal.sigwaitinfo(StopSignals.SIGNALS).si_pid != os.getppid():
                pass
            os._exit(0)

        threading.Thread(target=wait, daemon=True).start()
