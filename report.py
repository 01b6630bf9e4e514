"""
The tables, plots and documented numbers of the paper's experiments, from their results files.

run_paper.py runs the experiments and writes results.json; this module turns results into text:

  - the tables of a results folder's README.md (Table 2, Figures 5 and 4 as tables, the anatomy
    of the router's hint, the expert-level baselines, OWL, distillation, the dtype and rounding
    checks) and its plots (matplotlib, optional);
  - the numbers README.md and docs/*.md quote: every <!-- value FILE KEY --> and <!-- table FILE
    SECTION --> marker is filled from the results file it names, and <!-- help SCRIPT --> from
    the script's --help, so that no number in a document is copied by hand.

    python report.py                                   # every marker of README.md and docs/, every results folder
    python report.py --out results/anatomy             # one folder's README.md and plots again
    python report.py --compare results results/decisive  # two runs' tables side by side
"""

import argparse
import importlib
import json
import os
import re
import statistics

import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--out", metavar="DIR", help="rewrite this results folder's README.md and plots from its results.json, "
                                                "and nothing else")
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="print the tables of these results folders side by side (e.g. one model's results next to "
                        "another's), from their results.json")
    return p


cli.parse_first(__name__, build_parser)

import data
import eval_ppl
import zeroshot
from bench import distributed as bench_distributed, forward as bench_forward, prune_memory as bench_prune_memory
from bench import scale as bench_scale
from outputs import write_output_file
from progress import log, machine_line

try:  # optional: the plots
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

METHODS = ("magnitude", "wanda", "sparsegpt", "moe-pruner")  # Table 2's rows, in its order
CALIB_METHODS = ("wanda", "sparsegpt", "moe-pruner")  # magnitude uses no calibration data
ANATOMY_SETTINGS = ("50%", "2:4", "70%")  # run_paper.part_anatomy's settings, in the tables' order
# MoE-Pruner Table 2, WikiText perplexity of Mixtral-8x7B (for the side-by-side table).
PAPER_TABLE2 = {"dense": 3.84, ("sparsegpt", "50%"): 4.99, ("wanda", "50%"): 4.97, ("moe-pruner", "50%"): 4.68,
                ("sparsegpt", "2:4"): 7.09, ("wanda", "2:4"): 6.98, ("moe-pruner", "2:4"): 5.88}


# -----------------------------------------------------------------------------
# The anatomy's summary: mean and spread over calibration draws


def anatomy_summary(a: dict) -> list:
    """Per setting and method: mean and sd over draws, and MoE-Pruner - Wanda paired by draw."""
    out = []
    for setting in ANATOMY_SETTINGS:
        runs = [r for r in a["runs"] if r["setting"] == setting]
        for name in ("magnitude", "router-blind wanda", "wanda", "moe-pruner", "sparsegpt"):
            ppl = [r["ppl"] for r in sorted(runs, key=lambda r: r["draw"]) if r["name"] == name]
            out.append({"setting": setting, "name": name, "draws": len(ppl), "mean": statistics.mean(ppl),
                        "sd": statistics.stdev(ppl) if len(ppl) > 1 else None})
        w = {r["draw"]: r["ppl"] for r in runs if r["name"] == "wanda"}
        m = {r["draw"]: r["ppl"] for r in runs if r["name"] == "moe-pruner"}
        d = [m[k] - w[k] for k in sorted(w)]
        out.append({"setting": setting, "name": "moe-pruner - wanda", "draws": len(d), "mean": statistics.mean(d),
                    "sd": statistics.stdev(d) if len(d) > 1 else None, "wins": sum(v < 0 for v in d)})
    return out


def value_range(values, fmt: str) -> str:
    """The smallest and largest of values, each formatted as format() takes fmt: "0.35-0.44"."""
    values = list(values)
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def anatomy_cell(r: dict) -> str:
    """One anatomy_summary row as a table cell: mean +- sd; the paired difference signed, with its wins."""
    sd = f" +- {r['sd']:.3f}" if r["sd"] is not None else ""
    return f"{r['mean']:+.3f}{sd} (wins {r['wins']}/{r['draws']})" if "wins" in r else f"{r['mean']:.3f}{sd}"


# -----------------------------------------------------------------------------
# Tables and plots


def eval_sample_phrase(res: dict) -> str:
    """Which evaluation windows a run used, in words."""
    n, total = res["eval_windows"], res.get("eval_windows_in_text")
    if total is None:  # results written before the sample was recorded: the first n windows
        return f"the first {n} windows"
    return f"all {n} windows" if n == total else f"{n} of the {total} windows, spread evenly (data.sample_windows)"


def find(res: dict, part: str, **kw) -> list:
    """The runs of one part whose fields equal kw."""
    return [r for r in res.get("runs", []) if r["part"] == part and all(r.get(k) == v for k, v in kw.items())]


def table2(res: dict) -> str:
    """The paper's Table 2 in shape: 50%, 2:4, 4:8 beside its Mixtral-8x7B numbers."""
    if not find(res, "table"):
        return ""
    out = ["| method | 50% | 2:4 | 4:8 | Mixtral-8x7B (paper) 50% | 2:4 |\n|---|---|---|---|---|---|",
           f"| dense | {res['dense_ppl']:.3f} | | | {PAPER_TABLE2['dense']} | |"]
    for m in METHODS:
        cell = lambda nm: next((f"{r['ppl']:.3f}" for r in find(res, "table", method=m, nm=nm)), "")
        paper = lambda k: PAPER_TABLE2.get((m, k), "-")
        out.append(f"| {m} | {cell(None)} | {cell('2:4')} | {cell('4:8')} | {paper('50%')} | {paper('2:4')} |")
    return "\n".join(out)


