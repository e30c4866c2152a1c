"""Stopping a ``gatednorm verify`` run early, cleanly: SIGTERM is turned into an exception.

``timeout`` and job schedulers send SIGTERM; its default action would kill the process without a
report. While a run is on, :func:`stop_on_sigterm` raises :class:`Terminated` instead, which the run
catches like Ctrl-C's ``KeyboardInterrupt`` to report the cases that ran.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import types
from collections.abc import Iterator


class Terminated(BaseException):
    """Raised by the SIGTERM handler; a BaseException so run_case's ``except Exception`` lets it through."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[types.SimpleNamespace]:
    """While the block runs, SIGTERM raises :class:`Terminated`; the previous handler is restored afterwards.

    The handler raises only while ``state.armed`` (once): the run disarms it before it writes the
    final report, so a late or second signal cannot cut the report short.
    """
    state = types.SimpleNamespace(armed=True)
    if threading.current_thread() is not threading.main_thread():
        yield state  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if state.armed:
            state.armed = False
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, previous)
