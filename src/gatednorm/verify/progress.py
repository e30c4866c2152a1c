"""Progress of a ``gatednorm verify`` run on stderr."""

from __future__ import annotations

import sys
import threading
import time


class Progress:
    """Progress on stderr: rich's bar when installed, enabled and stderr is a terminal; otherwise a
    short heartbeat line (cases done / total, elapsed, current case) every ``every`` seconds.

    The heartbeat runs on a daemon thread so that a log shows progress (and which case is running)
    even while one case takes long, e.g. while Triton JIT-compiles a kernel variant on a GPU.
    """

    def __init__(self, total: int, bar: bool = True, every: float = 10.0) -> None:
        self.total, self.done, self.every = total, 0, every
        self.current = ""
        self._rich = None
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if bar and sys.stderr.isatty():
            try:
                from rich.progress import Progress as RichProgress  # optional: never a dependency
            except ImportError:
                pass
            else:
                self._rich = RichProgress(transient=True)
                self._task = self._rich.add_task("verifying", total=total)
                self._rich.start()
                return
        if every > 0:
            self._thread = threading.Thread(target=self._heartbeat, name="gatednorm-verify-progress", daemon=True)
            self._thread.start()

    def line(self) -> str:
        """The heartbeat line: cases done / total, seconds elapsed, the case running."""
        return (f"gatednorm verify: {self.done}/{self.total} cases, {time.monotonic() - self._start:.0f} s"
                + (f", running: {self.current}" if self.current else ""))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every):
            print(self.line(), file=sys.stderr, flush=True)

    def start_case(self, label: str) -> None:
        """Name the case that is running now (shown until it finishes)."""
        self.current = label

    def advance(self, label: str) -> None:
        """One more case finished (``label`` names it on the bar)."""
        self.set_done(self.done + 1, label)

    def set_done(self, done: int, label: str = "") -> None:
        """``done`` cases have finished (``verify --jobs`` counts its workers' cases)."""
        self.done = done
        self.current = ""
        if self._rich is not None:
            self._rich.update(self._task, completed=done, description=label[:40])

    def close(self) -> None:
        """Stop the bar or the heartbeat; without a bar, print the final count (always in the log)."""
        self._stop.set()
        if self._rich is not None:
            self._rich.stop()
        elif self._thread is not None:
            self._thread.join(timeout=1.0)
            self.current = ""
            print(self.line(), file=sys.stderr, flush=True)
