"""
The CUDA checks and the GPU figures of docs/benchmarks.md, in one run that fits a rented GPU's
window (540 s by default, every step included).

The steps, in the order of what they tell, each a fresh process with its share of the budget:

  1. tests/test_devices.py: every method on CUDA against the CPU (masks, kept experts,
     perplexity), and the 2:4 kernels of every backend this GPU runs against the dense model;
  2. README's first command on the GPU: the embedded model pruned by MoE-Pruner at 50%, then both
     models' perplexity on the evaluation sample (the CPU gives the README's numbers);
  3. bench.sparse24_kernels: dense against 2:4 F.linear at Mixtral-8x7B's expert shapes and for one
     whole MoE block, with every backend sparse24's chooser takes on this GPU;
  4. bench.scale --device cuda: prune.py on one decoder layer at Mixtral-8x7B's width, MoE-Pruner
     in bfloat16 on the paper's 128 x 2048 calibration tokens.

The shares add up to the budget, less a few seconds a step for stopping one that runs out of time:
such a step is ended with its whole process group (its own children too: bench.scale's prune.py,
torchrun's workers), first with SIGTERM (the scripts then remove what they were writing), then
with SIGKILL, and recorded as a timeout; the next step runs. The JSON file is saved after every
step, so an interrupted run keeps what it measured. It records the python and torch it ran with
(torch 2.11 or newer: GPU machines often have an older one than requirements.txt names); no step
needs lm-eval or transformers. Where torch sees no CUDA device, `--device cuda` (the default) is
refused in one line and nothing is written; `--device cpu` runs the same plan on the CPU (the
test suite's dry run of the plan, the saving and the stopping).

    python -m bench.gpu_check --out results/gpu.json
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)

STEPS = ("device_tests", "readme", "sparse24", "scale")
SHARES = {"device_tests": 0.30, "readme": 0.15, "sparse24": 0.20, "scale": 0.35}  # of the budget: they sum to 1
GRACE = 3  # seconds between a timed-out step's SIGTERM and its SIGKILL, set aside from the budget per step
MIN_TORCH = (2, 11)  # the oldest torch the scripts' CUDA paths are checked on
FORMER_STEPS = {"tests": "device_tests", "scale-bfloat16": "scale", "scale-float32": None, "suite": None}  # --skip's
# former names (None: a step no longer in the plan)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="the JSON file every figure goes to (saved after each step)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--log", help="also write each step's output to this file")
    p.add_argument("--seconds", type=cli.positive_int, default=540,
                   help="time for all steps together (default 540); each step gets its share of it")
    p.add_argument("--skip", default="", help=f"comma list of steps not to run: {', '.join(STEPS)}")
    p.add_argument("--device", type=cli.device, default="cuda",
                   help="the GPU the steps run on: cuda (default) or cuda:N; cpu runs the same plan on the CPU, as a "
                        "dry run")
    return p


cli.parse_first(__name__, build_parser)

import json

import torch

import data
from outputs import GrowingFile
from progress import machine


def plan(seconds: int) -> dict:
    """{step: its time limit in seconds}: the shares of what the budget leaves after each step's grace."""
    usable = seconds - GRACE * len(STEPS)
    return {s: max(1, int(usable * SHARES[s])) for s in STEPS}


