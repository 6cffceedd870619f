"""Stopping a run cleanly on SIGTERM (a Cloud TPU preemption, `kill`) or SIGINT (Ctrl-C).

Inside `StopRequests()`, the first such signal only records itself; the training loop checks
`requested` after every step, saves a checkpoint of the step it reached, closes its logs and
raises `Interrupted`, which the CLIs print as one line with the conventional exit status (128 +
the signal number: 143 for SIGTERM, 130 for SIGINT). A second signal while that save runs raises
KeyboardInterrupt: the run stops without finishing its logs (the save in flight completes, or
is left as a temporary directory that the next start removes; exit status 130).

In a multi-host run a signal reaches only the host it is sent to (a preemption notice, a `kill`),
and a host that stopped alone would leave the others waiting in the step's collectives: the
loop reads `agreed()`, which after every step gathers what each process received, so every host
stops after the same step and saves the same checkpoint.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lexjax.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(UserError):
    """A run stopped by a signal after saving its state; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Records SIGTERM / SIGINT while active (main thread only; elsewhere it records nothing)."""

    def __init__(self):
        self.requested: Optional[int] = None  # the signal received, if any
        self._previous: dict = {}

    def agreed(self) -> Optional[int]:
        """The signal to stop on, the same on every process: this process's own in a one-process
        run; in a multi-host run, the first signal any process received (the processes exchange
        what they received, a small all-gather every call), or None."""
        if jax.process_count() == 1:
            return self.requested
        received = np.asarray(multihost_utils.process_allgather(
            np.int32(self.requested or 0))).ravel()
        return next((int(signum) for signum in received if signum), None)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:  # the second signal: stop now
            raise KeyboardInterrupt
        self.requested = signum

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
