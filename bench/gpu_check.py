"""
The CUDA checks and the GPU figures of docs/benchmarks.md, in one run of a few minutes on one GPU.

  1. tests/test_devices.py: every script on CUDA against the CPU (masks, kept experts, perplexity),
     the 2:4 kernels against the dense model; then the rest of the test suite on that machine;
  2. README's first command on the GPU: the embedded model pruned by MoE-Pruner at 50%, both
     models' perplexity on the evaluation sample (the CPU gives the README's numbers);
  3. bench.sparse24_kernels: CUTLASS (and cuSPARSELt) 2:4 kernels against dense at Mixtral-8x7B's
     expert shapes and for one whole MoE block;
  4. bench.scale --device cuda: prune.py on one decoder layer at Mixtral-8x7B's width with the
     paper's 128 x 2048 calibration tokens, every method in bfloat16 and MoE-Pruner in float32.

Each step runs in its own process with its own time limit; a step that fails or runs out of time
is recorded as such and the next one runs. Everything goes to one JSON file, which
docs/benchmarks.md quotes (`python run_paper.py --docs`). With no CUDA device it says so and
writes nothing.

    python -m bench.gpu_check --out results/gpu.json
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first: --help and usage errors are answered before torch loads (cli.py)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="the JSON file every figure goes to (rewritten after each step)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--log", help="also write each step's output to this file")
    p.add_argument("--seconds", type=cli.positive_int, default=540,
                   help="time for all steps together (default 540): each step gets what is left, at most its own limit")
    p.add_argument("--skip", default="", help="comma list of steps not to run: tests, readme, sparse24, scale-bfloat16, scale-float32, suite")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # answers --help or a usage error here, then main() runs below

import torch

import data
from outputs import check_output_file, json_text, write_output_file
from progress import machine


def step(argv: list, limit: int, log) -> dict:
    """argv in a fresh process, at most limit seconds: its exit status, time and output's tail."""
    t = time.time()
    try:
        p = subprocess.run(argv, cwd=data.REPO, capture_output=True, text=True, timeout=limit)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda v: v if isinstance(v, str) else (v or b"").decode(errors="replace")
        rc, out = "timeout", text(e.stdout) + text(e.stderr)
    log(f"$ {' '.join(argv[1:])}: exit {rc}, {time.time() - t:.0f} s\n{out}")
    return {"command": " ".join(["python"] + argv[1:]), "exit": rc, "seconds": round(time.time() - t, 1),
            "tail": out[-1500:]}


def pytest_counts(tail: str) -> dict:
    """pytest's summary line as {outcome: count}."""
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        check_output_file(a.out, a.overwrite)
        if not torch.cuda.is_available():
            print("bench.gpu_check: torch sees no CUDA device; nothing measured")
            return {}
        logf = open(a.log, "w") if a.log else None
        end = time.time() + a.seconds

        def log(msg):
            print(msg, flush=True)
            if logf:
                logf.write(msg + "\n")
                logf.flush()

        py, skip = sys.executable, set(a.skip.split(","))
        res = {"machine": machine(), "gpus": torch.cuda.device_count(), "steps": {}}
        written = [False]

        def run(argv, limit):
            left = int(end - time.time())
            if left < 10:
                return {"command": " ".join(["python"] + argv[1:]), "exit": "not run: no time left"}
            return step(argv, min(limit, left), log)

        def save():
            write_output_file(a.out, json_text(res), a.overwrite or written[0])
            written[0] = True

        def loaded(path):
            return json.load(open(path)) if os.path.isfile(path) else None

        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
            if "tests" not in skip:
                r = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short", "tests/test_devices.py"],
                        180)
                res["steps"]["device_tests"] = {**r, "counts": pytest_counts(r.get("tail", ""))}
                save()
            if "readme" not in skip:
                pruned, js = os.path.join(work, "moe-pruner-50"), os.path.join(work, "eval.json")
                r = run([py, "prune.py", "--method", "moe-pruner", "--sparsity", "0.5", "--out", pruned,
                         "--device", "cuda"], 90)
                r2 = run([py, "eval_ppl.py", "--model", "models/tiny-mixtral", pruned, "--device", "cuda", "--json", js],
                         90)
                res["steps"]["readme"] = {"prune": r, "eval": r2, "ppl": [m["ppl"] for m in loaded(js) or []]}
                save()
            if "sparse24" not in skip:
                js = os.path.join(work, "sparse24.json")
                r = run([py, "-m", "bench.sparse24_kernels", "--json", js], 120)
                res["steps"]["sparse24"] = {**r, "results": loaded(js)}
                save()
            scale = os.path.join(work, "scale")
            for dtype, methods in (("bfloat16", "moe-pruner,wanda,sparsegpt,magnitude"), ("float32", "moe-pruner")):
                if f"scale-{dtype}" in skip:
                    continue
                js = os.path.join(work, f"scale-{dtype}.json")
                r = run([py, "-m", "bench.scale", "--device", "cuda", "--num-hidden-layers", "1", "--nsamples", "128",
                         "--dtypes", dtype, "--methods", methods, "--batch-size", "8", "--dir", scale, "--keep",
                         "--json", js], 300)
                res["steps"][f"scale_{dtype}"] = {**r, "results": loaded(js)}
                save()
            if "suite" not in skip:
                r = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "--tb=line", "tests", "--ignore",
                         "tests/test_devices.py"],
                        300)
                res["steps"]["suite"] = {**r, "counts": pytest_counts(r.get("tail", ""))}
                save()
        return res


if __name__ == "__main__":
    main()