def table2_all_windows(res: dict) -> str:
    """Table 2's 50% and 2:4 checkpoints on every window of the evaluation text, beside the sample."""
    if res.get("dense_ppl_all") is None:
        return ""
    out = [f"| method | 50%, sample | 50%, all {res['eval_windows_in_text']} | 2:4, sample | "
           f"2:4, all {res['eval_windows_in_text']} |\n|---|---|---|---|---|",
           f"| dense | {res['dense_ppl']:.3f} | {res['dense_ppl_all']:.3f} | | |"]
    for m in METHODS:
        cells = [f"{r[k]:.3f}" for nm in (None, "2:4") for r in find(res, "table", method=m, nm=nm)
                 for k in ("ppl", "ppl_all")]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def prune_times(res: dict) -> str:
    rows = [r for m in METHODS for r in find(res, "table", method=m, nm=None)]
    if not rows:
        return ""
    return "Pruning wall time (s, 50% unstructured): " + ", ".join(f"{r['method']} {r['prune_seconds']:.1f}" for r in rows)


def sweep_table(res: dict, part: str) -> str:
    """Figure 5 (part "sparsity") or Figure 4 (part "calibration") as a table."""
    key, label, cell, methods = {"sparsity": ("sparsity", "method", "{:.0%}", METHODS),
                                 "calibration": ("nsamples", "method (50%)", "n={}", CALIB_METHODS)}[part]
    xs = sorted({r[key] for r in find(res, part)})
    if not xs:
        return ""
    out = [f"| {label} | " + " | ".join(cell.format(x) for x in xs) + " |\n|---" + "|---" * len(xs) + "|"]
    for m in methods:
        out.append(f"| {m} | " + " | ".join(f"{r['ppl']:.3f}" for x in xs for r in find(res, part, method=m, **{key: x}))
                   + " |")
    return "\n".join(out)


def sparsity_table(res: dict) -> str:
    return sweep_table(res, "sparsity")


def calibration_table(res: dict) -> str:
    return sweep_table(res, "calibration")


