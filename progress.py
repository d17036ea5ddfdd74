"""Progress of long work: a rich bar on a terminal; complete plain lines at a steady rate elsewhere.

Under Slurm, CI or `| tee` there is no terminal: a live bar would come out as one line cut at 80
columns ("tra… dinov2/sp…"), so there each report is a whole line, printed every `every` seconds
and at the end, with numbers never wrapped.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt(x: float) -> str:
    """Three significant digits without exponent noise: 0.0512, 3.14, 2741 (never 0.0 for a slow rate)."""
    if x == 0 or not (abs(x) < 1e15):
        return f"{x:g}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress("training", total=steps, unit="steps") as p: p.advance(1, losses="...")`.

    Args:
        what: the work, e.g. "caching", "training".
        total: units of work in all.
        unit: what one unit is, e.g. "images", "steps".
        start: units already done (a resumed run).
        enabled: False makes it silent.
        every: seconds between plain lines (no terminal).
        stream: where lines go; default stderr.
    """

    def __init__(self, what: str, total: int, *, unit: str, start: int = 0, enabled: bool = True,
                 every: float = 10.0, stream: TextIO | None = None):
        self.what, self.total, self.unit, self.done, self.every = what, total, unit, start, every
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.info = ""
        self._bar = None

    def __enter__(self) -> "Progress":
        self.started = self.last = time.perf_counter()
        self.start = self.done
        if self.tty:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeRemainingColumn)
            self._bar = Bar(TextColumn(f"[bold]{self.what}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn(self.unit), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                            console=Console(file=self.stream))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total, completed=self.done, info="")
        return self

    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        """`n` more units done; `info` replaces the trailing text (e.g. the latest losses)."""
        self.done += n
        if info is not None:
            self.info = info
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self.info)
        elif self.enabled and time.perf_counter() - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        rate = (self.done - self.start) / max(now - self.started, 1e-9)
        eta = f", eta {_duration((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        line = (f"{self.what}: {self.done}/{self.total} {self.unit}{share}, {fmt(rate)} {self.unit}/s, "
                f"{_duration(now - self.started)} elapsed{eta}")
        print(line + (f" | {self.info}" if self.info else ""), file=self.stream, flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None:
            self._line()
