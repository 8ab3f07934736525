"""A progress line for long runs (the benchmark CLI, the training example), on stderr.

On a terminal it is one line, redrawn in place: a bar, ``done/total``, what is running now, the
elapsed time and an estimate of the time left; a clock thread redraws it every second, so the
elapsed time moves while one long item runs. Elsewhere (a log file, a pipe, CI) it is compact:
a line each time another tenth of the total is reached (every item when there are ten or
fewer), nothing redrawn. ``mode="off"`` prints nothing. It writes to stderr by default, so a
table on stdout stays clean.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO


def format_seconds(s: float) -> str:
    """h:mm:ss or m:ss."""
    s = int(s)
    h, m = divmod(s, 3600)
    return f"{h}:{m // 60:02d}:{m % 60:02d}" if h else f"{m // 60}:{m % 60:02d}"


class Progress:
    """``Progress(total, unit)``; ``update(done, status)`` as the run advances; ``close()``.

    ``mode``: "auto" (live on a terminal, compact elsewhere), "live", "compact" or "off".
    Usable as a context manager (close on exit)."""

    WIDTH = 20  # characters of the bar

    def __init__(self, total: int, unit: str = "items", *, stream: Optional[TextIO] = None,
                 mode: str = "auto", lines: int = 10, clock: float = 1.0):
        if mode not in ("auto", "live", "compact", "off"):
            raise ValueError(f"mode: expected auto, live, compact or off, got {mode!r}")
        self.stream = sys.stderr if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "live" if isatty is not None and isatty() else "compact"
        self.mode, self.total, self.unit, self.lines = mode, max(int(total), 0), unit, lines
        self.done, self.status = 0, ""
        self.start = time.monotonic()
        self._printed_tenth = -1
        self._width = 0
        self._hidden = False  # cleared by clear(), until the next update
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if mode == "live" and clock > 0:
            self._thread = threading.Thread(target=self._tick, args=(clock,), daemon=True)
            self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def text(self) -> str:
        """The line as it stands now."""
        elapsed = time.monotonic() - self.start
        parts = [f"{self.done}/{self.total} {self.unit}"]
        if self.status:
            parts.append(self.status)
        timing = f"{format_seconds(elapsed)} elapsed"
        if 0 < self.done < self.total:
            timing += f", ~{format_seconds(elapsed / self.done * (self.total - self.done))} left"
        parts.append(timing)
        line = " | ".join(parts)
        if self.mode == "live":
            filled = self.WIDTH * self.done // self.total if self.total else self.WIDTH
            line = "[" + "#" * filled + "." * (self.WIDTH - filled) + "] " + line
        return line

    def _draw(self) -> None:  # live mode, under the lock
        line = self.text()
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                if not self._stop.is_set() and not self._hidden:
                    self._draw()

    def _tenth(self) -> int:  # compact mode prints a line each time this grows
        return self.done * self.lines // self.total if self.total > self.lines else self.done

    def update(self, done: Optional[int] = None, status: Optional[str] = None) -> None:
        """Set how many are done (default: one more) and what runs now."""
        if self.mode == "off":
            return
        with self._lock:
            self.done = self.done + 1 if done is None else int(done)
            if status is not None:
                self.status = status
            if self.mode == "live":
                self._hidden = False
                self._draw()
                return
            tenth = self._tenth()
            if tenth > self._printed_tenth:
                self._printed_tenth = tenth
                self.stream.write(self.text() + "\n")
                self.stream.flush()

    def clear(self) -> None:
        """Live mode: erase the line, so that other output can be printed; the next update
        draws it again, below that output. Nothing in the other modes."""
        with self._lock:
            self._hidden = self.mode == "live"
            if self.mode == "live" and self._width:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0

    def close(self, status: Optional[str] = None) -> None:
        """Stop the clock and end the line (live mode: the last state stays on screen)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.mode == "off":
            return
        with self._lock:
            if status is not None:
                self.status = status
            if self.mode == "live":
                self._draw()
                self.stream.write("\n")
            elif status is not None or self._tenth() > self._printed_tenth:
                self.stream.write(self.text() + "\n")
            self.stream.flush()
            self.mode = "off"  # closed: later calls print nothing
