"""
Memory and time of prune.py: does it really hold one decoder layer at a time, and is scoring
cheap next to the calibration forward?

1. Peak RSS of prune.py on a 2-layer and an 8-layer random Mixtral of the same width (each
   layer ~200 MB in float32, so holding the whole 8-layer model would add >1 GB), each in a
   fresh process, printed side by side with their ratio (target <= 1.15).
2. The projected peak for Mixtral-8x7B at 128 x 2048 calibration tokens: the measured
   overhead of the run above plus one Mixtral layer in float32, the calibration activations
   (inputs and outputs of a layer) and one batch's temporaries.
3. Scoring and masking time against the calibration forward, per method, on the embedded
   model at prune.py's default settings, from prune_report.json.

    python -m bench.prune_memory --json results/bench/prune-memory.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--hidden-size", "--hidden", type=cli.positive_int, default=1024,
                   help="width of the random models" + cli.spelled(("--hidden",)))
    p.add_argument("--intermediate-size", "--intermediate", type=cli.positive_int, default=2048,
                   help="expert width of the random models" + cli.spelled(("--intermediate",)))
    p.add_argument("--nsamples", type=cli.positive_int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=cli.seqlen, default=256, help="tokens per calibration window")
    cli.add_json_args(p)
    return p


cli.parse_first(__name__, build_parser)

import numpy as np
import torch

import data
import mini_mixtral as mm
import prune
from checkpoint import CheckpointWriter, expected_shapes, layer_shapes
from progress import machine

GiB = 1024**3


def make_checkpoint(path, layers, hidden, intermediate):
    cfg = mm.MixtralConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                           max_position_embeddings=4096, rope_theta=1e4, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(path, cfg, max_shard_bytes=512 * 1024**2) as w:
        for name, shape in expected_shapes(cfg).items():  # written tensor by tensor: never the whole model
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            w.add(name, t.to(torch.bfloat16))
    return cfg


def run_prune(model, out, method, extra=()):
    """prune.py in a fresh process; returns its peak RSS in bytes and its report."""
    code = "import sys, prune, progress; prune.main(sys.argv[1:]); print('PEAK', progress.process_memory('VmHWM'))"
    argv = ["--model", model, "--out", out, "--method", method, "--calib-tokens", os.path.join(model, "calib.npy"),
            *extra]  # the token file fixes the windows: nsamples x seqlen
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=data.REPO)
    if r.returncode:
        raise SystemExit(r.stderr)
    peak = int(r.stdout.split("PEAK")[1])
    return peak, json.load(open(os.path.join(out, "prune_report.json")))


def mixtral_projection():
    """Peak bytes for Mixtral-8x7B, 128 x 2048 calibration tokens, moe-pruner, float32 compute."""
    c = mm.MixtralConfig()  # Mixtral-8x7B-v0.1 defaults
    layer = sum(torch.Size(s).numel() for s in layer_shapes(c, 0).values()) * 4  # float32 compute copy
    tokens = 128 * 2048
    rows = {"one decoder layer (float32)": layer}
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        rows[f"activations in + out, {dtype}"] = 2 * tokens * c.hidden_size * size
    batch = 8 * 2048  # --batch-size 8 windows: expert inputs, hidden states, outputs of one batch
    rows["one batch's temporaries"] = batch * c.num_experts_per_tok * (2 * c.hidden_size + 3 * c.intermediate_size) * 4
    return rows


def measure(hidden_size: int, intermediate_size: int, nsamples: int, seqlen: int) -> dict:
    """Steps 1-3: every figure markdown() prints."""
    res = {"machine": machine(), "hidden_size": hidden_size, "intermediate_size": intermediate_size,
           "nsamples": nsamples, "seqlen": seqlen, "peak_rss": {}, "checkpoint_bytes": {}, "times": []}
    with tempfile.TemporaryDirectory() as d:
        for layers in (2, 8):
            path = os.path.join(d, f"m{layers}")
            cfg = make_checkpoint(path, layers, hidden_size, intermediate_size)
            np.save(os.path.join(path, "calib.npy"), np.random.default_rng(0).integers(0, 4096, size=(nsamples, seqlen)))
            res["peak_rss"][str(layers)], _ = run_prune(path, os.path.join(d, f"o{layers}"), "moe-pruner")
            res["checkpoint_bytes"][str(layers)] = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        res["layer_bytes"] = sum(torch.Size(s).numel() for s in layer_shapes(cfg, 0).values()) * 4
        act = 2 * nsamples * seqlen * hidden_size * 4
        res["overhead_bytes"] = res["peak_rss"]["2"] - res["layer_bytes"] - act
        res["projection"] = mixtral_projection()
        model = data.default_model_dir()
        for method in ("moe-pruner", "wanda", "magnitude", "sparsegpt"):
            out = os.path.join(d, f"t-{method}")
            rep = prune.main(["--model", model, "--method", method, "--out", out])
            res["times"].append({"method": method, "tokens": rep["calibration"]["tokens"],
                                 "stats_forward_s": sum(l["stats_forward_s"] for l in rep["layers"]),
                                 "prune_s": sum(l["prune_s"] for l in rep["layers"])})
        res["model"] = data.shown_path(model)
    return res


def markdown(res: dict) -> str:
    """measure()'s figures as the three tables docs/benchmarks.md quotes."""
    m = res["machine"]
    peaks, sizes = res["peak_rss"], res["checkpoint_bytes"]
    out = [f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}", "",
           f"peak RSS of prune.py --method moe-pruner, {res['nsamples']} x {res['seqlen']} calibration tokens, hidden "
           f"{res['hidden_size']}, 8 experts x {res['intermediate_size']} (one layer = {res['layer_bytes'] / GiB:.2f} "
           f"GiB in float32):", "", "| layers | checkpoint (bf16) | peak RSS |", "|---|---|---|"]
    out += [f"| {n} | {sizes[n] / GiB:.2f} GiB | {peaks[n] / GiB:.2f} GiB |" for n in peaks]
    out += ["", f"ratio 8-layer / 2-layer: {peaks['8'] / peaks['2']:.3f}", "",
            "projected peak for Mixtral-8x7B, 128 x 2048 calibration tokens (moe-pruner), from the overhead measured "
            "above:", "", "| term | GiB |", "|---|---|",
            f"| measured overhead (interpreter, torch, buffers) | {res['overhead_bytes'] / GiB:.2f} |"]
    rows = res["projection"]
    out += [f"| {k} | {v / GiB:.2f} |" for k, v in rows.items()]
    fixed = res["overhead_bytes"] + rows["one decoder layer (float32)"] + rows["one batch's temporaries"]
    out += [f"| **total, float32 activations** | **{(fixed + rows['activations in + out, float32']) / GiB:.1f}** |",
            f"| **total, --act-dtype bfloat16** | **{(fixed + rows['activations in + out, bfloat16']) / GiB:.1f}** |",
            "", f"scoring + masking time / calibration forward time, {res['model']}, prune.py defaults:", "",
            "| method | calibration tokens | stats forward s | prune s | ratio |", "|---|---|---|---|---|"]
    out += [f"| {t['method']} | {t['tokens']} | {t['stats_forward_s']:.2f} | {t['prune_s']:.2f} | "
            f"{t['prune_s'] / t['stats_forward_s']:.3f} |" for t in res["times"]]
    return "\n".join(out)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors():
        return cli.measure_and_save(lambda: measure(args.hidden_size, args.intermediate_size, args.nsamples, args.seqlen),
                                    markdown, args.json, args.overwrite)


if __name__ == "__main__":
    main()
