"""
Perplexity with the standard protocol of the pruning literature, plus router statistics.

Protocol (SparseGPT / Wanda / MoE-Pruner evaluation code): tokenise the whole text once with
the model's tokenizer.json, cut it into non-overlapping windows of seqlen tokens (2048 in the
literature; never max_position_embeddings, 32768 for Mixtral), drop the tail, and report
    ppl = exp(mean next-token negative log-likelihood over all windows)
(each window predicts its tokens 2..seqlen). Reference: with real Mixtral-8x7B on WikiText-2
at seqlen 2048 MoE-Pruner's Table 2 reports a dense perplexity of 3.84.

Router statistics (MoE-Pruner Section 3.1, Eq. 4-5): per layer, the coefficient of variation
of how often each expert is a token's top-1 choice, and the mean and spread of the top-1
routing weight (the "hint" MoE-Pruner's metric multiplies in).

    python eval_ppl.py                                  # embedded model on the embedded eval split
    python eval_ppl.py --model DIR --eval-data wiki.test.raw --seqlen 2048 --json out.json
"""

import argparse
import math
import sys
import time

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", nargs="+", default=None,
                   help="one or more checkpoint directories (official layout), evaluated on the same windows and "
                        "printed as one table; default: the embedded tiny Mixtral")
    p.add_argument("--eval-data", "--data", dest="eval_data", default="stdlib",
                   help="text to evaluate: a WikiText raw file or directory, a C4 json/json.gz shard, any text file, "
                        "'stdlib' for the embedded corpus's held-out eval split (default), or 'stdlib:calib' "
                        "(stdlib:train) for its calibration (training) split, e.g. to measure the router there"
                        + cli.spelled(("--data",)))
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="with a WikiText directory: wiki.test.raw (Wanda's and SparseGPT's choice, default) or "
                        "wiki.valid.raw (what the MoE-Pruner paper says it used)")
    p.add_argument("--seqlen", type=cli.seqlen, default=None,
                   help="window length in tokens (default 2048 as in the pruning literature, or the model's "
                        "max_position_embeddings if that is smaller, e.g. 512 for the embedded model)")
    cli.add_eval_windows_arg(p, former=("--max-windows",))
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=cli.DTYPES, help="compute dtype")
    cli.add_device_arg(p)
    p.add_argument("--router-stats", action="store_true",
                   help="also report the expert load CV (Eq. 4-5) and top-1 gate statistics per layer")
    p.add_argument("--json", help="write the results to this file: {ppl, windows, tokens, ...} for one model, "
                                  "a list of them for several")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    return p


cli.parse_first(__name__, build_parser)

import torch

import data
import mini_mixtral as mm
from checkpoint import DTYPES, CheckpointReader, read_config
from variants import load_model
from outputs import check_output_file, json_text, write_output_file
from progress import Progress, machine


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8, device="cpu", progress=False):
    """Summed next-token NLL (float64) and the number of predicted tokens over [n, seqlen] windows."""
    total, count, t0 = 0.0, 0, time.time()
    bar = Progress(len(windows), "windows") if progress else None
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)  # [b, seqlen]
        logits = model(x)  # [b, seqlen, vocab]
        nll = mm.next_token_nll(logits, x, reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
        if bar:
            done = min(i + batch_size, len(windows))
            bar.update(done, f"{done * windows.shape[1] / (time.time() - t0):.0f} tok/s")
    if bar:
        bar.close()
    return total, count


def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device="cpu", progress=False) -> float:
    total, count = window_nll(model, windows, batch_size, device, progress)
    mean = total / count
    return math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a float64 past ~709.78


def expert_load_cv(top1_counts: torch.Tensor) -> float:
    """MoE-Pruner Eq. 4-5: coefficient of variation sigma / mu of how often each expert of a layer
    is a token's top-1 choice (population std, as in the paper's definition). 0 = perfectly
    balanced; sqrt(n_experts - 1) = every token picks the same expert."""
    c = top1_counts.double()
    mu = c.mean()
    return float(torch.sqrt(((c - mu) ** 2).mean()) / mu)


