"""Ctrl-C and SIGTERM while training: honoured at any moment, never lost.

``stop_on_signals()`` installs one handler for SIGINT and SIGTERM for the whole command (``moalign train`` enters it
before anything is imported or loaded). What a signal does depends on the phase:

* before training starts (imports, data, model loading): stop at once (KeyboardInterrupt): nothing is lost, the
  run directory holds only what a resume or a new start handles;
* while steps run (``STOP.deferring()``, entered by the trainer's loop): the first signal asks for a stop at the end
  of the current step, where a consistent checkpoint is written; the step finishes (``STOP.requested``);
* a second signal at any moment: stop at once (KeyboardInterrupt), from wherever the process is (a hanging
  objective, a long evaluation); the newest checkpoint on disk is intact (checkpoints are written atomically).

The handler is installed whatever SIGINT's disposition was: a shell starts background jobs with SIGINT ignored, and
a run that cannot be stopped by the signal it was sent is worse than one that can. Only the main thread can install
handlers; elsewhere (a worker thread of a library user) ``stop_on_signals`` does nothing.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


class StopRequests:
    """The process's stop state (one per process: ``STOP``)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None  # the first signal received while deferring
        self._deferring = 0
        self._installed = 0

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def handle(self, signum: int, frame) -> None:
        if self._deferring and self.signal is None:
            self.signal = signum
            os.write(2, f"\nsignal {signum}: stopping at the end of this step, after a checkpoint (send it again to "
                        f"stop at once)\n".encode())
            return
        raise KeyboardInterrupt(f"stopped at once by signal {signum}" + (
            " (a second signal; the newest checkpoint on disk is intact)" if self.signal is not None else ""))

    @contextmanager
    def deferring(self) -> Iterator["StopRequests"]:
        """Within the block a first signal only sets ``signal``; it is reset on entry to the outermost block."""
        with stop_on_signals():
            if not self._deferring:
                self.signal = None
            self._deferring += 1
            try:
                yield self
            finally:
                self._deferring -= 1


STOP = StopRequests()


@contextmanager
def stop_on_signals() -> Iterator[StopRequests]:
    """SIGINT and SIGTERM go to ``STOP.handle`` within the block (nested blocks share one installation); the previous
    handlers come back after it."""
    if STOP._installed or threading.current_thread() is not threading.main_thread():
        yield STOP
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, STOP.handle)
    STOP._installed += 1
    try:
        yield STOP
    finally:
        STOP._installed -= 1
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