def step(commands: list, limit: float, log) -> dict:
    """Each of commands (argv lists) in turn, in one new process group each, all within limit
    seconds: the exit status of the last one run (or "timeout"), the time and the output's tail.
    A command still running at the limit is stopped with its whole group, SIGTERM then SIGKILL,
    and whatever it left in its group is killed when it ends either way."""
    t0, out, rc, groups = time.time(), "", None, []
    for argv in commands:
        left = limit - (time.time() - t0)
        if left <= 0:
            rc = "timeout"
            break
        p = subprocess.Popen(argv, cwd=data.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own process group: what it starts goes with it
        groups.append(p.pid)
        try:
            text, _ = p.communicate(timeout=left)
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
            stop_group(p.pid, signal.SIGTERM)
            try:
                text, _ = p.communicate(timeout=GRACE)
            except subprocess.TimeoutExpired:
                stop_group(p.pid, signal.SIGKILL)
                text, _ = p.communicate()
        stop_group(p.pid, signal.SIGKILL)  # anything the command left behind in its group ...
        deadline = time.time() + GRACE
        while group_alive(p.pid) and time.time() < deadline:  # ... gone, and its GPU memory free, before the next
            time.sleep(0.05)
        out += text or ""
        log(f"$ {' '.join(argv[1:])}: exit {rc}, {time.time() - t0:.0f} s\n{text}")
        if rc != 0:
            break
    return {"commands": [" ".join(["python"] + a[1:]) for a in commands], "exit": rc, "limit": limit,
            "seconds": round(time.time() - t0, 1), "process_groups": groups, "tail": out[-1500:]}


def stop_group(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (one dead but not yet reaped does not count), read
    from /proc where there is one (Linux), else by signal 0 to the group."""
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, group = f.read().rsplit(")", 1)[1].split()[:3]  # after the name: state, ppid, pgrp
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def pytest_counts(tail: str) -> dict:
    """pytest's summary line as {outcome: count}."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}


def commands(name: str, work: str, device: str) -> list:
    """The argv lists of a step, run with this interpreter (and so this torch)."""
    py = sys.executable
    if name == "device_tests":
        return [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short", "tests/test_devices.py"]]
    if name == "readme":
        pruned = os.path.join(work, "moe-pruner-50")
        return [[py, "prune.py", "--method", "moe-pruner", "--sparsity", "0.5", "--out", pruned, "--device", device],
                [py, "eval_ppl.py", "--model", "models/tiny-mixtral", pruned, "--device", device, "--json",
                 os.path.join(work, "readme.json")]]
    if name == "sparse24":
        return [[py, "-m", "bench.sparse24_kernels", "--json", os.path.join(work, "sparse24.json")]]
    return [[py, "-m", "bench.scale", "--device", device, "--num-hidden-layers", "1", "--nsamples", "128",
             "--dtypes", "bfloat16", "--methods", "moe-pruner", "--batch-size", "8", "--dir", os.path.join(work, "scale"),
             "--json", os.path.join(work, "scale.json")]]


def figures(name: str, work: str, r: dict) -> dict:
    """What a step measured, from the files it wrote (absent where it stopped before writing)."""
    loaded = lambda f: json.load(open(os.path.join(work, f))) if os.path.isfile(os.path.join(work, f)) else None
    if name == "device_tests":
        return {"counts": pytest_counts(r["tail"])}
    if name == "readme":
        return {"ppl": [m["ppl"] for m in loaded("readme.json") or []]}
    return {"results": loaded(f"{name}.json")}


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
        if version < MIN_TORCH:
            raise data.DataError(f"torch {torch.__version__} is older than {'.'.join(map(str, MIN_TORCH))}, the oldest "
                                 f"these checks run on")
        skip = {FORMER_STEPS.get(s, s) for s in a.skip.split(",") if s} - {None}
        if skip - set(STEPS):
            raise data.DataError(f"--skip {','.join(sorted(skip - set(STEPS)))}: not a step ({', '.join(STEPS)})")
        out = GrowingFile(a.out, a.overwrite)  # checked before any work
        logf = open(a.log, "w") if a.log else None

        def log(msg):
            print(msg, flush=True)
            if logf:
                logf.write(msg + "\n")
                logf.flush()

        limits = plan(a.seconds)
        res = {"machine": machine(), "python": sys.version.split()[0], "torch": torch.__version__,
               "device": a.device, "gpus": torch.cuda.device_count() if a.device != "cpu" else 0,
               "budget_s": a.seconds, "plan": limits, "steps": {}}
        out.save(res)
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
            for name in STEPS:
                if name in skip:
                    continue
                r = step(commands(name, work, a.device), limits[name], log)
                res["steps"][name] = {**r, **figures(name, work, r)}
                out.save(res)
        return res


if __name__ == "__main__":
    main()
