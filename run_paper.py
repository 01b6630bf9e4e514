"""
The paper's experiments, in shape, on the embedded model (or any checkpoint): one command.

Parts (--parts, a comma list; the default is the first three; the minutes of every part are
printed and recorded in results.json and the results README, with the machine they ran on):
  - table:       MoE-Pruner's Table 2: dense; magnitude, wanda, sparsegpt, moe-pruner at 50%, 2:4, 4:8
  - sparsity:    its Figure 5, perplexity against sparsity (--sweep; default 30%, 50%, 70%, 80%)
  - calibration: its Figure 4, perplexity against calibration samples at 50% (--calib-sweep; 2, 8, 32, 128)
  - anatomy:     what the router's hint is worth: at 50%, 2:4 and 70%, magnitude,
                 a router-blind Wanda (statistics over all tokens), Wanda (over each expert's routed
                 tokens) and MoE-Pruner (routed tokens weighted by their gates), each as mean +- sd
                 over --draws calibration draws with the paired MoE-Pruner - Wanda difference
                 (SparseGPT on one draw for reference); each method at the scopes experts,
                 +attention, +attention+router; and per layer the gate statistics that decide how
                 much the gate can change a per-row mask (see gate_anatomy)
  - experts:     expert-level baselines against MoE-Pruner: NAEE expert pruning (r = n-2, n/2) and
                 dynamic skipping, REAP, CD-MoE condensing
  - owl:         OWL's non-uniform layer sparsity against uniform, Wanda and MoE-Pruner at 50% and 70%
  - distill:     expert-wise distillation of MoE-Pruner and Wanda at 50% and 2:4 (Eq. 10, full mode;
                 per-expert mode for MoE-Pruner) and its ablation (CE only, expert MSE only)
  - dtype:       MoE-Pruner 50% with the layer forward in float32 and in bfloat16: masks and perplexity
  - rounding:    SparseGPT at 50%, 2:4 and 4:8 with the next layer fed its updated weights in float32 and
                 rounded to the checkpoint's dtype (--round-updates, as the reference computes)

Every method sees the same calibration windows (drawn once and saved as calibration_tokens.npy, or
read from --calib-tokens: results.json names the file and its SHA-256; the calibration sweep uses
their first n rows; anatomy's draw d is drawn with seed d) and every model the same evaluation
windows: on the embedded corpus 128 spread evenly over the eval split (data.sample_windows;
--eval-windows), on any other text all of them. Results go to --out as results.json and README.md
(the tables and plots; matplotlib is optional). Pruned checkpoints are deleted after evaluation
unless --keep.

    python run_paper.py --overwrite                                     # table, sweeps
    python run_paper.py --parts anatomy --out results/anatomy --overwrite
    python run_paper.py --model Mixtral-8x7B-v0.1 --calib-data c4-train.00000-of-01024.json.gz \\
        --eval-data wikitext-2-raw --seqlen 2048 --nsamples 128 --eval-windows 0 --device cuda
"""

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