def topk_mass(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """[N] each token's top-k probability mass: the router's softmax probability of its k chosen
    experts before renormalisation (k / n_experts for a flat router, 1 for a decisive one)."""
    return torch.softmax(router_logits.float(), -1).topk(k, dim=-1).values.sum(-1)


@torch.no_grad()
def router_stats(model, windows: torch.Tensor, batch_size: int = 8, device="cpu") -> list:
    """Per layer: expert-load CV of top-1 choices (Eq. 4-5), top-1 counts, the top-1 gate's mean
    and standard deviation (the gate the model weights by: renormalised or not), the mean top-k
    probability mass (topk_mass), over all tokens of the windows; and the two spreads of the gates
    that Eq. 9 weights by:
      - gate_entropy: how evenly a token's k gates share its weight, the mean over tokens of the
        entropy of its k gates (scaled to sum to 1) over log k: 1 for equal gates, 0 for one;
      - expert_gate_cv: how much an expert's gate varies over the tokens routed to it, the
        coefficient of variation (std / mean) of each expert's gates, averaged over the experts
        weighted by their routed tokens. Eq. 9 with gates constant within each expert is Wanda's
        metric (an expert's mask does not change when all its gates are scaled alike), so this is
        where MoE-Pruner's weighting can act."""
    cfg = model.config
    L, E, k = cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok
    counts = torch.zeros(L, E, dtype=torch.long, device="cpu")  # the statistics are gathered on the CPU
    gates = [[] for _ in range(L)]
    mass = [[] for _ in range(L)]
    entropy = [[] for _ in range(L)]
    routed, gate_sum, gate_sq = (torch.zeros(L, E, dtype=torch.float64, device="cpu") for _ in range(3))  # per expert
    for i in range(0, len(windows), batch_size):
        _, router_logits = model(windows[i:i + batch_size].to(device), return_router_logits=True)
        for l, rl in enumerate(router_logits):
            if rl is None:  # a CD-MoE condensed layer has no router
                continue
            w, e = mm.route(rl, k, cfg.norm_topk_prob)  # [N, k] as the model weights them
            counts[l] += torch.bincount(e[:, 0].cpu(), minlength=E)
            gates[l].append(w[:, 0].cpu())
            mass[l].append(topk_mass(rl, k).cpu())
            share = (w / w.sum(-1, keepdim=True)).double().cpu()  # [N, k] each token's gates scaled to sum to 1
            entropy[l].append(-(share * share.clamp_min(1e-300).log()).sum(-1) / math.log(k) if k > 1
                              else torch.zeros(len(share), dtype=torch.float64, device="cpu"))
            flat_e, flat_w = e.reshape(-1).cpu(), w.reshape(-1).double().cpu()  # [N * k] every assignment
            routed[l] += torch.bincount(flat_e, minlength=E).double()
            gate_sum[l].index_add_(0, flat_e, flat_w)
            gate_sq[l].index_add_(0, flat_e, flat_w * flat_w)
    out = []
    for l in range(L):
        if not gates[l]:
            continue
        g = torch.cat(gates[l])
        n = routed[l].clamp(min=1)
        mean = gate_sum[l] / n
        std = (gate_sq[l] / n - mean * mean).clamp(min=0).sqrt()  # each expert's gates over its routed tokens
        cv = torch.where(routed[l] > 1, std / mean.clamp(min=1e-300), torch.zeros_like(std))
        out.append({"layer": l, "load_cv": expert_load_cv(counts[l]), "top1_counts": counts[l].tolist(),
                    "top1_gate_mean": g.mean().item(), "top1_gate_std": g.std().item(),
                    "topk_mass": torch.cat(mass[l]).mean().item(),
                    "gate_entropy": torch.cat(entropy[l]).mean().item(),
                    "expert_gate_cv": float((cv * routed[l]).sum() / routed[l].sum())})
    return out


def evaluation_windows(model_dir: str, text: str = "stdlib", split: str = "test", seqlen: int = None,
                       eval_windows: int = None, cache: dict = None) -> tuple:
    """The windows of text tokenised with model_dir's tokenizer (seqlen default: 2048, the
    literature's, capped at the model's context): all of them, or eval_windows of them spread evenly
    over the text (data.sample_windows). cache shares them between models with the same tokenizer,
    so every model sees exactly the same tokens. Returns (windows [n, seqlen], their indices, how
    many windows the whole text has)."""
    config = read_config(model_dir)
    seqlen = seqlen or min(2048, config.max_position_embeddings)
    if seqlen > config.max_position_embeddings:
        raise data.DataError(f"--seqlen {seqlen} exceeds {model_dir}'s max_position_embeddings "
                             f"{config.max_position_embeddings}")
    if seqlen < 2:
        raise data.DataError("--seqlen must be at least 2")
    tok = data.load_tokenizer(model_dir)
    cache = {} if cache is None else cache
    key = (tok.to_str(), seqlen)
    if key not in cache:
        ids = data.encode(tok, data.text_source(data.resolve_wikitext(text, split), "eval"))
        every = data.eval_windows(ids, seqlen)  # [N, seqlen]
        cache[key] = (*data.sample_windows(every, eval_windows), len(every))
    windows, indices, total = cache[key]
    if windows.max() >= config.vocab_size:
        raise data.DataError(f"{model_dir}: tokenizer produced id {windows.max()} >= vocab_size {config.vocab_size}")
    return windows, indices, total


def evaluate(model_dir: str, windows: torch.Tensor, dtype: str = "float32", device: str = "cpu",
             batch_size: int = 8, router: bool = False) -> dict:
    """Perplexity (and router statistics) of one checkpoint on the given windows."""
    model = load_model(model_dir, DTYPES[dtype], device, allow_nonfinite=True)
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        print(f"warning: {model_dir}: {len(bad)} weight tensors are not finite (first: {bad[0]}); the perplexity "
              f"below is of those weights", file=sys.stderr)
    print(f"{model_dir}: {len(windows)} windows x {windows.shape[1]} tokens", file=sys.stderr)
    t0 = time.time()
    ppl = perplexity(model, windows, batch_size, device, progress=True)
    dt = time.time() - t0
    result = {"model": data.shown_path(model_dir), "ppl": ppl, "windows": len(windows), "tokens": windows.numel(),
              "seqlen": windows.shape[1], "tokens_per_s": windows.numel() / dt}
    if router:
        result["router"] = router_stats(model, windows, batch_size, device)
        result["load_cv_mean"] = sum(r["load_cv"] for r in result["router"]) / len(result["router"])
    return result


def markdown_table(results, router=False, speed=True):
    """The results as one table; router adds the load CV, top-k mass and the gates' two spreads per
    layer (router_stats; the spreads where every result has them), speed the tokens/s."""
    spreads = router and all("expert_gate_cv" in x for r in results for x in r["router"])
    head = ("| model | perplexity | windows (of the text's) x seqlen |" + (" tok/s |" if speed else "")
            + (" load CV (Eq. 4-5), mean / per layer | top-k mass per layer |" if router else "")
            + (" gate entropy per layer | an expert's gate CV per layer |" if spreads else ""))
    lines = [head, "|---" * head.count(" |") + "|"]
    for r in results:
        row = (f"| {r['model']} | {r['ppl']:.3f} | {r['windows']} (of {r.get('windows_in_text', r['windows'])}) x "
               f"{r['seqlen']} |" + (f" {r['tokens_per_s']:.0f} |" if speed else ""))
        if router:
            per_layer = ", ".join(f"{x['load_cv']:.2f}" for x in r["router"])
            mass = ", ".join(f"{x['topk_mass']:.3f}" for x in r["router"])
            row += f" {r['load_cv_mean']:.3f} / {per_layer} | {mass} |"
        if spreads:
            row += "".join(" " + ", ".join(f"{x[k]:.3f}" for x in r["router"]) + " |"
                           for k in ("gate_entropy", "expert_gate_cv"))
        lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    results, cache = [], {}
    with cli.errors():
        models, where = args.model or [data.default_model_dir()], machine()
        if args.json:
            check_output_file(args.json, args.overwrite, [*models, data.input_path(args.eval_data)])
        for model_dir in models:  # every model's headers and tokenizer, before minutes of work on the first
            CheckpointReader(model_dir, allow_nonfinite=True, allow_variants=True)
            data.load_tokenizer(model_dir)
        for model_dir in models:
            windows, indices, total = evaluation_windows(model_dir, args.eval_data, args.split, args.seqlen,
                                                         data.eval_window_count(args.eval_data, args.eval_windows),
                                                         cache)
            results.append({**evaluate(model_dir, windows, args.dtype, args.device, args.batch_size,
                                       args.router_stats), "data": args.eval_data, "windows_in_text": total,
                            "machine": where,
                            "window_indices": indices})
        if args.json:
            write_output_file(args.json, json_text(results[0] if len(results) == 1 else results), args.overwrite)
        print(markdown_table(results, args.router_stats))
        r = results[0]
        print(f"perplexity on {r['windows']} of the {r['windows_in_text']} windows of {r['data']} x {r['seqlen']} tokens"
              + (f", spread evenly: the sample of README.md's tables (--eval-windows 0 evaluates all {r['windows_in_text']})"
                 if data.is_embedded(args.eval_data) and r["windows"] < r["windows_in_text"] else ""))
        bad = [r["model"] for r in results if not math.isfinite(r["ppl"])]
        if bad:
            raise data.DataError(f"the perplexity of {bad[0]} is not a finite number (its value is in the table"
                                 + (f" and, spelled out, in {args.json}" if args.json else "") + ")")
    if args.router_stats:
        for r in results:
            for x in r["router"]:
                print(f"{r['model']} layer {x['layer']}: load CV {x['load_cv']:.3f}, smallest top-1 share "
                      f"{100 * min(x['top1_counts']) / sum(x['top1_counts']):.1f}%, top-1 gate "
                      f"{x['top1_gate_mean']:.3f} +- {x['top1_gate_std']:.3f}, top-k probability mass "
                      f"{x['topk_mass']:.3f}, gate entropy {x['gate_entropy']:.3f}, an expert's gate CV "
                      f"{x['expert_gate_cv']:.3f}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