def hint_table(res: dict) -> str:
    """The anatomy: each method's mean +- sd over the draws; MoE-Pruner - Wanda paired by draw."""
    if not res.get("anatomy"):
        return ""
    summary = anatomy_summary(res["anatomy"])
    out = ["| method | 50% | 2:4 | 70% |\n|---|---|---|---|"]
    for name in ("magnitude", "router-blind wanda", "wanda", "moe-pruner", "sparsegpt", "moe-pruner - wanda"):
        cells = [anatomy_cell(next(x for x in summary if x["setting"] == setting and x["name"] == name))
                 for setting in ANATOMY_SETTINGS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def scope_table(res: dict) -> str:
    if not res.get("anatomy"):
        return ""
    out = ["| method | experts | +attention | +attention+router |\n|---|---|---|---|"]
    for name in ("router-blind wanda", "wanda", "moe-pruner", "sparsegpt"):
        cells = [next(f"{r['ppl']:.3f} ({r['overall_sparsity']:.1%})" for r in res["anatomy"]["scope"]
                      if r["name"] == name and r["scope"] == sc) for sc in ("experts", "+attention", "+attention+router")]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def gates_table(res: dict) -> str:
    if not res.get("anatomy"):
        return ""
    a = res["anatomy"]
    out = ["| layer | gate sd | top-k mass | r_j spread, x | r_j spread, h | mask difference w1 / w3 / w2 |\n"
           "|---|---|---|---|---|---|"]
    for g in a["gates"]:
        d = {r["matrix"]: r["mask_difference"] for r in a["mask_difference"] if r["layer"] == g["layer"]}
        out.append(f"| {g['layer']} | {g['gate_std']:.3f} | {g['topk_mass']:.3f} | "
                   f"{g['r_spread_x']:.4f} | {g['r_spread_h']:.4f} | {d['w1']:.2%} / {d['w3']:.2%} / {d['w2']:.2%} |")
    return "\n".join(out)


def experts_table(res: dict) -> str:
    if not res.get("expert_level"):
        return ""
    out = ["| variant | perplexity | stored expert params (nonzero) | expert storage, fp16 MB | expert MACs/token "
           "(executed) | nonzero expert MACs/token | skipped expert calls |\n|---|---|---|---|---|---|---|"]
    for r in res["expert_level"]:
        out.append(f"| {r['variant']} | {r['ppl']:.3f} | {r['expert_params_fraction']:.1%} | {r['expert_fp16_MB']:.1f} "
                   f"| {r['expert_macs_per_token'] / 1e6:.2f}M | {r['nonzero_expert_macs_per_token'] / 1e6:.2f}M "
                   f"| {r['skip_fraction']:.1%} |")
    return "\n".join(out)


def owl_table(res: dict) -> str:
    if not res.get("owl"):
        return ""
    out = ["| method | sparsity | uniform | OWL |\n|---|---|---|---|"]
    for method in ("wanda", "moe-pruner"):
        for sp in (0.5, 0.7):
            c = {r["layer_sparsity"]: r["ppl"] for r in res["owl"] if r["method"] == method and r["sparsity"] == sp}
            out.append(f"| {method} | {sp:.0%} | {c['uniform']:.3f} | {c['owl']:.3f} |")
    return "\n".join(out)


def dtype_line(res: dict) -> str:
    d = res.get("dtype")
    if not d:
        return ""
    return (f"Compute dtype, MoE-Pruner 50% on the first {d['nsamples']} calibration windows: perplexity "
            f"{d['float32']['ppl']:.4f} (float32) and {d['bfloat16']['ppl']:.4f} (bfloat16); "
            f"{d['mask_difference']:.3%} of the expert weights have another mask; pruning took "
            f"{d['float32']['prune_seconds']:.0f} s and {d['bfloat16']['prune_seconds']:.0f} s.")


def rounding_table(res: dict) -> str:
    if not res.get("rounding"):
        return ""
    ppl = {(r["setting"], r["round_updates"]): r["ppl"] for r in res["rounding"]}
    out = ["| SparseGPT | next layer fed float32 updates | fed the checkpoint's rounded weights | difference |",
           "|---|---|---|---|"]
    for x in dict.fromkeys(r["setting"] for r in res["rounding"]):
        out.append(f"| {x} | {ppl[x, False]:.3f} | {ppl[x, True]:.3f} | {ppl[x, True] - ppl[x, False]:+.3f} |")
    return "\n".join(out)


def distill_table(res: dict) -> str:
    if not res.get("distill"):
        return ""
    st = res["distill"][0]["settings"]
    out = [f"Distillation: {st['nsamples']} windows x {st['seqlen']} tokens, {st['epochs']} epochs, lr {st['lr']}; "
           "loss eq10 = L_CE + lambda L_expert (Eq. 10), ce = L_CE alone, mse = L_expert alone.\n",
           "| method | sparsity | KD mode | loss | dense | pruned | distilled | pruning gap recovered | KD seconds |\n"
           "|---|---|---|---|---|---|---|---|---|"]
    for r in res["distill"]:
        out.append(f"| {r['method']} | {r['sparsity']} | {r['mode']} | {r['loss']} | {r['dense_ppl']:.3f} | "
                   f"{r['pruned_ppl']:.3f} | {r['distilled_ppl']:.3f} | {r['gap_recovered']:.1%} | {r['seconds']:.0f} |")
    return "\n".join(out)


# The results README's sections in order: the name a document's <!-- table FOLDER NAME --> ...
# <!-- end table --> marker copies one by (see render_document), and the function that makes it.
SECTIONS = {"table2": table2, "all-windows": table2_all_windows, "times": prune_times, "sparsity": sparsity_table,
            "calibration": calibration_table, "hint": hint_table, "scope": scope_table, "gates": gates_table,
            "experts": experts_table, "owl": owl_table, "dtype": dtype_line, "rounding": rounding_table,
            "distill": distill_table}
# Each section's caption above it in the results README (none where the table says it all).
CAPTIONS = {
    "table2": "Table 2 in shape: perplexity of each method at 50%, 2:4 and 4:8, beside the paper's Mixtral-8x7B "
              "WikiText numbers.",
    "all-windows": "The sample against the whole evaluation text: Table 2's 50% and 2:4 checkpoints on the sample "
                   "and on every window.",
    "sparsity": "Figure 5 in shape: perplexity against sparsity.",
    "calibration": "Figure 4 in shape: perplexity against the number of calibration windows, at 50% (the first n of "
                   "the shared calibration windows).",
    "hint": "The router's hint: perplexity, mean +- sd over the calibration draws (magnitude needs none; SparseGPT "
            "on draw 0 for reference); the last row pairs MoE-Pruner with Wanda draw by draw, with the draws where "
            "MoE-Pruner wins.",
    "scope": "Scope at 50% (draw 0): perplexity (whole-model sparsity) when attention, then the router, are pruned "
             "too.",
    "gates": "Per layer: the spread (sd) of the gates over every routed (token, expert) pair (renormalised gates "
             "have mean 1/k by construction), the top-k probability mass, the spread (coefficient of variation over "
             "input columns) of r_j = ||X_j Gate|| / ||X_j|| for the w1/w3 input x and the w2 input h, and the "
             "fraction of weights whose 50% mask differs between MoE-Pruner and Wanda.",
    "experts": "Expert-level methods against weight pruning: perplexity, what is stored and what is executed (r: "
               "experts kept per layer).",
    "owl": "OWL's per-layer sparsity against uniform sparsity (the mean kept).",
    "rounding": "SparseGPT's next layer: perplexity with the updated weights fed forward in float32 and as the "
                "checkpoint holds them (--round-updates, the reference's way).",
    "distill": "Expert-wise distillation (Eq. 10) after pruning, and its ablation.",
}


def markdown(res: dict) -> str:
    """The results README's text: what was run, then every section the results hold, captioned."""
    out = [f"Model {res['model']}; {res['nsamples']} calibration windows x {res['seqlen']} tokens ({res['calib_data']}); "
           f"perplexity on {eval_sample_phrase(res)} x {res['seqlen']} tokens of {res['eval_data']}; dense "
           f"{res['dense_ppl']:.3f}. Minutes per part: " + ", ".join(f"{k} {v:.0f}" for k, v in res["minutes"].items())
           + (f", on {machine_line(res['machine'])}" if res.get("machine") else "") + ".\n"]
    for name, table in SECTIONS.items():
        text = table(res)
        if text:
            out.append((f"{CAPTIONS[name]}\n\n" if name in CAPTIONS else "") + text + "\n")
    return "\n".join(out)


def setting(r: dict) -> str:
    """A pruning run's setting as the tables name it: 50%, 2:4, ..."""
    return r["nm"] or f"{r['sparsity']:.0%}"


def side_by_side(results: list) -> str:
    """Several runs' tables as one (e.g. the same parts on two models): each cell holds the runs'
    values in order, "a / b". Pruning settings that every run has; the anatomy when every run has it."""
    join = lambda values: " / ".join(values)
    out = ["Each cell: " + join(r["model"] for r in results) + ".\n"]
    ppl = [{(r["method"], setting(r)): r["ppl"] for r in res.get("runs", []) if r["part"] in ("table", "sparsity")}
           for res in results]
    order = ("30%", "50%", "70%", "80%", "2:4", "4:8")  # unstructured by sparsity (Figure 5), then N:M (Table 2)
    settings = [x for x in order if all(("wanda", x) in p and ("moe-pruner", x) in p for p in ppl)]
    if settings:
        out.append("| method | " + " | ".join(settings) + " |\n|---" + "|---" * len(settings) + "|")
        out.append("| dense | " + join(f"{res['dense_ppl']:.3f}" for res in results) + " |" + " |" * (len(settings) - 1))
        for m in METHODS:
            out.append(f"| {m} | " + " | ".join(join(f"{p[m, x]:.3f}" if (m, x) in p else "-" for p in ppl)
                                                 for x in settings) + " |")
        out.append("| moe-pruner - wanda | " + " | ".join(
            join(f"{p['moe-pruner', x] - p['wanda', x]:+.3f}" for p in ppl) for x in settings) + " |\n")
    if all(res.get("anatomy") for res in results):
        summaries = [{(x["setting"], x["name"]): x for x in anatomy_summary(res["anatomy"])} for res in results]
        out.append("The router's hint: mean +- sd over the calibration draws; MoE-Pruner - Wanda paired by draw, "
                   "with the draws where MoE-Pruner wins.\n")
        out.append("| method | 50% | 2:4 | 70% |\n|---|---|---|---|")
        for name in ("magnitude", "router-blind wanda", "wanda", "moe-pruner", "sparsegpt", "moe-pruner - wanda"):
            out.append(f"| {name} | " + " | ".join(join(anatomy_cell(sm[x, name]) for sm in summaries)
                                                   for x in ANATOMY_SETTINGS) + " |")
        anatomies = [res["anatomy"] for res in results]
        scopes = ("experts", "+attention", "+attention+router")
        out.append("\nScope at 50% (draw 0):\n\n| method | " + " | ".join(scopes) + " |\n|---|---|---|---|")
        for name in ("router-blind wanda", "wanda", "moe-pruner", "sparsegpt"):
            out.append(f"| {name} | " + " | ".join(join(f"{r['ppl']:.3f}" for a in anatomies for r in a["scope"]
                                                        if r["name"] == name and r["scope"] == sc) for sc in scopes) + " |")
        out.append("\n| layer | gate sd | top-k mass | r_j spread, x | r_j spread, h | mask difference w1, w3, w2 |\n"
                   "|---|---|---|---|---|---|")
        for layer in range(min(len(a["gates"]) for a in anatomies)):
            g = [a["gates"][layer] for a in anatomies]
            diff = lambda a, m: next(r["mask_difference"] for r in a["mask_difference"]
                                     if r["layer"] == layer and r["matrix"] == m)
            out.append(f"| {layer} | " + " | ".join(join(f.format(x[k]) for x in g) for k, f in (
                ("gate_std", "{:.3f}"), ("topk_mass", "{:.3f}"), ("r_spread_x", "{:.4f}"), ("r_spread_h", "{:.4f}")))
                + " | " + join(", ".join(f"{diff(a, m):.2%}" for m in ("w1", "w3", "w2")) for a in anatomies) + " |")
        out.append("")
    return "\n".join(out)


def hint_worth_table(anatomies: list) -> str:
    """What the router's hint is worth against the noise of the calibration draws, one row per
    anatomy folder (anatomy_summary): routed tokens, then the gate, then Wanda's spread."""
    worth = ["| model | routed tokens: wanda - router-blind wanda, 50% / 2:4 / 70% | gate: moe-pruner - wanda, "
             "50% / 2:4 / 70% | wanda's sd over draws, 50% / 2:4 / 70% |\n|---|---|---|---|"]
    for res in anatomies:
        sm = {(x["setting"], x["name"]): x for x in anatomy_summary(res["anatomy"])}
        worth.append(f"| {res['model']} | " + " / ".join(
            f"{sm[x, 'wanda']['mean'] - sm[x, 'router-blind wanda']['mean']:+.3f}" for x in ANATOMY_SETTINGS) + " | "
            + " / ".join(anatomy_cell(sm[x, "moe-pruner - wanda"]) for x in ANATOMY_SETTINGS) + " | "
            + " / ".join(f"{sm[x, 'wanda']['sd']:.3f}" for x in ANATOMY_SETTINGS) + " |")
    return "\n".join(worth)


def routers_table(evaluations: list, anatomies: list) -> str:
    """The routers side by side, one row per model: their gates (eval_ppl.py --router-stats on the
    held-out windows, ranges over layers), where the gate changes MoE-Pruner's mask (the anatomy's
    r_j spread and mask difference at 50%), and what the router's hint is worth (hint_worth_table)."""
    stats = {r["model"]: r["router"] for r in evaluations}
    gates = ["| model | experts, top-k, gates | top-k mass | gate entropy | an expert's gate CV | r_j spread, x / h "
             "| mask difference at 50%, w1 / w3 / w2 |\n|---|---|---|---|---|---|---|"]
    for res in anatomies:
        m, c, a = res["model"], res["config"], res["anatomy"]
        if m not in stats:
            raise data.DataError(f"no router statistics of {m} among the evaluations")
        st = stats[m]
        diff = lambda kind: [r["mask_difference"] for r in a["mask_difference"] if r["matrix"] == kind]
        gates.append(
            f"| {m} | {c['num_local_experts']}, top-{c['num_experts_per_tok']}, "
            f"{'renormalised' if c.get('norm_topk_prob', True) else 'not renormalised'} | "
            + " | ".join(value_range((x[k] for x in st), ".2f") for k in ("topk_mass", "gate_entropy", "expert_gate_cv"))
            + " | " + " / ".join(value_range((g[k] for g in a["gates"]), ".1%") for k in ("r_spread_x", "r_spread_h"))
            + " | " + " / ".join(value_range(diff(kind), ".1%") for kind in ("w1", "w3", "w2")) + " |")
    return "\n".join(gates) + "\n\n" + hint_worth_table(anatomies)


def facts(res: dict) -> dict:
    """The numbers the documents quote in their sentences, by name, formatted as quoted: a sentence
    holds <!-- value FOLDER NAME -->6.118<!-- end --> and render_document keeps it equal to the results."""
    out = {"minutes": f"{res['total_minutes']:.0f}", "dense": f"{res['dense_ppl']:.3f}",
           "eval-windows": str(res["eval_windows"]), "eval-windows-in-text": str(res.get("eval_windows_in_text"))}
    if res.get("machine"):
        out["machine"] = machine_line(res["machine"])
    if res.get("dense_ppl_all") is not None:
        out["dense-all"] = f"{res['dense_ppl_all']:.3f}"
    ppl = {}
    for r in res.get("runs", []):
        if r["part"] in ("table", "sparsity"):
            ppl[r["method"], setting(r)] = r["ppl"]
            out[f"ppl:{r['method']}:{setting(r)}"] = f"{r['ppl']:.3f}"
            if "ppl_all" in r:
                out[f"all:{r['method']}:{setting(r)}"] = f"{r['ppl_all']:.3f}"
        if r["part"] == "calibration":
            out[f"ppl:{r['method']}:n={r['nsamples']}"] = f"{r['ppl']:.3f}"
    gains = {x: ppl["moe-pruner", x] - ppl["wanda", x] for (m, x) in ppl if m == "wanda" and ("moe-pruner", x) in ppl}
    for x, g in gains.items():
        out[f"gain:{x}"] = f"{g:+.3f}"
        out[f"gain%:{x}"] = f"{-g / ppl['wanda', x]:.2%}"
    upto70 = [abs(g) / ppl["wanda", x] for x, g in gains.items() if not x.endswith("%") or float(x[:-1]) <= 70]
    if upto70:  # how far apart MoE-Pruner and Wanda are at most, up to 70% (N:M included), of Wanda's perplexity
        out["gain-bound:70%"] = f"{max(upto70):.2%}"
    decided = [abs(g) / ppl["wanda", x] for x, g in gains.items() if x != "80%"]
    if decided:  # the same at every setting but 80%, where both are past use
        out["gain-bound:below-80%"] = f"{max(decided):.2%}"
    for (m, x), v in ppl.items():
        out[f"cost:{m}:{x}"] = f"{v / res['dense_ppl'] - 1:+.1%}"  # perplexity over dense
    whole = {(r["method"], setting(r)): r["ppl_all"] for r in find(res, "table") if "ppl_all" in r}
    for x in {x for m, x in whole}:
        if ("wanda", x) in whole and ("moe-pruner", x) in whole:
            out[f"gain-all:{x}"] = f"{whole['moe-pruner', x] - whole['wanda', x]:+.3f}"
    for r in res.get("owl", []):
        key = f"{r['method']}:{r['sparsity']:.0%}"
        out[f"owl:{key}:{r['layer_sparsity']}"] = f"{r['ppl']:.3f}"
        if r.get("layer_output_errors"):
            out[f"layer-errors:{key}:{r['layer_sparsity']}"] = " / ".join(f"{e:.3f}" for e in r["layer_output_errors"])
        if r.get("owl_outlier_ratios"):
            out[f"owl-layers:{key}"] = " / ".join(f"{v:.3f}" for v in r["layer_sparsities"])
            out[f"owl-outliers:{key}"] = value_range(r["owl_outlier_ratios"], ".2%")
    for r in res.get("distill", []):
        key = f"{r['method']}:{r['sparsity']}:{r['mode']}:{r['loss']}"
        out[f"kd:{key}"] = f"{r['distilled_ppl']:.3f}"
        out[f"kd-gap:{key}"] = f"{r['gap_recovered']:.1%}"
        out[f"kd-cost:{key}"] = f"{r['distilled_ppl'] / r['dense_ppl'] - 1:+.1%}"  # perplexity over dense
        out[f"kd-pruned-cost:{key}"] = f"{r['pruned_ppl'] / r['dense_ppl'] - 1:+.1%}"
        out[f"kd-minutes:{key}"] = f"{r['seconds'] / 60:.0f}"
        if r.get("lambda") is not None:
            out[f"kd-lambda:{key}"] = f"{r['lambda']:.2f}"
    if res.get("distill"):
        gaps = [r["gap_recovered"] for r in res["distill"] if r["mode"] == "full" and r["loss"] == "eq10"]
        out["kd-gap-range"] = value_range(gaps, ".0%")
    if res.get("dtype"):
        d = res["dtype"]
        out["dtype-mask"] = f"{d['mask_difference']:.3%}"
        for k in ("float32", "bfloat16"):
            out[f"dtype-ppl:{k}"] = f"{d[k]['ppl']:.4f}"
            out[f"dtype-seconds:{k}"] = f"{d[k]['prune_seconds']:.0f}"
    for r in res.get("rounding", []):
        out[f"rounding:{r['setting']}:{'rounded' if r['round_updates'] else 'float32'}"] = f"{r['ppl']:.3f}"
    for r in res.get("expert_level", []):
        out[f"expert:{r['variant'].replace(' ', '_')}"] = f"{r['ppl']:.3f}"
        out[f"expert-cost:{r['variant'].replace(' ', '_')}"] = f"{r['ppl'] / res['dense_ppl'] - 1:+.1%}"
        out[f"expert-MB:{r['variant'].replace(' ', '_')}"] = f"{r['expert_fp16_MB']:.1f}"
        out[f"expert-params:{r['variant'].replace(' ', '_')}"] = f"{r['expert_params_fraction']:.1%}"
    if res.get("anatomy"):
        a = res["anatomy"]
        sm = {(x["setting"], x["name"]): x for x in anatomy_summary(a)}
        for x in ANATOMY_SETTINGS:
            out[f"hint-routed:{x}"] = f"{sm[x, 'router-blind wanda']['mean'] - sm[x, 'wanda']['mean']:.3f}"
            out[f"hint-gate:{x}"] = f"{-sm[x, 'moe-pruner - wanda']['mean']:.3f}"
        paired = [sm[x, "moe-pruner - wanda"] for x in ANATOMY_SETTINGS]
        out["hint-wins"] = f"{sum(p['wins'] for p in paired)} of {sum(p['draws'] for p in paired)}"
        out["mask-difference"] = value_range((r["mask_difference"] for r in a["mask_difference"]), ".1%")
        spread = lambda key, fmt: value_range((g[key] for g in a["gates"]), fmt)
        out["topk-mass"] = spread("topk_mass", ".2f")
        out["gate-sd"] = spread("gate_std", ".2f")
        out["r-spread-x"] = spread("r_spread_x", ".1%")
        out["r-spread-h"] = spread("r_spread_h", ".1%")
        for kinds, name in ((("w1", "w3"), "w1w3"), (("w2",), "w2")):
            d = [r["mask_difference"] for r in a["mask_difference"] if r["matrix"] in kinds]
            out[f"mask-difference:{name}"] = value_range(d, ".1%")
        for x in ANATOMY_SETTINGS:
            p = sm[x, "moe-pruner - wanda"]
            out[f"paired:{x}"] = anatomy_cell(p)
            out[f"hint-gate%:{x}"] = f"{-p['mean'] / sm[x, 'wanda']['mean']:.2%}"
            out[f"wins:{x}"] = f"{p['wins']} of {p['draws']}"
            for name in ("router-blind wanda", "wanda", "moe-pruner"):
                out[f"sd:{name.replace(' ', '-')}:{x}"] = f"{sm[x, name]['sd']:.3f}"
        for r in a["scope"]:
            out[f"scope:{r['name'].replace(' ', '-')}:{r['scope']}"] = f"{r['ppl']:.3f}"
    return out


def evaluation_facts(results: list) -> dict:
    """The numbers of an eval_ppl.py or zeroshot.py --json file (one model or a list) that documents
    quote, by model."""
    if isinstance(results, dict) and "runs" in results and "rates" in results:  # python -m bench.scale
        return bench_scale.facts(results)
    if isinstance(results, dict) and "runs" in results and "transformers" in results:  # python -m bench.forward
        return bench_forward.facts(results)
    out = {}
    for r in results if isinstance(results, list) else [results]:
        m = r["model"]
        if "acc" in r:  # zeroshot.py
            out[f"acc:{m}"], out[f"acc_norm:{m}"] = f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}"
            continue
        out[f"ppl:{m}"] = f"{r['ppl']:.3f}"
        out[f"windows:{m}"] = str(r["windows"])
        for x in r.get("router", []):
            shares = [c / sum(x["top1_counts"]) for c in x["top1_counts"]]
            out[f"load-cv:{m}:{x['layer']}"] = f"{x['load_cv']:.3f}"
            out[f"smallest-share:{m}:{x['layer']}"] = f"{min(shares):.1%}"
            out[f"topk-mass:{m}:{x['layer']}"] = f"{x['topk_mass']:.3f}"
            out[f"gate:{m}:{x['layer']}"] = f"{x['top1_gate_mean']:.3f} +- {x['top1_gate_std']:.3f}"
        if r.get("router"):
            mass = [x["topk_mass"] for x in r["router"]]
            cv = [x["load_cv"] for x in r["router"]]
            out[f"topk-mass:{m}"] = value_range(mass, ".2f")
            out[f"topk-mass%:{m}"] = value_range(mass, ".0%")
            out[f"load-cv:{m}"] = value_range(cv, ".2f")
            for k in ("top1_gate_mean", "top1_gate_std", "gate_entropy", "expert_gate_cv"):
                if all(k in x for x in r["router"]):
                    out[f"{k.replace('_', '-')}:{m}"] = value_range((x[k] for x in r["router"]), ".2f")
    return out