PARTS = ("table", "sparsity", "calibration", "anatomy", "experts", "owl", "distill", "dtype", "rounding")


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="checkpoint directory; default: the embedded tiny Mixtral")
    p.add_argument("--out", default="results", help="folder for results.json, README.md (the tables) and the plots")
    p.add_argument("--parts", default="table,sparsity,calibration",
                   help=f"comma list of parts to run, from {', '.join(PARTS)} (default: table,sparsity,calibration)")
    p.add_argument("--only", choices=PARTS, help="run this one part (the same as --parts PART)")
    p.add_argument("--calib-data", default="stdlib", help="calibration text (as prune.py --calib-data)")
    p.add_argument("--calib-tokens", help="the calibration windows, an int .npy [nsamples, seqlen] (as prune.py's), "
                   "e.g. results/calibration_tokens.npy: --out holds no copy; anatomy's other draws use --calib-data")
    p.add_argument("--eval-data", default="stdlib", help="evaluation text (as eval_ppl.py --eval-data)")
    p.add_argument("--nsamples", type=cli.positive_int, default=128, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=cli.seqlen, default=None,
                   help="calibration and evaluation window length (default: 2048 capped at max_position_embeddings)")
    cli.add_eval_windows_arg(p)
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the calibration windows")
    p.add_argument("--sweep", type=cli.comma_list(cli.sparsity), default="0.3,0.5,0.7,0.8",
                   help="sparsities of the Figure 5 sweep (finer: 0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8, about twice as long)")
    p.add_argument("--calib-sweep", type=cli.comma_list(cli.positive_int), default="2,8,32,128",
                   help="calibration sample counts of Figure 4 (finer: 2,4,8,16,32,64,128)")
    p.add_argument("--draws", type=cli.positive_int, default=5, help="anatomy: calibration draws per method")
    cli.add_device_arg(p)
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints (under --out/checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("--replot", action="store_true",
                   help="run nothing: rewrite --out's README.md and plots from its results.json (e.g. after "
                        "installing matplotlib)")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="run nothing: print the tables of these --out folders side by side (e.g. one model's "
                        "results next to another's), from their results.json")
    p.add_argument("--docs", action="store_true",
                   help="run nothing: copy the tables and numbers of results/ anew into README.md and docs/*.md "
                        "(where their <!-- table --> and <!-- value --> markers say)")
    return p


cli.parse_first(__name__, build_parser)

import numpy as np
import torch

import anatomy
import data
import distill
import eval_ppl
import expert_prune
import mini_mixtral as mm
import prune
import report
import variants
from checkpoint import CheckpointReader, read_config
from outputs import check_not_input, check_output_file, json_text, staged_folder, write_output_file
from progress import log, machine
from report import CALIB_METHODS, METHODS

# What a run writes into --out (the plots only with matplotlib).
OUTPUT_FILES = ("results.json", "README.md", prune.CALIBRATION_FILE, "sparsity_sweep.png", "calibration_sweep.png",
                "anatomy.png", "expert_level.png")


@dataclass
class Setup:
    """What every part shares: the model, its calibration and evaluation windows, a work folder."""

    model: str
    config: mm.MixtralConfig
    calib: np.ndarray  # [nsamples, seqlen] the calibration windows of every method
    calib_file: str
    ids: np.ndarray  # the calibration split's tokens, for anatomy's other draws
    windows: torch.Tensor  # [n, seqlen] the evaluation windows of every model
    all_windows: torch.Tensor  # [N, seqlen] every window of the evaluation text, or None when windows are all
    work: str
    device: str
    keep: bool
    done: dict = None  # {prune arguments: row}: a run several parts need is run once


def perplexities(s: Setup, path: str, whole: bool = False) -> list:
    """Perplexity of a checkpoint on the evaluation sample and, with whole (when the sample is fewer
    than every window), on every window of the evaluation text: one load for both."""
    model = variants.load_model(path, torch.float32, s.device)
    sets = [s.windows] + ([s.all_windows] if whole and s.all_windows is not None else [])
    return [eval_ppl.perplexity(model, w, 8, s.device) for w in sets]


def calib_file(s: Setup, tokens: np.ndarray, name: str) -> str:
    fn = os.path.join(s.work, f"calib-{name}.npy")
    np.save(fn, tokens)
    return fn


