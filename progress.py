"""
Progress and log lines for long work, the same in every script, and the machine a result was
measured on (recorded in every results file that holds a time).

On a terminal a Progress is one line that updates in place; in a log file (stderr redirected)
it writes a full line at most every `every` seconds and one at the end, never a long line of
carriage returns.
"""

import os
import platform
import re
import sys
import time

import torch


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
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()  # a GPU runs asynchronously: a phase ends when its kernels have
        now = time.time()
        self.times[name] = now - self.t
        self.t = now

    def each(self, items, name: str):
        """items, each yielded once laps.lap(name) has timed getting it (and whatever ran since the
        last lap): a loop timed from the outside."""
        for item in items:
            self.lap(name)
            yield item


def process_memory(field: str = "VmHWM", pid="self") -> int:
    """A process's memory in bytes, read from the kernel's /proc/PID/status where it has one (Linux),
    else 0: VmHWM, the high-water mark of the process's own address space (ru_maxrss would include a
    parent's peak, carried across fork and exec), or VmRSS, its resident set now."""
    try:
        with open(f"/proc/{pid}/status") as f:
            found = re.search(rf"{field}:\s+(\d+)", f.read())
    except OSError:
        return 0
    return int(found.group(1)) * 1024 if found else 0


def machine() -> dict:
    """The processor (or GPU), its cores, the threads torch uses and the software: where a timing
    was measured, so that a figure is never read as another machine's. The CPU is named by its
    architecture and the widest vector kernels torch runs on it (AVX2, AVX512, ...), what decides
    its speed here."""
    cpu = f"{platform.machine()} CPU with {torch.backends.cpu.get_cpu_capability()} kernels"
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def machine_line(m: dict) -> str:
    """A machine() record as one phrase: 'x86_64 CPU with AVX2 kernels (2 cores, torch on 1 thread), Python
    3.11.7, torch 2.13.0'."""
    where = m["gpu"] if m.get("gpu") else f"{m['cpu']} ({m['cores']} cores, torch on {m['torch_threads']} thread" \
                                         f"{'s' if m['torch_threads'] != 1 else ''})"
    return f"{where}, Python {m['python']}, torch {m['torch']}"