def path_value(obj, key: str) -> str:
    """The value a marker KEY of the form PATH|FORMAT names in any JSON file: PATH dotted into its
    objects and lists (previous.router_calib.0.load_cv), FORMAT as format() takes it (.2f; a list is
    formatted item by item and joined with ', '; *1e-6 before it scales a number, for millions)."""
    path, fmt = key.split("|", 1)
    scale = 1.0
    if fmt.startswith("*"):
        factor, _, fmt = fmt[1:].partition(":")
        scale = float(factor)
    v = obj
    for part in path.split("."):
        try:
            v = v[int(part)] if isinstance(v, list) else v[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise data.DataError(f"no {path!r} in the file (at {part!r})") from None
    one = lambda x: format(x * scale if scale != 1.0 else x, fmt)
    return ", ".join(one(x) for x in v) if isinstance(v, list) else one(v)


# the tables of the benchmarks' --json files
BENCH_TABLES = {"scale": bench_scale.markdown, "prune-memory": bench_prune_memory.markdown,
                "forward": bench_forward.markdown, "distributed-memory": bench_distributed.markdown}


def render_document(text: str, root: str = data.REPO) -> str:
    """A Markdown document with its results copied in anew: every block between
    <!-- table FOLDER SECTION --> and <!-- end table --> becomes that section of FOLDER/results.json
    (FOLDER+FOLDER... with SECTION 'compare': the runs side by side; an eval_ppl.py --json file with
    SECTION 'eval': its table; with SECTION 'routers', an eval_ppl.py --router-stats --json file then
    anatomy folders: the routers side by side; with SECTION 'worth', anatomy folders: what the
    router's hint is worth on each), and every value between <!-- value FOLDER NAME --> and <!-- end -->
    becomes facts(FOLDER's results)[NAME] (evaluation_facts for a .json file; path_value for a NAME
    PATH|FORMAT, which reads any JSON file, e.g. a model's report.json); every block between
    <!-- help SCRIPT --> and <!-- end help --> becomes that script's --help. FOLDER is relative
    to root. A document rendered from the committed results is itself: the test of that
    keeps every table and number in README.md and docs/ equal to results/."""
    cache = {}

    def results(folder: str):
        if folder not in cache:
            path = os.path.join(root, folder)
            cache[folder] = read_json(path, "a document's marker") if folder.endswith(".json") else \
                read_results(path, "a document's marker")
        return cache[folder]

    def table(m: re.Match) -> str:
        folders, name = m.group(1).split("+"), m.group(2)
        if name == "compare":
            body = side_by_side([results(f) for f in folders])
        elif name == "routers" and folders[0].endswith(".json"):  # eval_ppl.py --json, then anatomy folders
            body = routers_table(results(folders[0]), [results(f) for f in folders[1:]])
        elif name == "worth":  # anatomy folders
            body = hint_worth_table([results(f) for f in folders])
        elif name == "zeroshot" and len(folders) == 1 and folders[0].endswith(".json"):
            body = zeroshot.markdown_table(results(folders[0]))
        elif name in BENCH_TABLES and len(folders) == 1 and folders[0].endswith(".json"):
            body = BENCH_TABLES[name](results(folders[0]))
        elif name == "eval" and len(folders) == 1 and folders[0].endswith(".json"):
            r = results(folders[0])
            r = r if isinstance(r, list) else [r]
            body = eval_ppl.markdown_table(r, all("router" in x for x in r), speed=False)
        else:
            section = SECTIONS.get(name)
            if section is None or len(folders) != 1:
                raise data.DataError(f"unknown table {m.group(1)} {name!r}; choose from compare, routers, worth, eval, zeroshot, "
                                     + ", ".join(BENCH_TABLES) + ", "
                                     + ", ".join(SECTIONS))
            body = section(results(folders[0]))
        return f"<!-- table {m.group(1)} {name} -->\n{body.strip()}\n<!-- end table -->"

    def value(m: re.Match) -> str:
        if "|" in m.group(2):
            return f"<!-- value {m.group(1)} {m.group(2)} -->{path_value(results(m.group(1)), m.group(2))}<!-- end -->"
        f = evaluation_facts(results(m.group(1))) if m.group(1).endswith(".json") else facts(results(m.group(1)))
        if m.group(2) not in f:
            raise data.DataError(f"{m.group(1)} has no value {m.group(2)!r}; it has {', '.join(sorted(f))}")
        return f"<!-- value {m.group(1)} {m.group(2)} -->{f[m.group(2)]}<!-- end -->"

    text = re.sub(r"<!-- table (\S+) (\S+) -->\n.*?<!-- end table -->", table, text, flags=re.S)
    text = re.sub(r"<!-- help (\S+) -->\n.*?<!-- end help -->",
                  lambda m: f"<!-- help {m.group(1)} -->\n```text\n{help_text(m.group(1)).strip()}\n```\n<!-- end help -->",
                  text, flags=re.S)
    return re.sub(r"<!-- value (\S+) (\S+) -->.*?<!-- end -->", value, text)


HELP_WIDTH = 100  # --help as docs/command-line.md shows it: argparse wraps at the terminal's width, here fixed


def help_text(script: str) -> str:
    """A script's --help, less its description (the module's docstring), as a terminal HELP_WIDTH
    columns wide shows it, from the parser it builds (build_parser, which needs no torch)."""
    module = importlib.import_module(script[:-3].replace("/", "."))
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_WIDTH)
    try:
        p = module.build_parser()
        p.prog, p.description = script, None
        return p.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def documents(root: str = data.REPO) -> list:
    """The documents whose numbers come from results/: README.md and docs/*.md."""
    docs = os.path.join(root, "docs")
    return [os.path.join(root, "README.md")] + sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))


