"""SIGTERM and SIGINT as a request to stop at the next safe point, instead of an immediate death.

A cluster scheduler (SLURM, spot instances) sends SIGTERM some time before it kills a job; dying at
once loses everything since the last checkpoint. Inside `StopSignals` the first signal is only
recorded (the loop saves and leaves at its next agreement point); a second one acts as usual, so
a user can still interrupt a stuck run.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Exit code of a run stopped by a signal after saving (EX_TEMPFAIL: "try again", i.e. resume).
STOPPED_EXIT_CODE = 75


class StopSignals:
    """Context manager: `received` names the first stop signal caught inside it, else None."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {signum: signal.signal(signum, self._record) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # a second signal: behave as without us
            self._restore()
            os.kill(os.getpid(), signum)
            return
        self.received = name
        print(
            f"received {name}: finishing the current optimizer step, then saving (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers leave stopping to their main process (a signal sent to the whole group must not kill them first)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
