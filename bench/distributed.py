"""
torchrun against one process, and the memory plan of Mixtral-8x7B distillation (docs/distributed.md).

1. On the embedded model, one thread per process: prune.py (moe-pruner, 50%, 32 calibration
   windows) and distill.py (full mode, 64 windows, one epoch) in one process and under
   `torchrun --nproc_per_node 2` (gloo), with their wall times and how far the outputs agree
   (expert weights that differ after pruning; after distillation the largest weight difference,
   the per-step cross-entropy and lambda).
2. The sharded state of full-parameter distillation of Mixtral-8x7B at the paper's settings
   (float32 master weights, gradients and AdamW's two moments, the float32 teacher alongside,
   one bool mask per expert weight), from the checkpoint's shapes alone, and what it leaves per
   GPU for 8 and 16 GPUs.

    python -m bench.distributed --json results/bench/distributed.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    cli.add_json_args(p)
    return p


cli.parse_first(__name__, build_parser)

import torch

import checkpoint
import data
import mini_mixtral as mm
from progress import machine

GB = 1e9  # decimal gigabytes, as GPU memory is sold
GPU_BYTES = 80e9  # an H100's memory, the paper's GPU (16 of them)
# Mixtral-8x7B's shapes (its config.json): the plan needs nothing else
MIXTRAL_8X7B = mm.MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                                rope_theta=1e6, num_local_experts=8, num_experts_per_tok=2)
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the single run gets the same


def memory_plan(config: mm.MixtralConfig) -> dict:
    """Bytes of each part of the sharded state of full-parameter KD (Eq. 10) with AdamW."""
    shapes = checkpoint.expected_shapes(config)
    params = sum(torch.Size(s).numel() for s in shapes.values())
    expert = sum(torch.Size(s).numel() for n, s in shapes.items() if ".experts." in n)
    parts = [("student weights (float32 master copy)", params, 4), ("student gradients (float32)", params, 4),
             ("AdamW's two moments (float32)", params, 8), ("teacher weights (float32; bfloat16 would halve it)", params, 4),
             ("masks of the pruned expert weights (bool)", expert, 1)]
    layer = sum(torch.Size(s).numel() for n, s in shapes.items() if n.startswith("model.layers.0."))
    sharded = sum(n * b for _, n, b in parts)
    return {"params": params, "expert_params": expert, "layer_params": layer,
            "parts": [{"what": w, "count": n, "bytes_per": b, "bytes": n * b} for w, n, b in parts],
            "sharded_bytes": sharded, "per_gpu_bytes": {g: sharded / g for g in (8, 16)},
            "left_per_gpu_bytes": {g: GPU_BYTES - sharded / g for g in (8, 16)}}


def timed(cmd: list) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cli.REPO, env=ONE_THREAD)
    if r.returncode != 0:
        raise data.DataError(f"{' '.join(cmd[1:4])}... failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.time() - t0


def one_and_two(script: str, argv: list, work: str) -> dict:
    """script run in one process and under torchrun with 2, each writing its own --out."""
    one, two = os.path.join(work, "one-" + script[:-3]), os.path.join(work, "two-" + script[:-3])
    path = os.path.join(cli.REPO, script)
    return {"one": timed([sys.executable, path, *argv, "--out", one]),
            "two": timed([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          path, *argv, "--out", two]), "dirs": (one, two)}


def agreement(one: str, two: str) -> dict:
    a, b = (dict(checkpoint.load_model(d).named_parameters()) for d in (one, two))
    return {"expert_weights_differ": sum(int((a[k] != b[k]).sum()) for k in a if ".experts." in k),
            "zero_patterns_differ": sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a if ".experts." in k),
            "max_abs_difference": max((a[k] - b[k]).abs().max().item() for k in a)}


def measure() -> dict:
    with tempfile.TemporaryDirectory() as work:
        pruned = one_and_two("prune.py", ["--method", "moe-pruner", "--sparsity", "0.5", "--nsamples", "32"], work)
        kd = one_and_two("distill.py", ["--student", pruned["dirs"][0], "--nsamples", "64", "--epochs", "1"], work)
        reports = [json.load(open(os.path.join(d, "distill_report.json"))) for d in kd["dirs"]]
        steps = list(zip(reports[0]["steps"], reports[1]["steps"]))
        runs = {"prune": {"seconds_one": pruned["one"], "seconds_two": pruned["two"], **agreement(*pruned["dirs"])},
                "distill": {"seconds_one": kd["one"], "seconds_two": kd["two"], **agreement(*kd["dirs"]),
                            "lambda_one": reports[0]["lambda"], "lambda_two": reports[1]["lambda"],
                            "max_ce_relative_difference": max(abs(x["ce"] - y["ce"]) / abs(x["ce"]) for x, y in steps)}}
    return {"machine": machine(), "runs": runs, "mixtral_8x7b": memory_plan(MIXTRAL_8X7B)}


def markdown(res: dict) -> str:
    """The memory plan as docs/distributed.md's table."""
    plan = res["mixtral_8x7b"]
    rows = [f"| {p['what']} | {p['bytes_per']} | {p['count'] / 1e9:.1f}B | {p['bytes'] / GB:.0f} GB |" for p in plan["parts"]]
    return "\n".join(["| what (each sharded over the GPUs) | bytes per parameter | parameters | total |",
                      "|---|---|---|---|", *rows, f"| **sharded state in all** | | | **{plan['sharded_bytes'] / GB:.0f} GB** |"])


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors():
        cli.measure_and_save(measure, lambda res: markdown(res) + "\n\n" + json.dumps(res["runs"], indent=1),
                             args.json, args.overwrite)


if __name__ == "__main__":
    main()
