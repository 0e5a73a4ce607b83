"""Telling whether Tune's own Ctrl-C handling stopped a ``Tuner.fit`` (``InterruptWatch``)."""

from __future__ import annotations

import signal
import threading
from typing import Any


class InterruptWatch:
    """Tells whether Tune's SIGINT/SIGUSR1 handler fired during ``fit``.

    Ray 2.60's ``tune.run`` (``_setup_signal_catching``) replaces the SIGINT handler, and on the
    first signal sets its stop event and puts back the handler it replaced. So: install a
    marker handler before ``fit``; finding it in place afterwards means Tune was interrupted.
    A second Ctrl-C then reaches the marker, which raises ``KeyboardInterrupt`` as usual.
    """

    def __init__(self) -> None:
        self.fired = False
        self._previous: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._installed:
            return
        self.fired = signal.getsignal(signal.SIGINT) == self._handler
        signal.signal(signal.SIGINT, self._previous)
