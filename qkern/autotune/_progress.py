"""A progress bar in a few lines: redrawn in place on a terminal, silent elsewhere."""

from __future__ import annotations

import sys
import time


class Progress:
    """`with Progress(total, label) as bar: ... bar.step("what finished")`.

    enabled=None draws only when the stream is a terminal (so logs and pipes stay clean).
    """

    def __init__(self, total: int, label: str = "", *, enabled: bool | None = None,
                 stream=None, width: int = 24):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled, self.total, self.label, self.width = enabled, max(total, 1), label, width
        self.done, self.start, self._last_len = 0, time.perf_counter(), 0

    def __enter__(self):
        self._draw("")
        return self

    def __exit__(self, *exc):
        self.close()

    def set_total(self, total: int) -> None:
        self.total = max(total, 1)
        self._draw("")

    def step(self, what: str = "", n: int = 1) -> None:
        self.done = min(self.done + n, self.total)
        self._draw(what)

    def _draw(self, what: str) -> None:
        if not self.enabled:
            return
        filled = int(self.width * self.done / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        secs = time.perf_counter() - self.start
        line = f"{self.label} [{bar}] {self.done}/{self.total} {secs:5.1f}s {what}"[:118]
        pad = " " * max(0, self._last_len - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._last_len = len(line)

    def close(self) -> None:
        if self.enabled and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self.stream.flush()
            self._last_len = 0
