"""
Expert-level baselines from the related papers: remove or skip whole experts instead of weights.

NAEE, "Not All Experts are Equal" (Lu et al. 2024, arXiv 2402.14800):
  - expert pruning (Section 3.1): for each layer, on cached calibration inputs of its MoE block,
    try every subset of r kept experts out of n (28 subsets for r=6 of 8, 70 for r=4); a dropped
    expert's router logit is set to -inf, so tokens re-route to the top-k of the kept experts
    (renormalised where the model renormalises); keep the subset whose block output is closest to
    the original. Beyond NAEE_SUBSETS subsets (C(64, 56) is 4.4e9 for a fine-grained model) the
    search is greedy: drop, one at a time, the expert whose removal changes the output least. The
    distance is the sum over
    calibration windows of the (unsquared) Frobenius norm of the difference, as the reference
    code (Lucky-Lance/Expert_Sparsity, wrapper.enumerate) computes it: one norm per batch of 8
    windows (--batch-size), summed over the batches. The result is a smaller
    Mixtral (num_local_experts = r, router rows sliced, experts re-indexed) in the official
    layout, which transformers loads too.
  - dynamic skipping (Section 3.2): with top-2 weights g0 >= g1, skip the second expert when
    g1 < beta * g0; beta per layer = the median of g1 / g0 over calibration tokens (so about half
    the tokens skip). Stored as config.json's dynamic_skip_beta; variants.load_model installs a
    SkippingMoeBlock where a checkpoint asks for it (transformers ignores the field).
Layers are processed one at a time as in prune.py (layerwise.py). --protocol layerwise (the
reference's layerwise_pruning, default) chooses every layer's experts on the *dense* model's
inputs and outputs (X and Z of every MoE block cached from the unpruned model); --protocol
progressive (its progressive_pruning) feeds layer l the outputs of the already-pruned layers
0..l-1 and targets the dense model's block outputs (Z cached once from the unpruned model).

REAP, Router-weighted Expert Activation Pruning (arXiv 2510.13999; llm-compressor's
REAPPruningModifier), with --select reap: an expert's saliency is the mean, over the calibration
tokens routed to it, of its router probability (softmax before top-k renormalisation) x
||expert output||_2; the r most salient experts of each layer are
kept, and the output is sliced and re-indexed as NAEE's is. The expert-level use of the router's
hint that MoE-Pruner uses at the level of weights.

CD-MoE, "Condense, Don't Just Prune" (Cao et al. 2024, arXiv 2412.00069), adapted to Mixtral,
which has no shared experts: a condensed layer runs k fixed routed experts on every token, each
weighted by its mean gate over the calibration tokens routed to it (sum of gates / routing
count, as the reference's step_1_get_weight/get_weight.py computes it; about 4x the mean over
all tokens for top-2 of 8), and skips its router. The k experts are chosen greedily per layer, each step adding the expert that minimises
the Jensen-Shannon divergence between the original and condensed layer outputs (softmax over the
hidden dimension, averaged over tokens); the layers to condense are chosen greedily by the same
divergence at the final hidden state. Stored as config.json's condensed_layers, run by a
CondensedMoeBlock (the official tensors are kept whole; the report counts the dropped experts as
removed).

    python expert_prune.py --keep-experts 6 --out out/naee-r6
    python expert_prune.py --keep-experts 6 --skip --out out/naee-r6-skip
    python expert_prune.py --keep-experts 6 --select reap --out out/reap-r6
    python expert_prune.py --condense-layers 2 --condense-experts 2 --out out/cdmoe-2x2
"""

import argparse
import itertools
import math
import time
from dataclasses import dataclass

import cli


# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


