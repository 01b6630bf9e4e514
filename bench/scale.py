"""
Mixtral-8x7B at its real width on one CPU machine: what pruning costs, measured, not projected.

One run, side by side:
  1. GEMM peaks in float32 and bfloat16 at an expert's shape ([tokens, 4096] x [4096, 14336], the
     w1/w3 product of the routed tokens of one expert), measured on this machine;
  2. the expert forward (w1, w3, SwiGLU, w2 of one expert on its routed tokens) in both dtypes,
     as achieved GFLOP/s and as a fraction of that dtype's GEMM peak;
  3. a random checkpoint with Mixtral-8x7B-v0.1's exact config.json (hidden 4096, intermediate
     14336, 8 experts top-2, 32 heads / 8 kv heads, vocab 32000) but --num-hidden-layers decoder layers,
     written sharded in the official layout in bfloat16 (about 3.1 GB a layer);
  4. prune.py on it, in a fresh process per run (moe-pruner and sparsegpt, each compute dtype):
     peak RSS (the process's high-water mark, and its resident set sampled every 0.2 s) and the
     time of every phase of every layer from prune_report.json;
  5. the projection to the whole model (32 layers) at the paper's 128 x 2048 calibration tokens,
     with its arithmetic printed: per-layer forward time scales with the calibration tokens,
     scoring does not; memory is one layer plus the activations;
  6. each phase against its bound, the least time this machine's measured rates allow: a forward's
     FLOPs (and SparseGPT's Hessians and solver) at the GEMM rate of step 1, the scoring's bytes
     (read every expert weight, write it pruned) at the memory bandwidth of a 1 GiB copy measured
     in the same run; the projection against the same bounds.

--json is saved after the rates and after each run, so a run stopped by a time limit keeps what it
measured. The checkpoint is deleted at the end (--keep keeps it). Needs ~3.3 GB of disk a layer and says
so in one line when the disk lacks it. Never run in CI: it takes tens of minutes and up to
~20 GB of memory at the default calibration size.

    python -m bench.scale                                   # 2 layers, 16 x 2048 tokens
    python -m bench.scale --num-hidden-layers 1 --nsamples 4 --methods moe-pruner --dtypes float32
    python -m bench.scale --rates-only --repeats 5            # this machine's GEMM rates, a minute
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--num-hidden-layers", "--layers", type=cli.positive_int, default=2,
                   help="decoder layers of the full-width checkpoint" + cli.spelled(("--layers",)))
    p.add_argument("--nsamples", type=cli.positive_int, default=16, help="calibration windows")
    p.add_argument("--seqlen", type=cli.seqlen, default=2048, help="tokens per calibration window (the paper's 2048)")
    p.add_argument("--methods", default="moe-pruner,sparsegpt", help="comma list of prune.py methods")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of compute dtypes")
    p.add_argument("--bf16-tokens", type=cli.positive_int, default=None,
                   help="calibration tokens for the bfloat16 runs when bfloat16 GEMMs are slower than float32 ones "
                        "on this machine (default: as many as fit 1/20 of the float32 runs' work)")
    p.add_argument("--batch-size", type=cli.positive_int, default=4, help="prune.py --batch-size")
    p.add_argument("--repeats", type=cli.positive_int, default=3, help="timed repetitions of each GEMM")
    p.add_argument("--dir", default=None, help="folder for the checkpoint (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint")
    cli.add_json_args(p)
    cli.add_device_arg(p)
    p.add_argument("--rates-only", action="store_true",
                   help="only steps 1-2 and the memory bandwidth: the GEMM, expert and copy rates (seconds, no disk)")
    return p


cli.parse_first(__name__, build_parser)

import numpy as np
import torch
import torch.nn.functional as F

import data
import prune
from checkpoint import CheckpointReader, CheckpointWriter, DTYPES, expected_shapes, load_layer
from outputs import GrowingFile
from layerwise import embed_windows, run_layer, weight_dtype
from mini_mixtral import MixtralConfig
from progress import Laps, machine, process_memory

GiB = 1024**3


def full_width_config(layers: int) -> MixtralConfig:
    """mistralai/Mixtral-8x7B-v0.1's config.json (MixtralConfig's defaults are it) with fewer layers."""
    return MixtralConfig(num_hidden_layers=layers, max_position_embeddings=32768, torch_dtype="bfloat16",
                         extra={"architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2})


def checkpoint_bytes(config: MixtralConfig) -> int:
    return sum(torch.Size(s).numel() for s in expected_shapes(config).values()) * 2  # bfloat16


def write_checkpoint(path: str, config: MixtralConfig, max_shard_bytes: int = 5 * 1024**3):
    """Random weights tensor by tensor (never the whole model in memory), official layout, bfloat16:
    matrices N(0, 0.02^2) as transformers initialises them, norms 1."""
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(path, config, max_shard_bytes=max_shard_bytes) as w:
        for name, shape in expected_shapes(config).items():
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            w.add(name, t.to(torch.bfloat16))
            if name.endswith("experts.7.w2.weight"):
                w.flush()  # one shard per layer, as prune.py writes


def timed(fns: list, repeats: int, device: str = "cpu") -> list:
    """The fastest of repeats runs of each of fns, after one warm-up, the functions taking turns
    so that a load that comes and goes on the machine falls on all of them alike."""
    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)  # the GPU measured
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def gemm_and_expert_rates(routed: int, hidden: int, inter: int, dtype, repeats: int, seconds: float = 2.0,
                          device: str = "cpu") -> dict:
    """GFLOP/s of one [tokens, hidden] x [hidden, inter] GEMM (F.linear, the call prune.py's forward
    makes) and of one SwiGLU expert's forward, at the routed token count, or at as many tokens as
    one GEMM runs in about `seconds` where the dtype is too slow for that (bfloat16 without
    hardware support runs ~100x slower than float32: 8192 tokens would take half an hour)."""
    g = torch.Generator().manual_seed(1)
    w1, w3 = (torch.randn(inter, hidden, generator=g).to(device, dtype) * 0.02 for _ in range(2))
    w2 = torch.randn(hidden, inter, generator=g).to(device, dtype) * 0.02
    probe = torch.randn(64, hidden, generator=g).to(device, dtype)
    probe_s = timed([lambda: F.linear(probe, w1)], 1, device)[0]
    tokens = max(64, min(routed, int(64 * seconds / probe_s) // 64 * 64))
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    gemm, expert = timed([lambda: F.linear(x, w1), lambda: F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)],
                         repeats, device)
    flops_gemm, flops_expert = 2 * tokens * hidden * inter, 3 * 2 * tokens * hidden * inter
    return {"tokens": tokens, "gemm_gflops": flops_gemm / gemm / 1e9, "expert_gflops": flops_expert / expert / 1e9,
            "expert_s": expert}


def child(argv: list):
    """In the fresh process run_prune starts: prune.py with argv, then layer 0 of its output run once
    more on the same calibration windows with nothing measured (the plain forward the layer's wall
    time is compared with), then one JSON line: peak RSS (VmHWM), peak GPU memory, the plain forward."""
    args = prune.main(argv)["args"]
    device = torch.device(args["device"])
    gpu_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    reader = CheckpointReader(argv[argv.index("--out") + 1])
    tokens = torch.from_numpy(np.load(args["calib_tokens"])).long()
    x, pos = embed_windows(reader, tokens, device)
    layer = load_layer(reader, 0, weight_dtype(reader, 0, args["dtype"]), device)  # as prune.py holds it
    laps = Laps()
    run_layer(layer, x, pos, args["batch_size"], dtype=DTYPES[args["dtype"]])
    laps.lap("plain_forward_s")
    print("CHILD " + json.dumps({"peak_rss": process_memory("VmHWM"), "gpu_peak": gpu_peak, **laps.times}))


def run_prune(model: str, out: str, method: str, dtype: str, calib: str, batch_size: int, device: str) -> dict:
    """prune.py in a fresh process (child): its report, peak RSS and peak GPU memory, the sampled
    maximum RSS, and layer 0's plain forward."""
    argv = ["--model", model, "--out", out, "--method", method, "--calib-tokens", calib, "--dtype", dtype,
            "--batch-size", str(batch_size), "--device", device]
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from bench import scale; scale.child(sys.argv[1:])",
                             *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=data.REPO)
    sampled = [0]

    def sample():
        while proc.poll() is None:
            sampled[0] = max(sampled[0], process_memory("VmRSS", proc.pid))
            time.sleep(0.2)
    t = threading.Thread(target=sample)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    if proc.returncode:
        raise SystemExit(f"error: prune.py failed: {stderr.strip().splitlines()[-1] if stderr.strip() else proc.returncode}")
    report = json.load(open(os.path.join(out, "prune_report.json")))
    shutil.rmtree(out)
    measured = json.loads(stdout.split("CHILD ", 1)[1])
    layer0 = report["layers"][0]
    wall = layer0["stats_forward_s"] + layer0["prune_s"] + layer0["next_forward_s"]
    work = layer0["stats_forward_s"] + layer0["prune_s"] + measured["plain_forward_s"]
    return {"report": report, **measured, "sampled_rss": sampled[0], "layer0_wall_s": wall,
            "layer0_work_s": work, "layer0_ratio": wall / work}


