"""Progress of long work, readable both in a terminal and in a log file.

In a terminal a tqdm bar redraws itself in place. When stderr is not a terminal (CI, ``nohup ... > log``, a
cluster job) the redraws would be thousands of carriage-return frames, so the same bar prints a plain line at
most every ``PLAIN_INTERVAL`` seconds instead, and one when it ends.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

PLAIN_INTERVAL = 10.0
"""Seconds between two progress lines in a log file."""


def interactive() -> bool:
    """Whether progress goes to a terminal (stderr is a TTY)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class _PlainBar(tqdm):
    """A tqdm bar that writes whole lines (no carriage returns, no in-place redraws), one every
    ``mininterval`` seconds at most, and a last one when it closes."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.__str__() if msg is None else msg
        if text.strip():
            self.fp.write(text.strip() + "\n")
            self.fp.flush()
        self._shown = (self.n, self._time())
        return True

    def refresh(self, nolock: bool = False, lock_args: Any = None) -> bool:
        # set_postfix and tqdm.write redraw at once in a terminal; in a log only the interval decides
        if self.disable:  # a disabled bar has no clock (tqdm skips its set-up)
            return False
        shown_at = getattr(self, "_shown", (None, -float("inf")))[1]
        if self._time() - shown_at < self.mininterval:
            return False
        return super().refresh(nolock=nolock, lock_args=lock_args)

    def clear(self, nolock: bool = False) -> None:
        pass  # lines are never redrawn, so there is nothing to clear before tqdm.write

    def close(self) -> None:
        if self.disable:
            return
        leave = self.leave if self.leave is not None else abs(self.pos) == 0
        if leave and getattr(self, "_shown", (None,))[0] != self.n:
            self._ema_dt = lambda: None  # the overall rate in the last line
            self.display()
        self.disable = True
        self._decr_instances(self)


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` in a terminal; in a log, a bar that prints a plain line every few seconds.

    Nested bars (``leave=False``) print nothing in a log: their parent's line says enough."""
    if interactive():
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    if kwargs.get("leave") is False:
        kwargs["disable"] = True
    kwargs.pop("dynamic_ncols", None)
    kwargs.setdefault("mininterval", PLAIN_INTERVAL)
    kwargs.setdefault("maxinterval", 10 * PLAIN_INTERVAL)
    kwargs.setdefault("ncols", 0)  # no bar graphics: "desc: 40%| 4/10 [00:05<00:07, 1.2it/s]" without the bar
    return _PlainBar(iterable, file=sys.stderr, **kwargs)


def note(text: str) -> None:
    """A line on stderr that does not tear a terminal's progress bar (stdout holds the commands' JSON)."""
    tqdm.write(text, file=sys.stderr)
