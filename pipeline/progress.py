"""Progress reporting: a live tqdm bar when stderr is a terminal, else a few plain lines.

A redrawn bar in a log file is thousands of carriage returns; a log gets one line per
milestone (every 10 % by default) and the callers' one-line summaries (`note`) instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from tqdm import tqdm


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def note(line: str, stream: TextIO | None = None) -> None:
    """Write one line of figures (an epoch's losses, a stage's result) to ``stream`` (None:
    stderr), without breaking a bar being drawn there."""
    stream = stream or sys.stderr
    if _is_terminal(stream):
        tqdm.write(line, file=stream)
    else:
        print(line, file=stream, flush=True)


class Progress:
    """Steps of one loop of ``total`` ``unit``s (None: unknown), named ``desc``.

    On a terminal, a tqdm bar (``figures`` shown after it). Elsewhere, one line each time
    another ``every`` fraction of ``total`` is done and one at the end, with the figures;
    ``every=None``: none, for a short loop whose caller reports its result with `note`.
    ``enabled=False`` (e.g. every process but rank 0): nothing at all.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        *,
        every: float | None = 0.1,
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done, self.figures = 0, {}
        self._start, self._next = time.perf_counter(), 0.0
        live = enabled and _is_terminal(self.stream)
        self._plain = enabled and not live and every is not None
        self._bar = (
            tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream) if live else None
        )
        if self._plain and total:
            self._next = every * total

    def update(self, n: int = 1, **figures) -> None:
        """``n`` more steps done; ``figures`` (e.g. loss=0.61) replace the shown ones."""
        self.done += n
        self.figures.update(figures)
        if self._bar is not None:
            if figures:
                self._bar.set_postfix(self.figures, refresh=False)
            self._bar.update(n)
        elif self._plain and self.total and self.done >= self._next and self.done < self.total:
            self._line()
            while self._next <= self.done:
                self._next += self.every * self.total

    def close(self) -> None:
        """End the bar, or write the final line (steps, figures, seconds)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._plain:
            self._plain = False
            self._line()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.done // self.total} %)" if self.total else ""
        figures = "".join(f", {k} {v}" for k, v in self.figures.items())
        seconds = time.perf_counter() - self._start
        note(
            f"{self.desc}: {self.done}{of} {self.unit}{pct}{figures}, {seconds:.0f} s", self.stream
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(iterable: Iterable, desc: str, unit: str, **kwargs) -> Iterator:
    """The items of ``iterable``, reported as a `Progress` of ``len(iterable)`` steps (when it
    has one) with the same keyword arguments."""
    total = len(iterable) if hasattr(iterable, "__len__") else None
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()
