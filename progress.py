"""
Progress and log lines for long work, the same in every script.

On a terminal a Progress is one line that updates in place; in a log file (stderr redirected)
it writes a full line at most every `every` seconds and one at the end, never a long line of
carriage returns.
"""

import sys
import time


def log(msg: str):
    """A timestamped line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Progress:
    """progress = Progress(total, "windows"); progress.update(done, "1234 tok/s"); progress.close()."""

    def __init__(self, total: int, unit: str, every: float = 30.0, stream=None):
        self.total, self.unit, self.every = total, unit, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.time()
        self.done, self.note = 0, ""

    def line(self) -> str:
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"{self.done}/{self.total} {self.unit}, {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
                + (f", {self.note}" if self.note else ""))

    def update(self, done: int, note: str = ""):
        self.done, self.note = done, note
        now = time.time()
        if self.tty:
            print("\r  " + self.line(), end="", file=self.stream, flush=True)
        elif now - self.last >= self.every and done < self.total:
            print(f"[{time.strftime('%H:%M:%S')}] " + self.line(), file=self.stream, flush=True)
            self.last = now

    def close(self):
        if self.tty:
            print("\r  " + self.line(), file=self.stream, flush=True)
        else:
            print(f"[{time.strftime('%H:%M:%S')}] " + self.line(), file=self.stream, flush=True)


class Laps:
    """Wall time of consecutive phases: laps.lap("name") records the seconds since the previous lap."""

    def __init__(self):
        self.t, self.times = time.time(), {}

    def lap(self, name: str):
        now = time.time()
        self.times[name] = now - self.t
        self.t = now