PROTOCOLS = ("layerwise", "progressive")
SELECTIONS = ("naee", "reap")  # how the r kept experts are chosen


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="input checkpoint directory; default: the embedded tiny Mixtral")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--keep-experts", "--r", dest="keep_experts", type=cli.positive_int, default=None,
                   help="NAEE / REAP: experts kept per layer, NAEE's r (default: all)" + cli.spelled(("--r",)))
    p.add_argument("--skip", action="store_true", help="NAEE dynamic skipping, beta = median g1/g0 per layer")
    p.add_argument("--select", default="naee", choices=SELECTIONS,
                   help="with --r: keep the r experts whose subset changes the layer output least (NAEE, default) "
                        "or the r of highest REAP saliency (mean gate x output norm over routed tokens)")
    p.add_argument("--protocol", default="layerwise", choices=PROTOCOLS,
                   help="NAEE: choose each layer's experts on the dense model's inputs and outputs (layerwise, the "
                        "reference default) or on inputs through the already-pruned layers (progressive)")
    p.add_argument("--condense-layers", type=cli.nonnegative_int, default=0, help="CD-MoE: how many layers to condense")
    p.add_argument("--condense-experts", type=cli.positive_int, default=2,
                   help="CD-MoE: always-on experts per condensed layer")
    cli.add_calibration_args(p, nsamples_help="calibration windows (NAEE: 128)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="windows per forward pass")
    cli.add_device_arg(p)
    p.add_argument("--dtype", default="float32", choices=cli.COMPUTE_DTYPES,
                   help="compute dtype of every forward: bfloat16 runs the matrix products in bfloat16 (autocast; the "
                        "weights stay exact, errors and saliencies are accumulated in float64); fast only on CPUs with "
                        "AMX or AVX-512 BF16 and on GPUs")
    cli.add_recipe_arg(p, "expert_prune_report.json")
    return p


cli.parse_first(__name__, build_parser)

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import mini_mixtral as mm
from checkpoint import CheckpointReader, CheckpointWriter, save_model
from checkpoint import load_model as load_plain_model
from layerwise import Positions, compute_dtype, embed_windows, layers, run_layer
from outputs import check_output
from progress import log
from variants import CondensedMoeBlock, condensed_layers, skip_betas, skip_second


# -----------------------------------------------------------------------------
# NAEE


NAEE_SUBSETS = 5000  # the most subsets tried one by one: C(16, 12) = 1820 is; C(32, 24) = 1.05e7 is not


def masked_route(router_logits, keep, top_k, renormalise=True):
    """Route with every expert outside `keep` at logit -inf: the top-k of the kept experts,
    renormalised as the model routes (NAEE's re-routing after dropping)."""
    dropped = torch.ones(router_logits.shape[-1], dtype=torch.bool, device=router_logits.device)
    dropped[list(keep)] = False
    return mm.route(router_logits.masked_fill(dropped, float("-inf")), top_k, renormalise)


@torch.no_grad()
def subset_errors(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, subsets: list, batch_size: int,
                  target_x: torch.Tensor = None):
    """NAEE's criterion for each subset of kept experts: the Frobenius norm (not squared) of the
    change in the MoE block's output on one batch of batch_size calibration windows, summed over
    the batches (the reference's enumerate(): one norm per cached forward, of 8 windows by default).
    x: [n, T, hidden] the layer's inputs; target_x: the inputs whose unpruned block output Z is the
    target (the dense model's, for the progressive protocol), x itself by default.
    Returns errors [n_subsets] float64."""
    block = layer.block_sparse_moe
    errors = torch.zeros(len(subsets), dtype=torch.float64, device="cpu")  # Python-float sums
    moe_input = lambda inputs: layer.post_attention_layernorm(layer.attend(inputs.float(), *pos))
    for i in range(0, len(x), batch_size):
        H = x.shape[-1]
        h = moe_input(x[i:i + batch_size]).reshape(-1, H)  # [N, hidden] the MoE block's input, N = b * T
        logits = block.gate(h)  # [N, n_experts]
        target = h if target_x is None else moe_input(target_x[i:i + batch_size]).reshape(-1, H)
        y = block(target[None])[0][0]  # [N, hidden] Z, the unpruned block's output
        outs = torch.stack([e(h) for e in block.experts], dim=1)  # [N, n_experts, hidden] every expert, every token
        for s, keep in enumerate(subsets):
            w, idx = masked_route(logits, keep, block.top_k, block.renormalise)  # [N, k]
            y_s = (outs.gather(1, idx[:, :, None].expand(-1, -1, H)) * w[:, :, None]).sum(1)  # [N, hidden]
            errors[s] += float((y_s.to(y.dtype) - y).double().pow(2).sum().sqrt())  # ||Z - Z_s||_F of the batch
    return errors


def naee_keep(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, r: int, batch_size: int,
              target_x: torch.Tensor = None) -> dict:
    """NAEE's r kept experts: the subset of least output error among all C(n, r) (Section 3.1), or,
    beyond NAEE_SUBSETS of them, by greedy elimination: n - r rounds, each dropping the expert whose
    removal from the kept set gives the least error. Returns {"keep", "error", "worst_error" (of
    the last round's candidates), "subsets" (errors computed), "search"}."""
    n = len(layer.block_sparse_moe.experts)
    if math.comb(n, r) <= NAEE_SUBSETS:
        subsets = list(itertools.combinations(range(n), r))
        errors = subset_errors(layer, x, pos, subsets, batch_size, target_x)
        best = int(errors.argmin())
        return {"keep": list(subsets[best]), "error": errors[best].item(), "worst_error": errors.max().item(),
                "subsets": len(subsets), "search": "exhaustive"}
    keep, tried = tuple(range(n)), 0
    while len(keep) > r:
        subsets = [tuple(e for e in keep if e != drop) for drop in keep]  # each kept expert dropped in turn
        errors = subset_errors(layer, x, pos, subsets, batch_size, target_x)
        keep, tried = subsets[int(errors.argmin())], tried + len(subsets)
    return {"keep": list(keep), "error": errors.min().item(), "worst_error": errors.max().item(), "subsets": tried,
            "search": "greedy"}


def slice_experts(block: mm.SparseMoeBlock, keep: list):
    """In place: only the kept experts (re-indexed in order) and the matching router rows."""
    gate = nn.Linear(block.gate.in_features, len(keep), bias=False, device="meta")
    gate.weight = nn.Parameter(block.gate.weight.data[list(keep)])
    block.gate, block.experts = gate, nn.ModuleList(block.experts[e] for e in keep)


def skip_ratios(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, batch_size: int):
    """g1 / g0 of every calibration token's top-2 routing at this layer."""
    ratios = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = layer.post_attention_layernorm(layer.attend(x[i:i + batch_size].float(), *pos))
            w, _ = mm.route(layer.block_sparse_moe.gate(h.reshape(-1, h.shape[-1])), 2)  # h as [N, hidden]
            ratios.append(w[:, 1] / w[:, 0])
    return torch.cat(ratios)


# -----------------------------------------------------------------------------
# REAP


@torch.no_grad()
def reap_saliency(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, batch_size: int) -> torch.Tensor:
    """REAP (Router-weighted Expert Activation Pruning, arXiv 2510.13999): an expert's saliency is the
    mean, over the calibration tokens routed to it, of its router probability times the L2 norm of
    its output, p_e(x) * ||E_e(x)||_2, with p_e the softmax over all experts before the top-k
    renormalisation (the reference's reading for Mixtral, whose router has no norm_topk_prob
    setting). The expert-level analogue of MoE-Pruner's router hint.
    Returns [n_experts] float64 (0 for an expert no token reached)."""
    block = layer.block_sparse_moe
    n = len(block.experts)
    sums, counts = (torch.zeros(n, dtype=torch.float64, device="cpu") for _ in range(2))  # Python-float sums

    def observer(c: mm.ExpertCall):
        prob = torch.softmax(block.gate(c.x).double(), dim=-1)[:, c.expert]  # [routed tokens] p_e, not renormalised
        sums[c.expert] += float((prob * c.y.double().norm(dim=-1)).sum())  # a Python float: sums stay on the CPU
        counts[c.expert] += len(c.tokens)
    run_layer(layer, x, pos, batch_size, observer)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


@dataclass
class ExpertPruning:
    """What drop_experts does (recorded in its report through the command line's arguments)."""

    r: int  # experts kept per layer (NAEE's r; the model's count: none dropped)
    skip: bool = False  # NAEE's dynamic skipping
    select: str = "naee"  # how the r are chosen: NAEE's output error or REAP's saliency
    protocol: str = "layerwise"  # the reference's layerwise_pruning (default) or progressive_pruning
    batch_size: int = 8  # calibration windows per forward (and per NAEE error term, as in the reference)
    device: str = "cpu"
    dtype: str = "float32"  # compute dtype of every forward


def drop_experts(reader: CheckpointReader, tokens: torch.Tensor, how: ExpertPruning, out: str, overwrite: bool = False,
                 log=log, report_extra: dict = None) -> dict:
    """Expert pruning to r experts per layer (r = n: none), the r chosen by NAEE's output error or
    by REAP's saliency (select), and optional dynamic skipping (NAEE).

    protocol "layerwise" (the reference's layerwise_pruning, default): every layer's subset is
    chosen on the inputs and outputs of the *dense* model, so the layers are independent.
    "progressive" (the reference's progressive_pruning): layer l's inputs come through the
    already-pruned layers 0..l-1, the target being the unpruned model's block output (Z cached
    once from the dense model).
    dtype: the compute dtype of every forward (layerwise.compute_dtype); errors and saliencies
    are accumulated in float64 either way."""
    r, skip, select, protocol, batch_size, device, dtype = (how.r, how.skip, how.select, how.protocol, how.batch_size,
                                                            how.device, how.dtype)
    if protocol not in PROTOCOLS:
        raise data.DataError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if select not in SELECTIONS:
        raise data.DataError(f"unknown expert selection {select!r}; choose from {', '.join(SELECTIONS)}")
    config = reader.config
    n, k = config.num_local_experts, config.num_experts_per_tok
    if not k <= r <= n:
        raise data.DataError(f"--keep-experts {r}: must lie in [num_experts_per_tok {k}, num_local_experts {n}]")
    if skip and k != 2:
        raise data.DataError(f"dynamic skipping is defined for top-2 routing; this model routes to {k}")
    new = mm.MixtralConfig.from_dict({**config.to_dict(), "num_local_experts": r})
    x, pos = embed_windows(reader, tokens, device)
    x_dense = x  # the unpruned model's activations (the same tensor as x under the layerwise protocol)
    kept, betas, per_layer = [], [], []
    with CheckpointWriter(out, new, overwrite=overwrite, src_dir=reader.path) as writer, \
            compute_dtype(torch.device(device).type, dtype):
        for l, layer in layers(reader, writer, device):
            t0 = time.time()
            # the unpruned layer's outputs on the dense model's inputs: layer l+1's inputs (layerwise), or
            # the dense stream whose MoE outputs are the targets (progressive)
            dense_next = run_layer(layer, x_dense, pos, batch_size)
            if r < n and select == "reap":  # the r experts of highest saliency, in their original order
                saliency = reap_saliency(layer, x, pos, batch_size)
                keep = sorted(torch.argsort(saliency, descending=True, stable=True)[:r].tolist())
                slice_experts(layer.block_sparse_moe, keep)
                per_layer.append({"layer": l, "keep": keep, "saliency": saliency.tolist()})
            elif r < n:
                chosen = naee_keep(layer, x, pos, r, batch_size, None if protocol == "layerwise" else x_dense)
                keep = chosen["keep"]
                slice_experts(layer.block_sparse_moe, keep)
                per_layer.append({"layer": l, **chosen})
            else:
                keep = list(range(n))
            if skip:
                betas.append(skip_ratios(layer, x, pos, batch_size).median().item())
            kept.append(keep)
            # layer l+1's inputs: the dense layer's outputs (layerwise) or the pruned layer's (progressive)
            x = dense_next if protocol == "layerwise" else run_layer(layer, x, pos, batch_size)
            x_dense = dense_next
            del dense_next
            log(f"layer {l}: keep experts {keep}" + (f", skip beta {betas[-1]:.3f}" if skip else "")
                + f" ({time.time() - t0:.1f}s)")
        if skip:
            writer.config = mm.MixtralConfig.from_dict({**new.to_dict(), "dynamic_skip_beta": betas})
        report = {"method": select, "r": r, "skip": skip, "protocol": protocol, "kept_experts": kept, "skip_beta": betas or None,
                  "layers": per_layer, "calibration_tokens": tokens.numel(), **(report_extra or {})}
        writer.extra_files["expert_prune_report.json"] = report
    return report


# -----------------------------------------------------------------------------
# CD-MoE


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the Jensen-Shannon divergence between softmax(a) and softmax(b) over
    the hidden dimension (CD-MoE's criterion)."""
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    m = torch.logsumexp(torch.stack([la, lb]), 0) - math.log(2.0)
    return (0.5 * (F.kl_div(m, la, log_target=True, reduction="none").sum(-1)
                   + F.kl_div(m, lb, log_target=True, reduction="none").sum(-1))).mean().item()


def routed_gate_means(weights: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """CD-MoE's weight of an always-on expert (reference step_1_get_weight/get_weight.py): the sum of
    its renormalised gates over the calibration tokens routed to it / the number of those tokens,
    i.e. its mean gate *where it is chosen* (0 for an expert no token reached). weights, experts
    [N, k] from route(). Returns [n_experts] float64."""
    flat = experts.reshape(-1)
    sums = torch.zeros(n_experts, dtype=torch.float64, device=flat.device).index_add_(0, flat, weights.reshape(-1).double())
    counts = torch.bincount(flat, minlength=n_experts).double()
    return sums / counts.clamp(min=1)  # an expert no token reached: 0 / 1


@torch.no_grad()
def condense(model: mm.Mixtral, tokens, n_layers: int, n_experts: int, batch_size: int, log):
    """Greedy CD-MoE on a whole model in memory. Returns the condensed_layers config entry."""
    cfg = model.config
    L = cfg.num_hidden_layers
    T = tokens.shape[1]
    cos, sin = mm.rope_cos_sin(cfg, T, tokens.device)
    mask = mm.attention_mask(T, cfg.sliding_window, tokens.device)

    def hidden(condensed):
        """Final hidden states (after the final norm) with `condensed` layers."""
        blocks = [layer.block_sparse_moe for layer in model.model.layers]
        for l, (experts, weights) in condensed.items():
            model.model.layers[l].block_sparse_moe = CondensedMoeBlock(blocks[l], experts, weights)
        outs = []
        for i in range(0, len(tokens), batch_size):
            h = model.model.embed_tokens(tokens[i:i + batch_size])
            for layer in model.model.layers:
                h, _ = layer(h, cos, sin, mask)
            outs.append(model.model.norm(h))
        for layer, block in zip(model.model.layers, blocks):
            layer.block_sparse_moe = block
        return torch.cat(outs)

    # per layer: the experts to keep, on that layer's own (original-model) inputs
    per_layer = {}
    h = model.model.embed_tokens(tokens)  # [n, T, hidden]
    for l, layer in enumerate(model.model.layers):
        block = layer.block_sparse_moe
        a = layer.attend(h, cos, sin, mask)
        moe_in = layer.post_attention_layernorm(a).reshape(-1, cfg.hidden_size)  # [N, hidden]
        y, logits = block(moe_in[None])
        target = a.reshape(-1, cfg.hidden_size) + y[0]  # [N, hidden] the original layer output
        w, idx = mm.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        avg_gate = routed_gate_means(w, idx, cfg.num_local_experts)
        outs = [e(moe_in) for e in block.experts]  # each [N, hidden]
        resid = a.reshape(-1, cfg.hidden_size)  # [N, hidden] the attention half's output
        chosen, cond = [], torch.zeros_like(target)
        for _ in range(n_experts):
            best = min((e for e in range(cfg.num_local_experts) if e not in chosen),
                       key=lambda e: js_divergence(resid + cond + outs[e] * avg_gate[e].item(), target))
            chosen.append(best)
            cond = cond + outs[best] * avg_gate[best].item()
        per_layer[l] = (chosen, [avg_gate[e].item() for e in chosen])
        h, _ = layer(h, cos, sin, mask)
    # the layers to condense, greedily by divergence at the final hidden state
    reference = hidden({})
    condensed = {}
    for _ in range(n_layers):
        best = min((l for l in range(L) if l not in condensed),
                   key=lambda l: js_divergence(hidden({**condensed, l: per_layer[l]}), reference))
        condensed[best] = per_layer[best]
        log(f"condense layer {best}: experts {per_layer[best][0]}, weights "
            f"{[round(v, 3) for v in per_layer[best][1]]}")
    return {str(l): {"experts": e, "weights": w} for l, (e, w) in sorted(condensed.items())}


def cd_moe(model_dir: str, tokens: torch.Tensor, n_layers: int, n_experts: int, out: str, overwrite: bool = False,
           batch_size: int = 8, device="cpu", log=log, report_extra: dict = None, dtype: str = "float32") -> dict:
    """CD-MoE: condense n_layers layers to n_experts always-on experts each, every forward in
    dtype (layerwise.compute_dtype); write the checkpoint."""
    config = CheckpointReader(model_dir).config
    if not (1 <= n_layers <= config.num_hidden_layers and 1 <= n_experts <= config.num_local_experts):
        raise data.DataError(f"--condense-layers must lie in [1, {config.num_hidden_layers}] and "
                             f"--condense-experts in [1, {config.num_local_experts}]")
    model = load_plain_model(model_dir, torch.float32, device)
    with compute_dtype(torch.device(device).type, dtype):
        condensed = condense(model, tokens.to(device), n_layers, n_experts, batch_size, log)
    model.config = mm.MixtralConfig.from_dict({**config.to_dict(), "condensed_layers": condensed})
    report = {"method": "cd-moe", "condensed_layers": condensed, "calibration_tokens": tokens.numel(),
              **(report_extra or {})}
    save_model(model, out, dtype=CheckpointReader(model_dir).stored_dtype(), overwrite=overwrite, src_dir=model_dir,
               extra_files={"expert_prune_report.json": report})
    return report


# -----------------------------------------------------------------------------
# Bookkeeping: what each variant stores and computes


def expert_budget(config: mm.MixtralConfig, skip_fraction=0.0, nonzero_fraction=1.0) -> dict:
    """Stored expert parameters and expert multiply-accumulates per token of a model variant.
    skip_fraction is a fraction of expert calls (skipped / (tokens x top-k), as skip_fraction()
    measures it): a token makes top-k x (1 - skip_fraction) expert calls a layer."""
    per_expert = 3 * config.hidden_size * config.intermediate_size
    stored, macs, condensed = 0, 0.0, condensed_layers(config)
    for l in range(config.num_hidden_layers):
        c = condensed.get(str(l))
        if c:
            stored += len(c["experts"]) * per_expert
            macs += len(c["experts"]) * per_expert
        else:
            stored += config.num_local_experts * per_expert
            macs += config.num_experts_per_tok * (1 - skip_fraction) * per_expert
    return {"stored_expert_params": stored * nonzero_fraction, "expert_macs_per_token": macs,
            "nonzero_expert_macs_per_token": macs * nonzero_fraction}


@torch.no_grad()
def skip_fraction(model: mm.Mixtral, windows, batch_size=8) -> float:
    """Fraction of expert calls the dynamic skipping removes on these windows."""
    cfg, betas = model.config, skip_betas(model.config)
    if not betas:
        return 0.0
    skipped, calls = 0, 0
    for i in range(0, len(windows), batch_size):
        _, router_logits = model(windows[i:i + batch_size], return_router_logits=True)
        for l, rl in enumerate(router_logits):
            if rl is None:
                continue
            w, _ = mm.route(rl, cfg.num_experts_per_tok)
            skipped += skip_second(w, betas[l]).sum().item()
            calls += w.numel()
    return skipped / calls


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors():
        recipe = cli.apply_recipe(p, args, argv, paths=("model", "calib_tokens", "calib_data"), renamed={"r": "keep_experts"})
        cli.check_calibration_args(p, args, argv)
        model_dir = args.model or data.default_model_dir()
        reader = CheckpointReader(model_dir)
        config = reader.config
        if args.condense_layers and (args.keep_experts is not None or args.skip):
            raise data.DataError("CD-MoE (--condense-layers) and NAEE (--keep-experts, --skip) are separate runs")
        if not args.condense_layers and args.keep_experts is None and not args.skip:
            raise data.DataError("nothing to do: give --keep-experts, --skip or --condense-layers")
        check_output(args.out, args.overwrite, [model_dir, args.calib_tokens, data.input_path(args.calib_data)])
        tokens = data.calibration_tokens(model_dir, config.vocab_size, config.max_position_embeddings, args.calib_data,
                                         args.calib_tokens, args.nsamples, args.seqlen, args.seed)
        recorded = {"args": {**{k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "recipe")},
                             "model": data.shown_path(model_dir)}, **({"recipe": recipe} if recipe else {})}
        if args.condense_layers:
            return cd_moe(model_dir, tokens, args.condense_layers, args.condense_experts, args.out, args.overwrite,
                          args.batch_size, args.device, report_extra=recorded, dtype=args.dtype)
        kept = args.keep_experts if args.keep_experts is not None else config.num_local_experts
        how = ExpertPruning(kept, args.skip, args.select, args.protocol, args.batch_size, args.device, args.dtype)
        return drop_experts(reader, tokens, how, args.out, args.overwrite, report_extra=recorded)


if __name__ == "__main__":
    main()
