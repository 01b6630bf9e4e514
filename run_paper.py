"""
The paper's experiments, in shape, on the embedded model (or any checkpoint): one command.

  - Table 2: dense; magnitude, wanda, sparsegpt, moe-pruner at 50% unstructured, 2:4 and 4:8;
  - Figure 5: sparsity sweep 10%..80% for every method;
  - Figure 4: calibration samples 2, 4, ..., 128 at 50% for the calibration-based methods;
  - wall time of every pruning run;
  - expert-wise distillation (--only distill, not part of the default run): moe-pruner and wanda
    at 50% and 2:4, distilled with distill.py's defaults (full mode, and per-expert mode for
    moe-pruner), and the fraction of the pruning gap recovered;
  - expert-level baselines at equal memory (--only experts): NAEE expert pruning r=6 and r=4,
    dynamic skipping alone and with r=6, CD-MoE condensing, against MoE-Pruner 25%, 50% and 2:4:
    perplexity, stored expert parameters and expert multiply-accumulates per token.

Every method sees the same calibration windows (drawn once, saved as calib_tokens.npy and
passed to prune.py with --calib-tokens; the calibration sweep uses their first n rows) and
every model the same evaluation windows. Results go to --out as results.json and README.md (the tables),
with sparsity_sweep.png and calibration_sweep.png when matplotlib is installed (optional:
pip install matplotlib). Pruned checkpoints are written to a temporary folder and deleted after
evaluation unless --keep.

    python run_paper.py                          # embedded model, ~25 minutes on 2 CPU cores
    python run_paper.py --model Mixtral-8x7B-v0.1 --calib-data c4-train.00000-of-01024.json.gz \\
        --eval-data wikitext-2-raw --seqlen 2048 --nsamples 128 --device cuda   # the paper's scale
"""

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

import cli
import data
import distill
import eval_ppl
import expert_prune
import prune
from checkpoint import CheckpointReader, check_output_file, read_config, write_output_file
from progress import log

try:  # optional: the plots
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

METHODS = ("magnitude", "wanda", "sparsegpt", "moe-pruner")
CALIB_METHODS = ("wanda", "sparsegpt", "moe-pruner")  # magnitude uses no calibration data
# MoE-Pruner Table 2, WikiText perplexity of Mixtral-8x7B (for the side-by-side table).
PAPER_TABLE2 = {"dense": 3.84, ("sparsegpt", "50%"): 4.99, ("wanda", "50%"): 4.97, ("moe-pruner", "50%"): 4.68,
                ("sparsegpt", "2:4"): 7.09, ("wanda", "2:4"): 6.98, ("moe-pruner", "2:4"): 5.88}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", help="checkpoint directory; default: the embedded tiny Mixtral")
    p.add_argument("--out", default="results", help="folder for results.json, README.md (the tables) and the plots")
    p.add_argument("--calib-data", default="stdlib", help="calibration text (as prune.py --calib-data)")
    p.add_argument("--eval-data", default="stdlib", help="evaluation text (as eval_ppl.py --data)")
    p.add_argument("--nsamples", type=cli.positive_int, default=128, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=cli.seqlen, default=None,
                   help="calibration and evaluation window length (default: 2048 capped at max_position_embeddings)")
    p.add_argument("--eval-windows", type=cli.nonnegative_int, default=128,
                   help="evaluation windows per model (default 128: 65k tokens on the embedded model; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--sweep", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="sparsities of the Figure 5 sweep")
    p.add_argument("--calib-sweep", default="2,4,8,16,32,64,128", help="calibration sample counts of Figure 4")
    p.add_argument("--only", choices=("table", "sparsity", "calibration", "experts", "distill"),
                   help="run one part only (distill runs only when asked: it is the slowest part)")
    p.add_argument("--device", default=None, help="passed to prune.py and eval_ppl.py (default: theirs)")
    p.add_argument("--keep", action="store_true", help="keep the pruned checkpoints (under --out/checkpoints)")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    args = p.parse_args(argv)
    with cli.errors():
        model = args.model or data.default_model_dir()
        config = read_config(model)
        if os.path.isdir(args.out):
            check_output_file(os.path.join(args.out, "results.json"), args.overwrite)
        # one set of calibration windows for every method (and its prefixes for the calibration sweep)
        seqlen = args.seqlen or min(2048, config.max_position_embeddings)
        tok = data.load_tokenizer(model)
        ids = data.encode(tok, data.text_source(args.calib_data, "calib"))
        calib = data.calibration_windows(ids, args.nsamples, seqlen, args.seed).numpy()
        # one set of evaluation windows for every model
        ids = data.encode(tok, data.text_source(data.resolve_wikitext(args.eval_data, "test"), "eval"))
        windows = data.eval_windows(ids, seqlen)[: args.eval_windows or None]
        os.makedirs(args.out, exist_ok=True)
        work = os.path.join(args.out, "checkpoints") if args.keep else tempfile.mkdtemp(prefix="run_paper-")
        os.makedirs(work, exist_ok=True)
        try:
            experiments(args, model, config, seqlen, calib, windows, work, argv)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)