def memory_bandwidth(device: str = "cpu", gib: float = 1.0, repeats: int = 3) -> float:
    """GB/s of one copy of a large float32 tensor into another (bytes read + bytes written)."""
    src = torch.ones(int(gib * GiB) // 4, device=device)  # written, so that its pages are real
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / timed([lambda: dst.copy_(src)], repeats, device)[0] / 1e9


def layer_work(config: MixtralConfig, nsamples: int, seqlen: int) -> dict:
    """One decoder layer's arithmetic and bytes on nsamples x seqlen tokens (a multiply-add is 2 FLOPs):
    "attention": q/k/v/o products and the causal score and value products; "experts": top-k experts'
    three products a token; "hessians": SparseGPT's X^T X of every expert input (routed tokens,
    balanced); "solver": SparseGPT on every expert matrix (Cholesky, inverse, Cholesky of the
    inverse: 4/3 in^3; the OBS updates: out x in^2 lazily, out x 128 x in inside the blocks);
    "weight_bytes": reading every expert weight in float32 and writing it pruned."""
    h, i, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    kv = config.num_key_value_heads * config.dim_head
    tokens = nsamples * seqlen
    routed = tokens * k // e  # an expert's share, balanced
    matrices = [(i, h), (i, h), (h, i)]  # (out, in) of w1, w3, w2
    return {"attention": 2 * tokens * h * (2 * h + 2 * kv) + 2 * nsamples * seqlen ** 2 * config.num_attention_heads
            * config.dim_head, "router": 2 * tokens * h * e, "experts": k * tokens * 3 * 2 * h * i,
            "hessians": e * 2 * routed * (h * h + i * i),
            "solver": e * sum(4 / 3 * n_in ** 3 + out * n_in ** 2 + out * 128 * n_in for out, n_in in matrices),
            "weight_bytes": e * 3 * h * i * (4 + 4)}


def phase_bounds(method: str, dtype: str, work: dict, rates: dict, bandwidth: float) -> dict:
    """Each phase's least time on this machine: stats_forward (the layer's forward, and SparseGPT's
    Hessians in float32), prune (scoring at memory bandwidth; SparseGPT's solver at the float32 GEMM
    rate), next_forward (the experts alone: attention and router outputs are kept from the first pass)."""
    rate, rate32 = rates[dtype]["gemm_gflops"] * 1e9, rates["float32"]["gemm_gflops"] * 1e9
    forward = (work["attention"] + work["router"] + work["experts"]) / rate
    sparsegpt = method == "sparsegpt"
    return {"stats_forward_bound_s": forward + (work["hessians"] / rate32 if sparsegpt else 0.0),
            "prune_bound_s": work["solver"] / rate32 if sparsegpt else work["weight_bytes"] / (bandwidth * 1e9),
            "next_forward_bound_s": work["experts"] / rate, "plain_forward_bound_s": forward}


def projection(run: dict, config: MixtralConfig, tokens: int, target_tokens: int = 128 * 2048,
               target_layers: int = 32) -> dict:
    """Whole-model time and memory from the measured per-layer figures (see the module docstring); the
    bound: the forwards' bounds scaled as they are, the scoring's bound, no time for reading and writing."""
    layers = run["report"]["layers"]
    fwd = sum(l["stats_forward_s"] + l["next_forward_s"] for l in layers) / len(layers)
    score = sum(l["prune_s"] + l.get("io_s", 0.0) for l in layers) / len(layers)  # reading and writing: per layer
    scale = target_tokens / tokens
    per_layer = fwd * scale + score
    act = lambda n: 3 * n * config.hidden_size * 4  # x, dense outputs, pruned outputs (float32)
    peak = run["peak_rss"] - act(tokens) + act(target_tokens)
    bound = (run["stats_forward_bound_s"] + run["next_forward_bound_s"]) * scale + run["prune_bound_s"]
    hours = per_layer * target_layers / 3600
    return {"forward_s_per_layer": fwd, "prune_s_per_layer": score, "token_scale": scale,
            "projected_s_per_layer": per_layer, "projected_hours": hours, "projected_peak_gib": peak / GiB,
            "bound_hours": bound * target_layers / 3600, "bound_ratio": hours / (bound * target_layers / 3600)}


def machine_rates(config: MixtralConfig, nsamples: int, seqlen: int, repeats: int, device: str = "cpu") -> dict:
    """Steps 1-2: print and return the GEMM and expert-forward rates of both dtypes."""
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()) + f"; device {device}")
    routed = nsamples * seqlen * config.num_experts_per_tok // config.num_local_experts  # an expert's share, balanced
    rates = {d: gemm_and_expert_rates(routed, config.hidden_size, config.intermediate_size, DTYPES[d], repeats,
                                      device=device) for d in ("float32", "bfloat16")}
    print(f"\none expert at Mixtral-8x7B's shape; {routed} routed tokens at {nsamples} x {seqlen} calibration "
          f"tokens, top-2 of 8 (fewer where a dtype is too slow to time that many); fastest of {repeats} runs:")
    print("| dtype | tokens | GEMM [tokens, 4096] x [4096, 14336] GFLOP/s | expert forward GFLOP/s | fraction of the GEMM peak |")
    print("|---|---|---|---|---|")
    for d, r in rates.items():
        print(f"| {d} | {r['tokens']} | {r['gemm_gflops']:.1f} | {r['expert_gflops']:.1f} | "
              f"{r['expert_gflops'] / r['gemm_gflops']:.2f} |")
    print(f"bfloat16 / float32 GEMM rate: {rates['bfloat16']['gemm_gflops'] / rates['float32']['gemm_gflops']:.2f}x")
    return rates