# One look per method in every figure: colour, marker, line (Wanda dashed with open markers, so
# that MoE-Pruner's line, often within 0.1% of it, never hides it).
STYLE = {"magnitude": dict(color="tab:gray", marker="v", linestyle="-"),
         "wanda": dict(color="tab:blue", marker="o", linestyle="--", markerfacecolor="none", markersize=8),
         "sparsegpt": dict(color="tab:green", marker="s", linestyle="-"),
         "moe-pruner": dict(color="tab:red", marker="x", linestyle="-", markersize=7)}


def readable_log_axis(axis):
    """Plain tick labels (6, 8, 10, 20) on a log axis instead of 6x10^0, 2x10^1."""
    from matplotlib.ticker import FuncFormatter, LogLocator
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(plt.NullFormatter())


def plots(res: dict, out_dir: str) -> list:
    """The figures, as PNG files in out_dir; returns their names (none without matplotlib)."""
    if plt is None:
        log("matplotlib not installed: no plots (pip install matplotlib)")
        return []
    written = []

    def save(fig, fn):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fn), dpi=110)
        plt.close(fig)
        written.append(fn)
    title = os.path.basename(os.path.normpath(res["model"]))
    ylabel = f"perplexity ({res['eval_windows']} held-out windows x {res['seqlen']} tokens)"
    for part, x, xlabel, methods, fn in (("sparsity", "sparsity", "expert sparsity", METHODS, "sparsity_sweep.png"),
                                         ("calibration", "nsamples", "calibration windows (50% sparsity)",
                                          CALIB_METHODS, "calibration_sweep.png")):
        runs = [r for r in res.get("runs", []) if r["part"] == part]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for m in methods:
            pts = sorted((r[x], r["ppl"]) for r in runs if r["method"] == m)
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=m, alpha=0.85, **STYLE[m])
        ax.axhline(res["dense_ppl"], color="black", linestyle=":", linewidth=1, label="dense")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if part == "calibration":
            ax.set_xscale("log", base=2)
            xs = sorted({r[x] for r in runs})
            ax.set_xticks(xs, [str(v) for v in xs])
        else:
            ax.set_yscale("log")
            readable_log_axis(ax.yaxis)
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        ax.set_title(f"{title}: {'Figure 5' if part == 'sparsity' else 'Figure 4'} in shape")
        save(fig, fn)
    if res.get("anatomy"):
        a = res["anatomy"]
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        span = [max(v) - min(v) for v in ([g[k] for g in a["gates"] for k in ("r_spread_x", "r_spread_h")],
                                          [r["mask_difference"] for r in a["mask_difference"]])]
        # w1 and w3 share their input x, so their points nearly coincide: w1 large and hollow, w3 small and solid
        for kind, key, style in (("w1", "r_spread_x", dict(marker="o", s=90, facecolors="none", edgecolors="tab:blue")),
                                 ("w3", "r_spread_x", dict(marker="o", s=18, color="tab:orange")),
                                 ("w2", "r_spread_h", dict(marker="^", s=40, color="tab:green"))):
            xs = [g[key] for g in a["gates"]]
            ys = [r["mask_difference"] for g in a["gates"] for r in a["mask_difference"]
                  if r["layer"] == g["layer"] and r["matrix"] == kind]
            ax.scatter(xs, ys, label=kind, **style)
            if kind != "w3":  # w3's labels would sit on w1's
                for g, xv, yv in zip(a["gates"], xs, ys):
                    # right of the point, or above it where another point lies under the label (about a
                    # tenth of the axes' width, a thirtieth of their height)
                    crowded = any(0 < x2 - xv < 0.1 * span[0] and abs(y2 - yv) < 0.03 * span[1] for x2, y2 in zip(xs, ys))
                    ax.annotate(f"layer {g['layer']}", (xv, yv), fontsize=7, textcoords="offset points",
                                **(dict(xytext=(0, 7), ha="center") if crowded else dict(xytext=(6, -3))))
        ax.set_xlabel("spread of r_j = ||X_j Gate|| / ||X_j|| over input columns (CV)")
        ax.set_ylabel("weights whose 50% mask differs,\nMoE-Pruner vs Wanda")
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.1%}"))
        ax.grid(alpha=0.3)
        ax.legend(title="matrix")
        ax.set_title(f"{title}: where the gate changes the mask")
        save(fig, "anatomy.png")
    if res.get("expert_level"):
        fig, ax = plt.subplots(figsize=(7.5, 5))
        rows = sorted(res["expert_level"], key=lambda r: (r["expert_params_fraction"], r["ppl"]))
        for i, r in enumerate(rows):
            kind = ("MoE-Pruner" if r["variant"].startswith("MoE-Pruner") else "dense" if r["variant"] == "dense"
                    else r["variant"].split()[0])
            # REAP hollow: its points can sit on NAEE's (the same budget, close perplexities)
            style = {"MoE-Pruner": dict(marker="s", color="tab:red"), "dense": dict(marker="*", color="black"),
                     "NAEE": dict(marker="^", color="tab:blue"),
                     "REAP": dict(marker="v", facecolors="none", edgecolors="tab:purple", linewidths=1.5),
                     "CD-MoE": dict(marker="D", color="tab:olive")}[kind]
            ax.scatter(r["expert_params_fraction"], r["ppl"], s=60, **style)
            # labels of points at the same x alternate left and right, so that they do not overlap
            left = i % 2 == 1
            ax.annotate(r["variant"], (r["expert_params_fraction"], r["ppl"]), fontsize=7,
                        xytext=(-6 if left else 6, 0), textcoords="offset points", ha="right" if left else "left",
                        va="center")
        ax.set_xlabel("stored expert parameters (nonzero), fraction of dense")
        ax.set_ylabel(ylabel)
        ppls = [r["ppl"] for r in rows]
        if max(ppls) > 3 * min(ppls):  # a log axis only where the perplexities span more than 3x
            ax.set_yscale("log")
            readable_log_axis(ax.yaxis)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
        ax.set_xlim(0.4, 1.08)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"{title}: weight pruning vs expert pruning\n(r = experts kept per layer, of "
                     f"{res['config']['num_local_experts']})", fontsize=10)
        save(fig, "expert_level.png")
    return written