def experiments(args, model, config, seqlen, calib, windows, work, argv):
    calib_file = os.path.join(args.out, "calib_tokens.npy")
    np.save(calib_file, calib)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def evaluate(path):
        model_ = expert_prune.load_model(path, torch.float32, device)
        return {"ppl": eval_ppl.perplexity(model_, windows, 8, device), "windows": len(windows),
                "tokens": windows.numel()}

    runs = []
    plan = []
    if args.only in (None, "table"):
        plan += [(m, 0.5, None, args.nsamples, "table") for m in METHODS]
        plan += [(m, 0.5, nm, args.nsamples, "table") for nm in ("2:4", "4:8") for m in METHODS]
    if args.only in (None, "sparsity"):
        plan += [(m, float(s), None, args.nsamples, "sparsity") for s in args.sweep.split(",") for m in METHODS]
    if args.only in (None, "calibration"):
        plan += [(m, 0.5, None, int(n), "calibration") for n in args.calib_sweep.split(",") for m in CALIB_METHODS
                 if int(n) <= args.nsamples]
    t_start = time.time()
    dense = evaluate(model)
    log(f"dense: ppl {dense['ppl']:.3f}")
    done = {}
    for i, (method, sparsity, nm, n, part) in enumerate(plan):
        key = (method, sparsity, nm, n)
        if key in done:  # the 50% run at full calibration appears in all three parts
            runs.append({**done[key], "part": part})
            continue
        out = os.path.join(work, f"{method}-{nm.replace(':', 'of') if nm else sparsity}-{n}")
        calib_n = os.path.join(work, f"calib-{n}.npy")
        np.save(calib_n, calib[:n])
        t0 = time.time()
        report = prune.prune_checkpoint(model, out, prune.PruneArgs(method, sparsity, nm, calib_tokens=calib_n,
                                                                     device=device), overwrite=True)
        prune_s = time.time() - t0
        ev = evaluate(out)
        done[key] = {"method": method, "sparsity": sparsity, "nm": nm, "nsamples": n, "ppl": ev["ppl"],
                     "prune_seconds": prune_s, "expert_sparsity": report["expert_sparsity"],
                     "overall_sparsity": report["overall_sparsity"]}
        runs.append({**done[key], "part": part})
        if not args.keep:
            shutil.rmtree(out)
        elapsed = time.time() - t_start
        log(f"[{i + 1}/{len(plan)}] {method} {nm or f'{sparsity:.0%}'} n={n}: ppl {ev['ppl']:.3f}, "
            f"pruned in {prune_s:.1f}s; {elapsed / 60:.1f} min elapsed, ~{elapsed / (i + 1) * (len(plan) - i - 1) / 60:.1f} left")
    experts = expert_level(model, config, calib_file, work, evaluate, device, args.keep) if args.only in (
        None, "experts") else []
    distilled = distill_part(model, dense["ppl"], calib_file, work, evaluate, device, args.keep) if (
        args.only == "distill") else []
    results = {"model": data.shown_path(model), "config": config.to_dict(), "seqlen": seqlen, "nsamples": args.nsamples,
               "calib_data": args.calib_data, "eval_data": args.eval_data, "eval_windows": dense["windows"],
               "eval_tokens": dense["tokens"], "dense_ppl": dense["ppl"], "runs": runs, "expert_level": experts, "distill": distilled,
               "minutes": (time.time() - t_start) / 60}
    write_output_file(os.path.join(args.out, "results.json"), json.dumps(results, indent=2), overwrite=True)
    command = " ".join(["python run_paper.py", *(sys.argv[1:] if argv is None else argv)])
    tables = markdown(results)
    plotted = plots(results, args.out)
    write_output_file(os.path.join(args.out, "README.md"), (f"# Results\n\nWritten by `{command}` ({results['minutes']:.0f} minutes); results.json holds every "
                f"number.\n\n{tables}\n" + "".join(f"![{fn[:-4]}]({fn})\n" for fn in plotted)), overwrite=True)
    print(tables)