def pruned(s: Setup, name: str, args: prune.PruneArgs, whole: bool = False) -> dict:
    """Prune with args into the work folder, evaluate (with whole, also on every window of the
    evaluation text when the sample is fewer), delete (unless --keep); the row of a table."""
    key = repr(args)
    if s.done is not None and key in s.done and not s.keep:
        return dict(s.done[key])
    out = os.path.join(s.work, name)
    t0 = time.time()
    rep = prune.prune_checkpoint(s.model, out, args, overwrite=True, log=lambda m: None)
    seconds = time.time() - t0
    ppl, *ppl_all = perplexities(s, out, whole)
    row = {"method": args.method, "sparsity": args.sparsity, "nm": args.nm, "ppl": ppl,
           "nsamples": rep["calibration"]["nsamples"], "prune_seconds": seconds,
           "expert_sparsity": rep["expert_sparsity"], "overall_sparsity": rep["overall_sparsity"],
           "mean_matrix_error": rep["mean_matrix_error"]}
    if ppl_all:
        row["ppl_all"] = ppl_all[0]
    if args.layer_sparsity:  # what OWL chose, and why
        row.update(layer_sparsities=rep["layer_sparsity"], owl_outlier_ratios=rep["owl_outlier_ratios"],
                   layer_output_errors=[x["output_error"] for x in rep["layers"]])
    if s.done is not None:
        s.done[key] = row
    if not s.keep:
        shutil.rmtree(out)
    log(f"{name}: ppl {row['ppl']:.3f} (pruned in {seconds:.0f}s)")
    return row


# -----------------------------------------------------------------------------
# table, sparsity, calibration: Table 2, Figures 5 and 4


def table_2(s: Setup) -> list:
    """Table 2; at 50% and 2:4 each model is also evaluated on every window, to show the sample agrees."""
    return [{**pruned(s, f"{m}-{nm or 50}".replace(":", "of"), prune.PruneArgs(m, 0.5, nm, calib_tokens=s.calib_file,
                                                                                 device=s.device),
                      whole=nm in (None, "2:4")), "part": "table"}
            for nm in (None, "2:4", "4:8") for m in METHODS]


def figure_5(s: Setup, sparsities: list) -> list:
    """Figure 5: perplexity against the sparsity of every expert matrix."""
    return [{**pruned(s, f"{m}-{sp}", prune.PruneArgs(m, sp, calib_tokens=s.calib_file, device=s.device)),
             "part": "sparsity"} for sp in sparsities for m in METHODS]


def figure_4(s: Setup, sizes: list) -> list:
    """Figure 4: perplexity at 50% against the number of calibration windows (the first n)."""
    rows = []
    for n in sizes:
        f = s.calib_file if n == len(s.calib) else calib_file(s, s.calib[:n], f"first-{n}")
        rows += [{**pruned(s, f"{m}-n{n}", prune.PruneArgs(m, 0.5, calib_tokens=f, device=s.device)),
                  "part": "calibration"} for m in CALIB_METHODS]
    return rows


# -----------------------------------------------------------------------------
# anatomy: where the router's hint enters, and how large each part is next to the noise


ANATOMY = (("magnitude", "magnitude", {}), ("router-blind wanda", "wanda", {"stats_tokens": "all"}),
           ("wanda", "wanda", {}), ("moe-pruner", "moe-pruner", {}))


def part_anatomy(s: Setup, draws: int) -> dict:
    settings = (("50%", 0.5, None), ("2:4", 0.5, "2:4"), ("70%", 0.7, None))
    files = [s.calib_file] + [calib_file(s, data.calibration_windows(s.ids, len(s.calib), s.calib.shape[1], d).numpy(),
                                         f"draw-{d}") for d in range(1, draws)]
    rows, keep = [], s.keep
    for label, sp, nm in settings:
        for name, method, extra in ANATOMY:
            for d in range(1 if method == "magnitude" else draws):
                kept = label == "50%" and d == 0 and name in ("wanda", "moe-pruner")  # for the mask comparison
                s.keep = keep or kept
                row = pruned(s, f"anatomy-{name}-{label}-{d}".replace(" ", "_").replace(":", "of").replace("%", ""),
                             prune.PruneArgs(method, sp, nm, calib_tokens=files[d], device=s.device, **extra))
                s.keep = keep
                rows.append({**row, "setting": label, "name": name, "draw": d})
        rows.append({**pruned(s, f"anatomy-sparsegpt-{label}".replace(":", "of").replace("%", ""),
                              prune.PruneArgs("sparsegpt", sp, nm, calib_tokens=files[0], device=s.device)),
                     "setting": label, "name": "sparsegpt", "draw": 0})
    scope = []
    for name, method, extra in ANATOMY[1:] + (("sparsegpt", "sparsegpt", {}),):
        for label, flags in (("experts", {}), ("+attention", {"prune_attention": True}),
                             ("+attention+router", {"prune_attention": True, "prune_router": True})):
            base = next((r for r in rows if r["setting"] == "50%" and r["name"] == name and r["draw"] == 0), None)
            row = base if not flags else pruned(s, f"scope-{name}-{label}".replace(" ", "_").replace("+", "p"),
                                                prune.PruneArgs(method, 0.5, calib_tokens=files[0], device=s.device,
                                                                **extra, **flags))
            scope.append({"name": name, "scope": label, "ppl": row["ppl"], "overall_sparsity": row["overall_sparsity"]})
    names = [f"anatomy-{n}-50-0" for n in ("wanda", "moe-pruner")]
    diff = anatomy.mask_difference(*(os.path.join(s.work, n) for n in names), s.config.num_hidden_layers)
    if not keep:
        for n in names:
            shutil.rmtree(os.path.join(s.work, n))
    gates = anatomy.gate_anatomy(s.model, torch.from_numpy(s.calib))
    return {"runs": rows, "scope": scope, "mask_difference": diff, "gates": gates, "draws": draws}


