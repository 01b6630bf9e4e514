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
   model at prune.py's default settings, from prune_report.json (target <= 0.1).

    python -m bench.prune_memory                  # ~3 minutes on 2 cores
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import cli
import data
import mini_mixtral as mm
import prune
from checkpoint import CheckpointWriter, expected_shapes, layer_shapes

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
    # VmHWM, the high-water mark of this process's own address space; ru_maxrss would include the
    # parent's peak, which Linux carries across fork and exec.
    code = ("import re, sys, prune; prune.main(sys.argv[1:]); "
            "print('PEAK', int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024)")
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


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--hidden-size", "--hidden", type=cli.positive_int, default=1024,
                   help="width of the random models" + cli.spelled(("--hidden",)))
    p.add_argument("--intermediate-size", "--intermediate", type=cli.positive_int, default=2048,
                   help="expert width of the random models" + cli.spelled(("--intermediate",)))
    p.add_argument("--nsamples", type=cli.positive_int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=cli.seqlen, default=256, help="tokens per calibration window")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        peaks = {}
        for layers in (2, 8):
            path = os.path.join(d, f"m{layers}")
            cfg = make_checkpoint(path, layers, args.hidden_size, args.intermediate_size)
            np.save(os.path.join(path, "calib.npy"),
                    np.random.default_rng(0).integers(0, 4096, size=(args.nsamples, args.seqlen)))
            peaks[layers], report = run_prune(path, os.path.join(d, f"o{layers}"), "moe-pruner")
        layer_bytes = sum(torch.Size(s).numel() for s in layer_shapes(cfg, 0).values()) * 4
        print(f"peak RSS of prune.py --method moe-pruner, {args.nsamples} x {args.seqlen} calibration tokens, "
              f"hidden {args.hidden_size}, 8 experts x {args.intermediate_size} (one layer = {layer_bytes / GiB:.2f} GiB "
              f"in float32):")
        print("| layers | checkpoint (bf16) | peak RSS |\n|---|---|---|")
        for layers, peak in peaks.items():
            size = sum(os.path.getsize(os.path.join(d, f"m{layers}", f)) for f in os.listdir(os.path.join(d, f"m{layers}")))
            print(f"| {layers} | {size / GiB:.2f} GiB | {peak / GiB:.2f} GiB |")
        print(f"ratio 8-layer / 2-layer: {peaks[8] / peaks[2]:.3f} (target <= 1.15)\n")

        act = 2 * args.nsamples * args.seqlen * args.hidden_size * 4
        overhead = peaks[2] - layer_bytes - act
        rows = mixtral_projection()
        print("projected peak for Mixtral-8x7B, 128 x 2048 calibration tokens (moe-pruner):")
        print("| term | GiB |\n|---|---|")
        print(f"| measured overhead (interpreter, torch, buffers) | {overhead / GiB:.2f} |")
        for k, v in rows.items():
            print(f"| {k} | {v / GiB:.2f} |")
        fixed = overhead + rows["one decoder layer (float32)"] + rows["one batch's temporaries"]
        print(f"| **total, float32 activations** | **{(fixed + rows['activations in + out, float32']) / GiB:.1f}** |")
        print(f"| **total, --act-dtype bfloat16** | **{(fixed + rows['activations in + out, bfloat16']) / GiB:.1f}** |")
        print("(sparsegpt adds its Hessians: 8 experts x (4096^2 + 14336^2) float32 = 6.6 GiB)\n")

        try:
            model = data.default_model_dir()
        except data.DataError as e:
            print(f"no embedded model for the time ratio: {e}")
            return
        print(f"scoring + masking time / calibration forward time, {model}, prune.py defaults:")
        print("| method | calibration tokens | stats forward s | prune s | ratio |\n|---|---|---|---|---|")
        for method in ("moe-pruner", "wanda", "magnitude", "sparsegpt"):
            out = os.path.join(d, f"t-{method}")
            prune.main(["--model", model, "--method", method, "--out", out])
            rep = json.load(open(os.path.join(out, "prune_report.json")))
            fwd = sum(l["stats_forward_s"] for l in rep["layers"])
            pr = sum(l["prune_s"] for l in rep["layers"])
            print(f"| {method} | {rep['calibration']['tokens']} | {fwd:.2f} | {pr:.2f} | {pr / fwd:.3f} |")

if __name__ == "__main__":
    main()
