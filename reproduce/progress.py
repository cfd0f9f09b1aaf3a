"""A progress display on stderr (no tqdm dependency).

On a terminal, one line redrawn in place (``\\r``); written to a file or a pipe (a log), whole
lines instead, at most one every ``log_interval`` seconds, so that the log reads as a record.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """``label [#####.....] 37/100 fit epochs  loss 1.23  12.3s``, redrawn at most every ``interval`` s
    on a terminal, logged at most every ``log_interval`` s elsewhere."""

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None, interval: float = 0.2,
                 width: int = 20, log_interval: float = 10.0) -> None:
        self.label, self.total, self.width = label, max(1, total), width
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.terminal = bool(isatty and isatty())
        self.interval = interval if self.terminal else log_interval
        self.start = time.perf_counter()
        self._last = self.start if not self.terminal else 0.0
        self._shown = 0

    def update(self, done: int, stage: str, info: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        filled = min(self.width, int(self.width * done / self.total))
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {stage}"
                f"{'  ' + info if info else ''}  {now - self.start:.1f}s")
        if self.terminal:
            self.stream.write("\r" + line.ljust(self._shown))
            self._shown = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, message: str) -> None:
        line = f"{self.label} {message}"
        self.stream.write(("\r" + line.ljust(self._shown) if self.terminal else line) + "\n")
        self.stream.flush()
        self._shown = 0
