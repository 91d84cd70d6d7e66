"""The user's console while the ranks run: what they marked for it (runner.console) drawn as one progress bar with
the lines above it; everything else the launcher prints (DeepSpeed's launcher lines, library warnings and reports,
other progress bars) is only in launch.log. When the run fails, the last lines of the first traceback a rank
printed (or, without one, the launcher's last lines) come to the console with a pointer to the log.
"""

from __future__ import annotations

import collections
import re
import sys

from runner import console

RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")  # torchrun's (a host name before it, multi-node, is kept)
TRACEBACK = "Traceback (most recent call last)"
SHOWN_LINES = 15  # of a failure's output, at most


class Console:
    def __init__(self, out=None, err=None):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.bar = None
        self.tail: collections.deque[str] = collections.deque(maxlen=SHOWN_LINES)  # the launcher's last lines
        self.traceback: list[str] | None = None  # the first a rank printed, while it is being read
        self.ended = False  # it has reached an exception's line (another may be chained to it)
        self.first_traceback: list[str] | None = None

    def feed(self, text: str, echo: bool = False) -> None:
        """One line of the launcher's output, written to launch.log (`echo`: it could not be; the console shows it)."""
        event = console.parse(text)
        if event is None:
            self._remember(RANK_PREFIX.sub("", text.rstrip("\n"), count=1))
            if echo:
                self._print(text.rstrip("\n"), self.err)
        elif "line" in event:
            self._print(str(event["line"]), self.err if event.get("err") else self.out)
        elif "bar" in event:
            self._close_bar()
            self.bar = _bar(str(event["bar"]), int(event.get("total") or 0), int(event.get("n") or 0), self.err)
        elif "n" in event and self.bar is not None:
            post = event.get("post") or {}
            if post:
                self.bar.set_postfix(post, refresh=False)
            self.bar.update(max(int(event["n"]) - self.bar.n, 0))
        elif event.get("end"):
            self._close_bar()

    def _print(self, text: str, stream) -> None:
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def _remember(self, text: str) -> None:
        self.tail.append(text)
        if self.first_traceback is not None:
            return
        if self.traceback is None:
            if TRACEBACK in text:
                self.traceback, self.ended = [text], False
            return
        chained = text.startswith(("During handling", "The above exception"))
        if self.ended and text.strip() and not chained:  # the exception's line ended it, and no other is chained
            self.first_traceback, self.traceback = self.traceback, None
            return
        self.traceback.append(text)
        if chained or TRACEBACK in text:
            self.ended = False
        elif text.strip() and not text[0].isspace():  # the exception's line (after the indented frames)
            self.ended = True

    def failure(self) -> list[str]:
        """The lines that show what went wrong: the end of the first traceback, else the launcher's last lines."""
        lines = self.first_traceback or self.traceback or list(self.tail)
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        return lines[-SHOWN_LINES:]

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self._close_bar()


def _bar(name: str, total: int, start: int, stream):
    from tqdm import tqdm

    tty = hasattr(stream, "isatty") and stream.isatty()
    return tqdm(
        total=total,
        initial=start,
        desc=name,
        file=stream,
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,  # (in a file, every redraw is kept: one every 30 s)
    )