def machine_bandwidth(device: str = "cpu", repeats: int = 3) -> float:
    """Step 6's memory bandwidth, printed and returned (GB/s)."""
    gbps = memory_bandwidth(device, repeats=repeats)
    print(f"memory bandwidth: {gbps:.1f} GB/s (a 1 GiB float32 copy, bytes read + bytes written, fastest of {repeats})")
    return gbps


def bench(layers: int, nsamples: int, seqlen: int, methods: list, dtypes: list, bf16_tokens: int = None,
          batch_size: int = 4, repeats: int = 3, folder: str = None, keep: bool = False, json_path: str = None,
          device: str = "cpu", overwrite: bool = False) -> dict:
    out = GrowingFile(json_path, overwrite) if json_path else None  # checked before any work, saved after each run
    config = full_width_config(layers)
    need = checkpoint_bytes(config) * 1.1
    work = folder or tempfile.mkdtemp(prefix="bench-scale-")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"bench.scale: {free / GiB:.1f} GiB free in {work}, {need / GiB:.1f} GiB needed; nothing measured")
        return {}
    threads = torch.get_num_threads()
    tokens = nsamples * seqlen
    rates = machine_rates(config, nsamples, seqlen, repeats, device)
    bandwidth = machine_bandwidth(device, repeats)
    ratio = rates["bfloat16"]["gemm_gflops"] / rates["float32"]["gemm_gflops"]

    model = os.path.join(work, "mixtral-8x7b-width")
    t0 = time.time()
    if not os.path.isdir(model):
        write_checkpoint(model, config)
    size = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model))
    print(f"\ncheckpoint: {layers} layers at full width, {size / GiB:.2f} GiB in bfloat16, "
          f"{len([f for f in os.listdir(model) if f.endswith('.safetensors')])} shards ({time.time() - t0:.0f} s)")

    results = {"rates": rates, "memory_gbps": bandwidth, "runs": {}, "device": device, "machine": machine(),
               "layers": layers, "checkpoint_gib": size / GiB, "threads": threads}
    save = out.save if out else (lambda results: None)
    save(results)
    rng = np.random.default_rng(0)
    try:
        for dtype in dtypes:
            n_tokens = tokens
            if dtype == "bfloat16" and ratio < 1:
                n_tokens = bf16_tokens or min(tokens, max(64, int(tokens * ratio * 20) // 64 * 64))
            shape = (nsamples, seqlen) if n_tokens == tokens else (1, min(n_tokens, seqlen))
            calib = os.path.join(work, f"calib-{shape[0]}x{shape[1]}.npy")
            np.save(calib, rng.integers(0, config.vocab_size, size=shape))
            for method in methods:
                print(f"\nprune.py --method {method} --dtype {dtype}, {shape[0]} x {shape[1]} calibration tokens ...",
                      flush=True)
                run = run_prune(model, os.path.join(work, "out"), method, dtype, calib, batch_size, device)
                run["report"] = {k: run["report"][k] for k in ("method", "layers", "seconds", "expert_sparsity")}
                run["tokens"] = shape[0] * shape[1]
                run.update(phase_bounds(method, dtype, layer_work(config, shape[0], shape[1]), rates, bandwidth))
                run["projection"] = projection(run, config, run["tokens"])
                run["dtype"] = dtype
                results["runs"][f"{method}/{dtype}"] = run
                save(results)
                report(method, dtype, run, config)
    finally:
        if not keep:
            shutil.rmtree(model, ignore_errors=True)
            if not folder:
                shutil.rmtree(work, ignore_errors=True)
    return results


def report(method: str, dtype: str, run: dict, config: MixtralConfig):
    rep, proj = run["report"], run["projection"]
    print(f"peak RSS {run['peak_rss'] / GiB:.2f} GiB (sampled {run['sampled_rss'] / GiB:.2f} GiB)"
          + (f", peak GPU memory {run['gpu_peak'] / GiB:.2f} GiB" if run["gpu_peak"] else "")
          + f", {rep['seconds']:.0f} s in all")
    print("| layer | stats forward s | prune s | next forward s |\n|---|---|---|---|")
    for l in rep["layers"]:
        print(f"| {l['layer']} | {l['stats_forward_s']:.1f} | {l['prune_s']:.1f} | {l['next_forward_s']:.1f} |")
    print(f"layer 0: {run['layer0_wall_s']:.1f} s (statistics forward, scoring, next forward with the per-matrix "
          f"errors) / {run['layer0_work_s']:.1f} s (the same statistics forward and scoring + a next forward that "
          f"measures nothing, {run['plain_forward_s']:.1f} s) = {run['layer0_ratio']:.3f}")
    print(f"projection to {32} layers and 128 x 2048 calibration tokens: ({proj['forward_s_per_layer']:.1f} s of "
          f"forward x {proj['token_scale']:.1f} + {proj['prune_s_per_layer']:.1f} s of pruning, reading and writing) "
          f"per layer x 32 = "
          f"{proj['projected_hours']:.1f} h; peak {run['peak_rss'] / GiB:.1f} GiB - activations of "
          f"{run['tokens']} tokens + those of 262144 = {proj['projected_peak_gib']:.1f} GiB")
    l0 = rep["layers"][0]
    print("layer 0 against its bounds (FLOPs at this run's GEMM rates, bytes at its memory bandwidth):")
    print("| phase | s | bound s | ratio |\n|---|---|---|---|")
    for phase in ("stats_forward", "prune", "next_forward"):
        print(f"| {phase} | {l0[phase + '_s']:.1f} | {run[phase + '_bound_s']:.1f} | "
              f"{l0[phase + '_s'] / run[phase + '_bound_s']:.2f} |")
    print(f"| plain forward | {run['plain_forward_s']:.1f} | {run['plain_forward_bound_s']:.1f} | "
          f"{run['plain_forward_s'] / run['plain_forward_bound_s']:.2f} |")
    print(f"projection against the same bounds: {proj['projected_hours']:.1f} h / {proj['bound_hours']:.1f} h = "
          f"{proj['bound_ratio']:.2f}")


def markdown(results: dict) -> str:
    """The tables docs/benchmarks.md quotes from a --json file: the machine, one row per run, and each
    run's layer 0 against its bounds."""
    m = results["machine"]
    where = m.get("gpu") if results["device"].startswith("cuda") else f"{m['cpu']}, {m['cores']} cores"
    n, rates = results["layers"], results["rates"]
    lines = [f"{where}; torch {m['torch']}; {n} full-width decoder layer{'s' if n > 1 else ''} "
             f"({results['checkpoint_gib']:.2f} GiB in bfloat16), `--device {results['device']}`; one expert's "
             f"[tokens, 4096] x [4096, 14336] GEMM at " + ", ".join(f"{r['gemm_gflops']:.0f} GFLOP/s in {d}"
                                                                    for d, r in rates.items())
             + (f"; memory {results['memory_gbps']:.1f} GB/s" if "memory_gbps" in results else ""), "",
             "| method | dtype | calibration tokens | stats forward s | prune s | next forward s | next forward "
             "measuring nothing s | layer 0 / its work | peak RSS GiB | peak GPU memory GiB | whole model, 128 x 2048 "
             "tokens, h |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in results["runs"].values():
        l0 = run["report"]["layers"][0]
        lines.append(f"| {run['report']['method']} | {run['dtype']} | {run['tokens']} | {l0['stats_forward_s']:.1f} | "
                     f"{l0['prune_s']:.1f} | {l0['next_forward_s']:.1f} | {run['plain_forward_s']:.1f} | "
                     f"{run['layer0_ratio']:.3f} | {run['peak_rss'] / GiB:.2f} | "
                     f"{run['gpu_peak'] / GiB:.2f} | {run['projection']['projected_hours']:.2f} |")
    bounded = [run for run in results["runs"].values() if "prune_bound_s" in run]
    if bounded:
        lines += ["", "| method | dtype | stats forward / bound | prune / bound | next forward / bound | measuring "
                      "nothing / bound | whole model h / bound h |", "|---|---|---|---|---|---|---|"]
        for run in bounded:
            l0, proj = run["report"]["layers"][0], run["projection"]
            ratio = lambda phase: f"{l0[phase + '_s']:.1f} / {run[phase + '_bound_s']:.1f} s = " \
                                  f"{l0[phase + '_s'] / run[phase + '_bound_s']:.2f}"
            lines.append(f"| {run['report']['method']} | {run['dtype']} | {ratio('stats_forward')} | {ratio('prune')} | "
                         f"{ratio('next_forward')} | {run['plain_forward_s']:.1f} / {run['plain_forward_bound_s']:.1f} s "
                         f"= {run['plain_forward_s'] / run['plain_forward_bound_s']:.2f} | {proj['projected_hours']:.2f} / "
                         f"{proj['bound_hours']:.2f} = {proj['bound_ratio']:.2f} |")
    return "\n".join(lines)


def facts(results: dict) -> dict:
    """The numbers of a --json file that documents quote: "machine", and per run ("moe-pruner/float32")
    its layer 0's phases, ratio, memory and projection, and each phase against its bound."""
    m = results["machine"]
    out = {"machine": m.get("gpu") if results["device"].startswith("cuda") else
           f"{m['cores']}-core {m['cpu']}, {results['threads']} threads, torch {m['torch']}",
           "checkpoint-gib": f"{results['checkpoint_gib']:.2f}"}
    rates = {d: r["gemm_gflops"] for d, r in results["rates"].items()}
    out.update({f"gemm:{d}": f"{v:.0f}" for d, v in rates.items()})
    if "memory_gbps" in results:
        out["memory-gbps"] = f"{results['memory_gbps']:.0f}"
    if {"float32", "bfloat16"} <= set(rates):
        out["bfloat16-speed"] = f"{rates['bfloat16'] / rates['float32']:.1f}"
    for key, run in results["runs"].items():
        l0 = run["report"]["layers"][0]
        out.update({f"{key}:tokens": f"{run['tokens']:,}", f"{key}:stats-s": f"{l0['stats_forward_s']:.0f}",
                    f"{key}:prune-s": f"{l0['prune_s']:.0f}", f"{key}:next-s": f"{l0['next_forward_s']:.0f}",
                    f"{key}:plain-s": f"{run['plain_forward_s']:.0f}", f"{key}:ratio": f"{run['layer0_ratio']:.2f}",
                    f"{key}:peak-gib": f"{run['peak_rss'] / GiB:.1f}", f"{key}:gpu-gib": f"{run['gpu_peak'] / GiB:.1f}",
                    f"{key}:hours": f"{run['projection']['projected_hours']:.0f}",
                    f"{key}:projected-gib": f"{run['projection']['projected_peak_gib']:.0f}"})
        if "prune_bound_s" in run:
            for phase, name in (("stats_forward", "stats"), ("prune", "prune"), ("next_forward", "next"),
                                ("plain_forward", "plain")):
                seconds = l0[phase + "_s"] if phase != "plain_forward" else run["plain_forward_s"]
                out[f"{key}:{name}-bound-s"] = f"{run[phase + '_bound_s']:.1f}"
                out[f"{key}:{name}-bound-ratio"] = f"{seconds / run[phase + '_bound_s']:.2f}"
            out[f"{key}:bound-hours"] = f"{run['projection']['bound_hours']:.1f}"
            out[f"{key}:bound-ratio"] = f"{run['projection']['bound_ratio']:.2f}"
    return out


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        if a.rates_only:
            rates = machine_rates(full_width_config(a.num_hidden_layers), a.nsamples, a.seqlen, a.repeats, a.device)
            return {**rates, "memory_gbps": machine_bandwidth(a.device, a.repeats)}
        return bench(a.num_hidden_layers, a.nsamples, a.seqlen, a.methods.split(","), a.dtypes.split(","), a.bf16_tokens,
                     a.batch_size, a.repeats, a.dir, a.keep, a.json, a.device, a.overwrite)


if __name__ == "__main__":
    main()
