"""What the ranks mean for the user's console, sent through the launcher's output as marked lines.

The launcher's output (DeepSpeed's and torchrun's own lines, library warnings, progress bars of libraries) goes to
the run's launch.log only; the driver draws the console from the lines marked here: one progress bar (rank 0's),
evaluations and notes (runner.driver.console). A marked line is `@@runner ` and one JSON object, anywhere in a line
(a multi-node launcher prefixes each line with its host):

    {"line": TEXT}                      a line for the console (stdout; "err": true for stderr)
    {"bar": NAME, "total": N, "n": K}   a progress bar starts (a resumed run starts at K)
    {"n": K, "post": {...}}             it is at step K; the values it shows beside the bar (loss, reward, KL)
    {"end": true}                       it is done
"""

from __future__ import annotations

import json
import sys
import time

MARK = "@@runner "
SHOWN = (("loss", "loss"), ("actor_loss", "loss"), ("reward_mean", "reward"), ("kl", "kl"))  # beside the bar


def emit(**event) -> None:
    sys.stdout.write(MARK + json.dumps(event) + "\n")
    sys.stdout.flush()


def line(text: str, err: bool = False) -> None:
    """A line for the console (from any rank)."""
    emit(line=text, **({"err": True} if err else {}))


def parse(text: str) -> dict | None:
    """The event a launcher's output line carries, or None for any other line."""
    at = text.find(MARK)
    if at < 0:
        return None
    try:
        event = json.loads(text[at + len(MARK) :])
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


class Progress:
    """Rank 0's progress bar, as events: at most one a second (launch.log keeps every event), and at every change
    of what it shows when `flush` is asked for."""

    def __init__(self, name: str, total: int, start: int, every_s: float = 1.0):
        self.n, self.post, self.every_s = start, {}, every_s
        self.sent = float("-inf")  # the first advance is shown at once (time.monotonic() may start near 0 at boot)
        emit(bar=name, total=total, n=start)

    def advance(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.sent >= self.every_s:
            self.flush()

    def show(self, values: dict) -> None:
        """The values beside the bar, from a step's logged metrics (loss; reward and KL for on-policy methods)."""
        post = {}
        for key, label in SHOWN:
            if isinstance(values.get(key), (int, float)) and label not in post:
                post[label] = f"{values[key]:.4g}"
        if post:
            self.post = post

    def flush(self) -> None:
        self.sent = time.monotonic()
        emit(n=self.n, post=self.post)

    def close(self) -> None:
        self.flush()
        emit(end=True)