# -----------------------------------------------------------------------------
# experts, owl, distill


def part_experts(s: Setup) -> list:
    """NAEE, REAP and CD-MoE variants and MoE-Pruner at several budgets, on the same calibration windows."""
    n = s.config.num_local_experts
    tokens = torch.from_numpy(s.calib)
    variants = [("dense", None, None), (f"NAEE r={n - 2}", "naee", (n - 2, False)),
                (f"NAEE r={n // 2}", "naee", (n // 2, False)), (f"REAP r={n - 2}", "reap", (n - 2, False)),
                (f"REAP r={n // 2}", "reap", (n // 2, False)), ("NAEE skipping", "naee", (n, True)),
                (f"NAEE r={n - 2} + skipping", "naee", (n - 2, True)), ("CD-MoE 1 layer x 2 experts", "cd-moe", (1, 2)),
                ("CD-MoE 2 layers x 2 experts", "cd-moe", (2, 2)), ("CD-MoE 2 layers x 4 experts", "cd-moe", (2, 4)),
                ("MoE-Pruner 25%", "prune", (0.25, None)), ("MoE-Pruner 50%", "prune", (0.5, None)),
                ("MoE-Pruner 2:4", "prune", (0.5, "2:4"))]
    rows = []
    for name, kind, extra in variants:
        folder = re.sub(r"[%=]", "", name.replace(" ", "_").replace(":", "of"))
        out = s.model if kind is None else os.path.join(s.work, folder)
        t0, quiet = time.time(), lambda m: None
        if kind in ("naee", "reap"):
            how = expert_prune.ExpertPruning(*extra, select=kind)
            expert_prune.drop_experts(CheckpointReader(s.model), tokens, how, out, overwrite=True, log=quiet)
        elif kind == "cd-moe":
            expert_prune.cd_moe(s.model, tokens, *extra, out, overwrite=True, log=quiet)
        elif kind == "prune":
            prune.prune_checkpoint(s.model, out, prune.PruneArgs("moe-pruner", *extra, calib_tokens=s.calib_file,
                                                                 device=s.device), overwrite=True, log=quiet)
        seconds = time.time() - t0
        m = variants.load_model(out)
        skip = expert_prune.skip_fraction(m, tokens[:16])
        report_file = os.path.join(out, "prune_report.json")
        nonzero = 1 - json.load(open(report_file))["expert_sparsity"] if kind == "prune" else 1.0
        budget = expert_prune.expert_budget(m.config, skip, nonzero)
        dense_params = expert_prune.expert_budget(s.config)["stored_expert_params"]
        # bytes in fp16: dense layout for everything but 2:4 (values + metadata: 9/16 of dense)
        fp16_bytes = budget["stored_expert_params"] / nonzero * 2 * (9 / 16 if "2:4" in name else 1)
        rows.append({"variant": name, "ppl": perplexities(s, out)[0], "seconds": seconds, "skip_fraction": skip,
                     "expert_params_fraction": budget["stored_expert_params"] / dense_params,
                     "expert_fp16_MB": fp16_bytes / 1e6, **budget})
        log(f"{name}: ppl {rows[-1]['ppl']:.3f}, expert params {rows[-1]['expert_params_fraction']:.3f} of dense")
        if kind is not None and not s.keep:
            shutil.rmtree(out)
    return rows


def part_owl(s: Setup) -> list:
    rows = []
    for sp in (0.5, 0.7):
        for method in ("wanda", "moe-pruner"):
            for layer_sparsity in (None, "owl"):
                row = pruned(s, f"owl-{method}-{sp}-{layer_sparsity}", prune.PruneArgs(
                    method, sp, calib_tokens=s.calib_file, device=s.device, layer_sparsity=layer_sparsity))
                rows.append({**row, "layer_sparsity": layer_sparsity or "uniform"})
    return rows


def part_dtype(s: Setup, nsamples: int = 16) -> dict:
    """MoE-Pruner 50% with the layer forward in float32 and in bfloat16 (autocast) on the first
    nsamples calibration windows: how many weights' masks differ, and both perplexities."""
    f = calib_file(s, s.calib[:nsamples], f"first-{nsamples}")
    keep, s.keep, rows = s.keep, True, {}
    for dtype in ("float32", "bfloat16"):
        rows[dtype] = pruned(s, f"dtype-{dtype}", prune.PruneArgs("moe-pruner", 0.5, calib_tokens=f, device=s.device,
                                                                  dtype=dtype))
    s.keep = keep
    paths = [os.path.join(s.work, f"dtype-{d}") for d in ("float32", "bfloat16")]
    diff = anatomy.mask_difference(*paths, s.config.num_hidden_layers)
    if not keep:
        for p in paths:
            shutil.rmtree(p)
    return {"nsamples": nsamples, "float32": rows["float32"], "bfloat16": rows["bfloat16"],
            "mask_difference": sum(r["mask_difference"] for r in diff) / len(diff), "per_layer": diff}


def part_rounding(s: Setup) -> list:
    """SparseGPT at Table 2's settings with the next layer fed its updated weights in float32 (the
    default) and rounded to the checkpoint's dtype (--round-updates, as the reference computes)."""
    rows = []
    for label, sp, nm in (("50%", 0.5, None), ("2:4", 0.5, "2:4"), ("4:8", 0.5, "4:8")):
        for rounded in (False, True):
            rows.append({**pruned(s, f"rounding-{label.replace(':', 'of').replace('%', '')}-{rounded}", prune.PruneArgs(
                "sparsegpt", sp, nm, calib_tokens=s.calib_file, device=s.device, round_updates=rounded)),
                "setting": label, "round_updates": rounded})
    return rows


def part_distill(s: Setup, dense_ppl: float) -> list:
    """Prune (moe-pruner, wanda; 50% and 2:4), distil with distill.py's defaults, evaluate; for
    moe-pruner also the per-expert mode and the ablation of Eq. 10's terms."""
    rows = []
    for method in ("moe-pruner", "wanda"):
        for label, nm in (("50%", None), ("2:4", "2:4")):
            pruned_dir = os.path.join(s.work, f"kd-{method}-{label.replace(':', 'of').replace('%', '')}")
            prune.prune_checkpoint(s.model, pruned_dir, prune.PruneArgs(method, 0.5, nm, calib_tokens=s.calib_file,
                                                                        device=s.device), overwrite=True)
            pruned_ppl = perplexities(s, pruned_dir)[0]
            runs = [("full", "eq10")] + ([("per-expert", "mse"), ("full", "ce"), ("full", "mse")]
                                         if method == "moe-pruner" else [])
            for mode, loss in runs:
                out, t0 = pruned_dir + f"-{mode}-{loss}", time.time()
                rep = distill.distill_checkpoint(s.model, pruned_dir, out, distill.DistillConfig(loss=loss), mode,
                                                 device=s.device, overwrite=True)
                ppl = perplexities(s, out)[0]
                rows.append({"method": method, "sparsity": label, "mode": mode, "loss": loss, "dense_ppl": dense_ppl,
                             "pruned_ppl": pruned_ppl, "distilled_ppl": ppl,
                             "gap_recovered": (pruned_ppl - ppl) / (pruned_ppl - dense_ppl),
                             "seconds": time.time() - t0, "lambda": rep.get("lambda"), "settings": rep["settings"]})
                log(f"KD {method} {label} {mode} {loss}: {pruned_ppl:.3f} -> {ppl:.3f} (dense {dense_ppl:.3f})")
                if not s.keep:
                    shutil.rmtree(out)
            if not s.keep:
                shutil.rmtree(pruned_dir)
    return rows


# -----------------------------------------------------------------------------


@dataclass
class Plan:
    """A run's settings, as the command line gives them."""

    model: str
    out: str
    parts: list
    calib_data: str = "stdlib"
    eval_data: str = "stdlib"
    nsamples: int = 128  # the paper's 128 calibration windows
    seqlen: Optional[int] = None  # None: 2048, capped at the model's context
    eval_windows: Optional[int] = None  # None: data.EVAL_SAMPLE on the embedded corpus, all on other text
    seed: int = 0
    calib_tokens: Optional[str] = None  # the windows from this .npy instead of a draw (no copy in out)
    sweep: tuple = (0.3, 0.5, 0.7, 0.8)  # Figure 5's sparsities
    calib_sweep: tuple = (2, 8, 32, 128)  # Figure 4's calibration window counts
    draws: int = 5  # anatomy: calibration draws per method
    device: Optional[str] = None  # None: cuda when torch sees one
    keep: bool = False
    overwrite: bool = False
    command: str = "python run_paper.py"


def run(plan: Plan) -> dict:
    """Every part asked for, on the same calibration and evaluation windows; writes out/results.json,
    out/README.md and the plots. Returns the results."""
    model, out = plan.model, plan.out
    config = read_config(model)
    inputs = [model, plan.calib_tokens, data.input_path(plan.calib_data), data.input_path(plan.eval_data)]
    check_not_input(out, inputs)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise data.DataError(f"--out {out} is a file, not a folder: name a folder for results.json and its README")
    if os.path.isdir(out):
        for fn in OUTPUT_FILES:  # every file this run may write, refused before any work
            check_output_file(os.path.join(out, fn), plan.overwrite, inputs)
    unknown = [p for p in plan.parts if p not in PARTS]
    if unknown:
        raise data.DataError(f"unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
    calib = data.load_token_file(plan.calib_tokens, config.vocab_size).numpy() if plan.calib_tokens else None
    seqlen = calib.shape[1] if plan.calib_tokens else plan.seqlen or min(2048, config.max_position_embeddings)
    if seqlen > config.max_position_embeddings:
        raise data.DataError(f"{'--calib-tokens: windows of' if plan.calib_tokens else '--seqlen'} {seqlen} exceeds the "
                             f"model's max_position_embeddings {config.max_position_embeddings}")
    tok = data.load_tokenizer(model)
    ids = data.encode(tok, data.text_source(plan.calib_data, "calib"))
    if not plan.calib_tokens:
        calib = data.calibration_windows(ids, plan.nsamples, seqlen, plan.seed).numpy()  # [nsamples, seqlen]
    eval_ids = data.encode(tok, data.text_source(data.resolve_wikitext(plan.eval_data, "test"), "eval"))
    every = data.eval_windows(eval_ids, seqlen)  # [N, seqlen]
    windows, indices = data.sample_windows(every, data.eval_window_count(plan.eval_data, plan.eval_windows))
    results = {"model": data.shown_path(model), "config": config.to_dict(), "seqlen": seqlen, "nsamples": len(calib),
               "calib_data": plan.calib_data, "eval_data": plan.eval_data, "eval_windows": len(windows),
               "eval_windows_in_text": len(every), "eval_window_indices": indices, "eval_tokens": windows.numel(),
               "machine": machine(), "parts": plan.parts, "minutes": {}, "runs": []}
    with staged_folder(out, plan.overwrite) as stage:  # out's files, each whole, only at the end
        work = os.path.join(out, "checkpoints") if plan.keep else os.path.join(stage, "work")
        os.makedirs(work, exist_ok=True)
        calib_path = plan.calib_tokens or os.path.join(stage, prune.CALIBRATION_FILE)  # read, or saved beside results
        if not plan.calib_tokens:
            np.save(calib_path, calib)
        results.update(calib_tokens=data.shown_path(plan.calib_tokens or os.path.join(out, prune.CALIBRATION_FILE)),
                       calib_sha256=data.file_sha256(calib_path))  # where the windows are, and which they are
        device = plan.device or ("cuda" if torch.cuda.is_available() else "cpu")
        s = Setup(model, config, calib, calib_path, ids, windows,
                  every if len(windows) < len(every) else None, work, device, plan.keep, {})
        try:
            run_parts(s, plan, results)
        finally:
            if not plan.keep:
                shutil.rmtree(work, ignore_errors=True)
        results["command"] = plan.command
        write_output_file(os.path.join(stage, "results.json"), json_text(results))
        tables = report.write_report(results, out, stage)
    stale = os.path.join(out, prune.CALIBRATION_FILE)  # never the --calib-tokens file: out may not contain an input
    if plan.calib_tokens and os.path.isfile(stale):
        os.remove(stale)  # windows this run did not use (refused above without --overwrite): results.json names its own
    print(tables)
    return results


def run_parts(s: Setup, plan: Plan, results: dict):
    """The dense model's perplexity, then each part in turn, into results."""
    t0 = time.time()
    results["dense_ppl"], *dense_all = perplexities(s, plan.model, whole="table" in plan.parts)
    if dense_all:
        results["dense_ppl_all"] = dense_all[0]
    log(f"dense: ppl {results['dense_ppl']:.3f}")
    for part in plan.parts:
        t = time.time()
        if part == "table":
            results["runs"] += table_2(s)
        elif part == "sparsity":
            results["runs"] += figure_5(s, list(plan.sweep))
        elif part == "calibration":
            results["runs"] += figure_4(s, [n for n in plan.calib_sweep if n <= len(s.calib)])
        elif part == "anatomy":
            results["anatomy"] = part_anatomy(s, plan.draws)
        elif part == "experts":
            results["expert_level"] = part_experts(s)
        elif part == "owl":
            results["owl"] = part_owl(s)
        elif part == "distill":
            results["distill"] = part_distill(s, results["dense_ppl"])
        elif part == "dtype":
            results["dtype"] = part_dtype(s)
        elif part == "rounding":
            results["rounding"] = part_rounding(s)
        results["minutes"][part] = (time.time() - t) / 60
        log(f"part {part}: {results['minutes'][part]:.1f} min")
    results["total_minutes"] = (time.time() - t0) / 60


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        if a.docs:  # the tables, plots and documented numbers are report.py's
            return print(report.documents_line(report.rewrite_documents()))
        if a.compare:
            return report.main(["--compare", *a.compare])
        if a.replot:
            return report.main(["--out", a.out])
        if a.calib_tokens and cli.given_flags(p, argv) & {"nsamples", "seqlen", "seed"}:
            p.error("--calib-tokens fixes the windows: --nsamples, --seqlen and --seed would be ignored")
        parts = [a.only] if a.only else a.parts.split(",")
        command = " ".join(["python run_paper.py", *(sys.argv[1:] if argv is None else argv)])
        return run(Plan(a.model or data.default_model_dir(), a.out, parts, a.calib_data, a.eval_data, a.nsamples,
                        a.seqlen, a.eval_windows, a.seed, a.calib_tokens, tuple(a.sweep), tuple(a.calib_sweep), a.draws,
                        a.device, a.keep, a.overwrite, command))


if __name__ == "__main__":
    main()