def write_report(results: dict, out: str, folder: str = None) -> str:
    """out/README.md (the tables) and the plots, from the results, written into folder (default:
    out); returns the tables."""
    folder = folder or out
    plotted = plots(results, folder)
    write_output_file(os.path.join(folder, "README.md"), readme(results, out, plotted), overwrite=True)
    return markdown(results)


def captions(results: dict) -> dict:
    """What each plot shows, in a sentence under it in README.md."""
    data_ = f"perplexity on {results['eval_windows']} held-out windows x {results['seqlen']} tokens"
    return {"sparsity_sweep.png": f"Figure 5 in shape: {data_} against the sparsity of every expert matrix, one line "
                                  f"per method, dense dotted (logarithmic perplexity axis).",
            "calibration_sweep.png": f"Figure 4 in shape: {data_} at 50% against the number of calibration windows "
                                     f"(the first n of the shared ones), dense dotted.",
            "anatomy.png": "Where the router's gate changes the mask: for each layer and expert matrix, the fraction of "
                           "weights whose 50% mask differs between MoE-Pruner and Wanda, against the spread of "
                           "r_j = ||X_j Gate|| / ||X_j|| over its input columns (w1 and w3 share their input).",
            "expert_level.png": f"Weight pruning against expert pruning: {data_} against the stored nonzero expert "
                                f"parameters; r = experts kept per layer (NAEE, REAP), CD-MoE condenses layers."}


