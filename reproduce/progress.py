"""A one-line progress display on stderr (``\\r``-rewritten; no tqdm dependency)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    """``label [#####.....] 37/100 fit epochs  loss 1.23  12.3s``, redrawn at most every ``interval`` s."""

    def __init__(self, label: str, total: int, stream: Optional[TextIO] = None, interval: float = 0.2,
                 width: int = 20) -> None:
        self.label, self.total, self.interval, self.width = label, max(1, total), interval, width
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self._last = 0.0
        self._shown = 0

    def update(self, done: int, stage: str, info: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        filled = min(self.width, int(self.width * done / self.total))
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {stage}"
                f"{'  ' + info if info else ''}  {now - self.start:.1f}s")
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)

    def close(self, message: str) -> None:
        line = f"{self.label} {message}"
        self.stream.write("\r" + line.ljust(self._shown) + "\n")
        self.stream.flush()
        self._shown = 0