def expert_level(model, config, calib_file, work, evaluate, device, keep):
    """NAEE / CD-MoE variants and MoE-Pruner at several budgets, on the same calibration windows."""
    n = config.num_local_experts
    tokens = torch.from_numpy(np.load(calib_file))
    variants = [("dense", None, None), (f"NAEE r={n - 2}", "naee", (n - 2, False)), (f"NAEE r={n // 2}", "naee", (n // 2, False)),
                ("NAEE skipping", "naee", (n, True)), (f"NAEE r={n - 2} + skipping", "naee", (n - 2, True)),
                ("CD-MoE 1 layer x 2 experts", "cd-moe", (1, 2)), ("CD-MoE 2 layers x 2 experts", "cd-moe", (2, 2)),
                ("CD-MoE 2 layers x 4 experts", "cd-moe", (2, 4)),
                ("MoE-Pruner 25%", "prune", (0.25, None)), ("MoE-Pruner 50%", "prune", (0.5, None)),
                ("MoE-Pruner 2:4", "prune", (0.5, "2:4"))]
    rows = []
    for name, kind, extra in variants:
        out = model if kind is None else os.path.join(work, name.replace(" ", "_").replace(":", "of").replace("%", ""))
        t0 = time.time()
        if kind == "naee":
            expert_prune.naee(CheckpointReader(model), tokens, *extra, out, overwrite=True)
        elif kind == "cd-moe":
            expert_prune.cd_moe(model, tokens, *extra, out, overwrite=True)
        elif kind == "prune":
            prune.prune_checkpoint(model, out, prune.PruneArgs("moe-pruner", *extra, calib_tokens=calib_file,
                                                               device=device), overwrite=True)
        seconds = time.time() - t0
        ev = evaluate(out)
        m = expert_prune.load_model(out)
        cfg = m.config
        skip = expert_prune.skip_fraction(m, tokens[:16])
        nonzero = 1.0
        if kind == "prune":
            nonzero = 1 - json.load(open(os.path.join(out, "prune_report.json")))["expert_sparsity"]
        budget = expert_prune.expert_budget(cfg, skip, nonzero)
        dense_params = expert_prune.expert_budget(config)["stored_expert_params"]
        # bytes in fp16: dense layout for everything but 2:4 (values + metadata, 9/16 of dense)
        fp16_bytes = budget["stored_expert_params"] / nonzero * 2 * (9 / 16 if "2:4" in name else 1)
        rows.append({"variant": name, "ppl": ev["ppl"], "seconds": seconds, "skip_fraction": skip,
                     "expert_params_fraction": budget["stored_expert_params"] / dense_params,
                     "expert_fp16_MB": fp16_bytes / 1e6, **budget})
        log(f"{name}: ppl {ev['ppl']:.3f}, expert params {rows[-1]['expert_params_fraction']:.3f} of dense")
        if kind is not None and not keep:
            shutil.rmtree(out)
    return rows


def distill_part(model, dense_ppl, calib_file, work, evaluate, device, keep):
    """Prune (moe-pruner, wanda; 50% and 2:4), distill with distill.py's defaults, evaluate."""
    rows = []
    for method in ("moe-pruner", "wanda"):
        for label, sparsity, nm in (("50%", 0.5, None), ("2:4", 0.5, "2:4")):
            pruned = os.path.join(work, f"kd-{method}-{label.replace(':', 'of').replace('%', '')}")
            prune.prune_checkpoint(model, pruned, prune.PruneArgs(method, sparsity, nm, calib_tokens=calib_file,
                                                                  device=device), overwrite=True)
            pruned_ppl = evaluate(pruned)["ppl"]
            for mode in ("full", "per-expert") if method == "moe-pruner" else ("full",):
                out = pruned + f"-{mode}"
                t0 = time.time()
                report = distill.distill_checkpoint(model, pruned, out, distill.DistillConfig(), mode, device=device,
                                                    overwrite=True)
                ppl = evaluate(out)["ppl"]
                rows.append({"method": method, "sparsity": label, "mode": mode, "dense_ppl": dense_ppl,
                             "pruned_ppl": pruned_ppl, "distilled_ppl": ppl,
                             "gap_recovered": (pruned_ppl - ppl) / (pruned_ppl - dense_ppl),
                             "seconds": time.time() - t0, "lambda": report.get("lambda"),
                             "settings": report["settings"]})
                log(f"KD {method} {label} {mode}: {pruned_ppl:.3f} -> {ppl:.3f} (dense {dense_ppl:.3f})")
                if not keep:
                    shutil.rmtree(out)
            if not keep:
                shutil.rmtree(pruned)
    return rows


def markdown(res):
    runs = res["runs"]
    find = lambda part, **kw: [r for r in runs if r["part"] == part and all(r[k] == v for k, v in kw.items())]
    out = [f"Model {res['model']}; {res['nsamples']} calibration windows x {res['seqlen']} tokens ({res['calib_data']}); "
           f"perplexity on {res['eval_windows']} windows x {res['seqlen']} tokens of {res['eval_data']}.\n"]
    if find("table"):
        out.append("| method | 50% | 2:4 | 4:8 | Mixtral-8x7B (paper) 50% | 2:4 |\n|---|---|---|---|---|---|")
        out.append(f"| dense | {res['dense_ppl']:.3f} | | | {PAPER_TABLE2['dense']} | |")
        for m in METHODS:
            cell = lambda nm: next((f"{r['ppl']:.3f}" for r in find("table", method=m, nm=nm)), "")
            paper = lambda k: PAPER_TABLE2.get((m, k), "-")
            out.append(f"| {m} | {cell(None)} | {cell('2:4')} | {cell('4:8')} | {paper('50%')} | {paper('2:4')} |")
        out.append("\nPruning wall time (s, 50% unstructured): " + ", ".join(
            f"{m} {r['prune_seconds']:.1f}" for m in METHODS for r in find("table", method=m, nm=None)) + "\n")
    for part, key, label, cell, methods in (("sparsity", "sparsity", "method", "{:.0%}", METHODS),
                                            ("calibration", "nsamples", "method (50%)", "n={}", CALIB_METHODS)):
        xs = sorted({r[key] for r in find(part)})
        if not xs:
            continue
        out.append(f"| {label} | " + " | ".join(cell.format(x) for x in xs) + " |\n|---" + "|---" * len(xs) + "|")
        for m in methods:
            out.append(f"| {m} | " + " | ".join(f"{r['ppl']:.3f}" for x in xs for r in find(part, method=m, **{key: x}))
                       + " |")
        out.append("")
    if res.get("expert_level"):
        out.append("| variant | perplexity | stored expert params (nonzero) | expert storage, fp16 MB | expert MACs/token "
                   "(executed) | nonzero expert MACs/token | skipped expert calls |\n|---|---|---|---|---|---|---|")
        for r in res["expert_level"]:
            out.append(f"| {r['variant']} | {r['ppl']:.3f} | {r['expert_params_fraction']:.1%} | {r['expert_fp16_MB']:.1f} "
                       f"| {r['expert_macs_per_token'] / 1e6:.2f}M | {r['nonzero_expert_macs_per_token'] / 1e6:.2f}M "
                       f"| {r['skip_fraction']:.1%} |")
        out.append("")
    if res.get("distill"):
        s = res["distill"][0]["settings"]
        out.append(f"Distillation: {s['samples']} windows x {s['seqlen']} tokens, {s['epochs']} epochs, lr {s['lr']}.\n")
        out.append("| method | sparsity | KD mode | dense | pruned | distilled | pruning gap recovered | KD seconds |\n"
                   "|---|---|---|---|---|---|---|---|")
        for r in res["distill"]:
            out.append(f"| {r['method']} | {r['sparsity']} | {r['mode']} | {r['dense_ppl']:.3f} | {r['pruned_ppl']:.3f} "
                       f"| {r['distilled_ppl']:.3f} | {r['gap_recovered']:.1%} | {r['seconds']:.0f} |")
        out.append("")
    return "\n".join(out)


def plots(res, out_dir) -> list:
    """The figures, as PNG files in out_dir; returns their names (none without matplotlib)."""
    if plt is None:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    written = []
    for part, x, xlabel, methods, fn in (("sparsity", "sparsity", "expert sparsity", METHODS, "sparsity_sweep.png"),
                                         ("calibration", "nsamples", "calibration samples (50% sparsity)",
                                          CALIB_METHODS, "calibration_sweep.png")):
        runs = [r for r in res["runs"] if r["part"] == part]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in methods:
            pts = sorted((r[x], r["ppl"]) for r in runs if r["method"] == m)
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=m)
        ax.axhline(res["dense_ppl"], color="gray", linestyle="--", label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity")
        if part == "calibration":
            ax.set_xscale("log", base=2)
        else:
            ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{os.path.basename(os.path.normpath(res['model']))}: {xlabel}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        written.append(fn)
    if res.get("expert_level"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in res["expert_level"]:
            style = "s" if r["variant"].startswith("MoE-Pruner") else ("o" if r["variant"] == "dense" else "^")
            ax.scatter(r["expert_params_fraction"], r["ppl"], marker=style)
            ax.annotate(r["variant"], (r["expert_params_fraction"], r["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel("stored expert parameters (nonzero), fraction of dense")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title("weight pruning vs expert pruning")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "expert_level.png"), dpi=110)
        plt.close(fig)
        written.append("expert_level.png")
    return written


if __name__ == "__main__":
    main()