def readme(results: dict, out: str, plotted: list) -> str:
    """The text of out/README.md: the command, the tables, the plots with their captions."""
    command = results.get("command") or f"python run_paper.py --parts {','.join(results['parts'])} --out {out}"
    caption = captions(results)
    return (f"# Results\n\nWritten by `{command}` ({results['total_minutes']:.0f} minutes); results.json holds "
            f"every number.\n\n{markdown(results)}\n" + "".join(f"\n![{fn[:-4]}]({fn})\n\n{caption[fn]}\n"
                                                                for fn in plotted))


def read_json(path: str, flag: str):
    """A JSON file a flag or a document names, or one error line."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise data.DataError(f"{flag}: no {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise data.DataError(f"{flag}: {path} is not readable JSON ({e})") from None


def read_results(folder: str, flag: str) -> dict:
    """folder/results.json, for a flag that runs nothing (--replot, --compare)."""
    path = os.path.join(folder, "results.json")
    res = read_json(path, flag)
    missing = [k for k in ("model", "dense_ppl") if not isinstance(res, dict) or k not in res]
    if missing:
        raise data.DataError(f"{flag}: {path} is not a run_paper.py results file (no {missing[0]!r})")
    return res


def results_folders(root: str = data.REPO) -> list:
    """Every folder under results/ that holds a run_paper.py results.json."""
    top = os.path.join(root, "results")
    return [d for d, _, files in sorted(os.walk(top)) if "results.json" in files]


def rewrite_documents(root: str = data.REPO) -> list:
    """Every marker of README.md and docs/*.md filled anew; returns the documents that changed."""
    changed = []
    for path in documents(root):
        with open(path) as f:
            text = f.read()
        new = render_document(text, root)
        if new != text:
            write_output_file(path, new, overwrite=True)
            changed.append(data.shown_path(path))
    return changed


def documents_line(changed: list) -> str:
    return "rewritten: " + (", ".join(changed) if changed else "nothing (every document is current)")


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        if a.compare:
            return print(side_by_side([read_results(d, "--compare") for d in a.compare]))
        if a.out:
            return print(write_report(read_results(a.out, "--out"), a.out))
        if plt is None:
            log("matplotlib not installed: the results folders' README.md and plots are left as they are "
                "(pip install matplotlib)")
        else:
            for folder in results_folders():
                write_report(read_results(folder, "results/"), data.shown_path(folder))
        changed = rewrite_documents()
        print(documents_line(changed))


if __name__ == "__main__":
    main()
