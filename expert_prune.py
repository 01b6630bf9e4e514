"""
Expert-level baselines from the related papers: remove or skip whole experts instead of weights.

NAEE, "Not All Experts are Equal" (Lu et al. 2024, arXiv 2402.14800):
  - expert pruning (Section 3.1): for each layer, on cached calibration inputs of its MoE block,
    try every subset of r kept experts out of n (28 subsets for r=6 of 8, 70 for r=4); a dropped
    expert's router logit is set to -inf, so tokens re-route to the top-k of the kept experts
    (renormalised); keep the subset whose block output is closest, in Frobenius norm, to the
    original. The result is a smaller Mixtral (num_local_experts = r, router rows sliced,
    experts re-indexed) in the official layout, which transformers loads too.
  - dynamic skipping (Section 3.2): with top-2 weights g0 >= g1, skip the second expert when
    g1 < beta * g0; beta per layer = the median of g1 / g0 over calibration tokens (so about half
    the tokens skip). Stored as config.json's dynamic_skip_beta, honoured by mini_mixtral.py
    (transformers ignores the field).
Layers are processed one at a time as in prune.py: the calibration activations go through the
pruned layer l to make the inputs of layer l+1.

CD-MoE, "Condense, Don't Just Prune" (Cao et al. 2024, arXiv 2412.00069), adapted to Mixtral,
which has no shared experts: a condensed layer runs k fixed routed experts on every token, each
weighted by its average gate over all calibration tokens (0 where not routed), and skips its
router. The k experts are chosen greedily per layer, each step adding the expert that minimises
the Jensen-Shannon divergence between the original and condensed layer outputs (softmax over the
hidden dimension, averaged over tokens); the layers to condense are chosen greedily by the same
divergence at the final hidden state. Stored as config.json's condensed_layers (the official
tensors are kept whole; the report counts the dropped experts as removed).

    python expert_prune.py --r 6 --out out/naee-r6
    python expert_prune.py --r 6 --skip --out out/naee-r6-skip
    python expert_prune.py --condense-layers 2 --condense-experts 2 --out out/cdmoe-2x2
"""

import argparse
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

import data
import mini_mixtral as mm


# -----------------------------------------------------------------------------
# NAEE


def masked_route(router_logits, keep, top_k):
    """Route with every expert outside `keep` at logit -inf: the top-k of the kept experts,
    renormalised (NAEE's re-routing after dropping)."""
    dropped = torch.ones(router_logits.shape[-1], dtype=torch.bool, device=router_logits.device)
    dropped[list(keep)] = False
    return mm.route(router_logits.masked_fill(dropped, float("-inf")), top_k)


@torch.no_grad()
def subset_errors(layer: mm.DecoderLayer, x, cos, sin, mask, r: int, batch_size: int):
    """Squared Frobenius error of the MoE block's output for every r-subset of experts, summed over
    all calibration windows; also the g1/g0 ratios of the top-2 routing (for skipping's beta)."""
    block = layer.block_sparse_moe
    n = len(block.experts)
    subsets = list(itertools.combinations(range(n), r))
    errors = torch.zeros(len(subsets), dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        h = layer.post_attention_layernorm(layer.attend(x[i:i + batch_size].float(), cos, sin, mask))
        h = h.reshape(-1, h.shape[-1])  # [N, hidden] the MoE block's input
        y, logits = block(h[None])  # [1, N, hidden] the original output
        y = y[0]
        outs = torch.stack([e(h) for e in block.experts], dim=1)  # [N, n_experts, hidden] every expert, every token
        for s, keep in enumerate(subsets):
            w, idx = masked_route(logits, keep, block.top_k)  # [N, k]
            y_s = (outs.gather(1, idx[:, :, None].expand(-1, -1, h.shape[-1])) * w[:, :, None]).sum(1)
            errors[s] += (y_s.to(y.dtype) - y).double().pow(2).sum()
    return subsets, errors


def slice_layer(layer: mm.DecoderLayer, keep, config_r: mm.MixtralConfig, l: int) -> mm.DecoderLayer:
    """The layer with only the kept experts (re-indexed in order) and the matching router rows."""
    small = mm.DecoderLayer(config_r, l)
    sd = layer.state_dict()
    new = {}
    for k, v in sd.items():
        if ".experts." in k:
            e = int(k.split(".experts.")[1].split(".")[0])
            if e in keep:
                new[k.replace(f".experts.{e}.", f".experts.{keep.index(e)}.")] = v
        elif k == "block_sparse_moe.gate.weight":
            new[k] = v[list(keep)]
        else:
            new[k] = v
    small.load_state_dict(new)
    return small


def skip_ratios(layer, x, cos, sin, mask, batch_size):
    """g1 / g0 of every calibration token's top-2 routing at this layer."""
    ratios = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            h = layer.post_attention_layernorm(layer.attend(x[i:i + batch_size].float(), cos, sin, mask))
            w, _ = mm.route(layer.block_sparse_moe.gate(h.reshape(-1, h.shape[-1])), 2)  # h as [N, hidden]
            ratios.append(w[:, 1] / w[:, 0])
    return torch.cat(ratios)


def naee(reader, tokens, r, skip, out, overwrite, batch_size, device, log):
    """NAEE expert pruning to r experts per layer (r = n: none) and optional dynamic skipping."""
    config = reader.config
    n, k = config.num_local_experts, config.num_experts_per_tok
    if not k <= r <= n:
        raise data.DataError(f"--r {r}: must lie in [num_experts_per_tok {k}, num_local_experts {n}]")
    if skip and k != 2:
        raise data.DataError(f"dynamic skipping is defined for top-2 routing; this model routes to {k}")
    new = mm.MixtralConfig.from_dict({**config.to_dict(), "num_local_experts": r})
    x, cos, sin, mask = mm.embed_windows(reader, tokens, device)
    kept, betas, layers = [], [], []
    writer = mm.CheckpointWriter(out, new, overwrite=overwrite, src_dir=reader.path)
    try:
        mm.copy_outside_layers(reader, writer)
        for l in range(config.num_hidden_layers):
            t0 = time.time()
            layer = mm.load_layer(reader, l, torch.float32, device)
            if r < n:
                subsets, errors = subset_errors(layer, x, cos, sin, mask, r, batch_size)
                best = int(errors.argmin())
                keep = list(subsets[best])
                layer = slice_layer(layer, keep, new, l)
                layers.append({"layer": l, "keep": keep, "error": errors[best].item(),
                               "worst_error": errors.max().item(), "subsets": len(subsets)})
            else:
                keep = list(range(n))
            if skip:
                betas.append(skip_ratios(layer, x, cos, sin, mask, batch_size).median().item())
            kept.append(keep)
            x = mm.run_layer(layer, x, cos, sin, mask, batch_size)  # the pruned layer feeds layer l+1
            for name, p in layer.named_parameters():
                writer.add(f"model.layers.{l}.{name}", p.data.to(reader.stored_dtype()))
            writer.flush()
            log(f"layer {l}: keep experts {keep}" + (f", skip beta {betas[-1]:.3f}" if skip else "")
                + f" ({time.time() - t0:.1f}s)")
        if skip:
            writer.config = mm.MixtralConfig.from_dict({**new.to_dict(), "dynamic_skip_beta": betas})
        report = {"method": "naee", "r": r, "skip": skip, "kept_experts": kept, "skip_beta": betas or None,
                  "layers": layers, "calibration_tokens": tokens.numel()}
        writer.close(extra_files={"expert_prune_report.json": report})
    except BaseException:
        writer.abort()
        raise
    return report


# -----------------------------------------------------------------------------
# CD-MoE


def js_divergence(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over tokens of the Jensen-Shannon divergence between softmax(a) and softmax(b) over
    the hidden dimension (CD-MoE's criterion)."""
    la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
    m = torch.logsumexp(torch.stack([la, lb]), 0) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    return (0.5 * (F.kl_div(m, la, log_target=True, reduction="none").sum(-1)
                   + F.kl_div(m, lb, log_target=True, reduction="none").sum(-1))).mean().item()


@torch.no_grad()
def condense(model: mm.Mixtral, tokens, n_layers: int, n_experts: int, batch_size: int, log):
    """Greedy CD-MoE on a whole model in memory. Returns the condensed_layers config entry."""
    cfg = model.config
    L = cfg.num_hidden_layers
    T = tokens.shape[1]
    cos, sin = mm.rope_cos_sin(cfg, T)
    mask = mm.attention_mask(T, cfg.sliding_window)

    def hidden(condensed):
        """Final hidden states (after the final norm) with `condensed` layers."""
        old = [l.block_sparse_moe.condensed for l in model.model.layers]
        for l, c in condensed.items():
            model.model.layers[l].block_sparse_moe.condensed = c
        outs = []
        for i in range(0, len(tokens), batch_size):
            h = model.model.embed_tokens(tokens[i:i + batch_size])
            for layer in model.model.layers:
                h, _ = layer(h, cos, sin, mask)
            outs.append(model.model.norm(h))
        for layer, c in zip(model.model.layers, old):
            layer.block_sparse_moe.condensed = c
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
        w, idx = mm.route(logits, cfg.num_experts_per_tok)
        avg_gate = torch.zeros(cfg.num_local_experts, dtype=torch.float64).index_add_(
            0, idx.reshape(-1), w.reshape(-1).double()) / len(moe_in)  # mean gate over all tokens (0 if unrouted)
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


# -----------------------------------------------------------------------------
# Bookkeeping: what each variant stores and computes


def expert_budget(config: mm.MixtralConfig, skip_fraction=0.0, nonzero_fraction=1.0) -> dict:
    """Stored expert parameters and expert multiply-accumulates per token of a model variant."""
    per_expert = 3 * config.hidden_size * config.intermediate_size
    stored, macs = 0, 0.0
    for l in range(config.num_hidden_layers):
        c = (config.condensed_layers or {}).get(str(l))
        if c:
            stored += len(c["experts"]) * per_expert
            macs += len(c["experts"]) * per_expert
        else:
            stored += config.num_local_experts * per_expert
            macs += (config.num_experts_per_tok - skip_fraction) * per_expert
    return {"stored_expert_params": stored * nonzero_fraction, "expert_macs_per_token": macs,
            "nonzero_expert_macs_per_token": macs * nonzero_fraction}


@torch.no_grad()
def skip_fraction(model: mm.Mixtral, windows, batch_size=8) -> float:
    """Fraction of expert calls the dynamic skipping removes on these windows."""
    cfg = model.config
    if not cfg.dynamic_skip_beta:
        return 0.0
    skipped, calls = 0, 0
    for i in range(0, len(windows), batch_size):
        _, router_logits = model(windows[i:i + batch_size], return_router_logits=True)
        for l, rl in enumerate(router_logits):
            if rl is None:
                continue
            w, _ = mm.route(rl, cfg.num_experts_per_tok)
            skipped += mm.skip_second(w, cfg.dynamic_skip_beta[l]).sum().item()
            calls += w.numel()
    return skipped / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="input checkpoint directory; default: the embedded tiny Mixtral")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--r", type=int, default=None, help="NAEE: experts kept per layer (default: all)")
    p.add_argument("--skip", action="store_true", help="NAEE dynamic skipping, beta = median g1/g0 per layer")
    p.add_argument("--condense-layers", type=int, default=0, help="CD-MoE: how many layers to condense")
    p.add_argument("--condense-experts", type=int, default=2, help="CD-MoE: always-on experts per condensed layer")
    p.add_argument("--calib-data", default="stdlib", help="calibration text (as prune.py)")
    p.add_argument("--calib-tokens", help="an int .npy array [nsamples, seqlen], used verbatim")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (NAEE: 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default 2048 capped at the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration windows")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)
    try:
        model_dir = args.model or data.default_model_dir()
        reader = mm.CheckpointReader(model_dir)
        config = reader.config
        if args.condense_layers and (args.r is not None or args.skip):
            raise data.DataError("CD-MoE (--condense-layers) and NAEE (--r, --skip) are separate runs")
        if not args.condense_layers and args.r is None and not args.skip:
            raise data.DataError("nothing to do: give --r, --skip or --condense-layers")
        if args.condense_layers and not (1 <= args.condense_layers <= config.num_hidden_layers
                                         and 1 <= args.condense_experts <= config.num_local_experts):
            raise data.DataError(f"--condense-layers must lie in [1, {config.num_hidden_layers}] and "
                                 f"--condense-experts in [1, {config.num_local_experts}]")
        if args.r is not None and args.r < 1:
            raise data.DataError(f"--r {args.r}: must be at least 1")
        if os.path.abspath(args.out) == os.path.abspath(model_dir):
            raise data.DataError("--out is the input checkpoint; choose another directory")
        import prune
        tokens = prune.calibration_tokens(args, model_dir, config)
        if args.condense_layers:
            model = mm.load_model(model_dir, torch.float32, args.device)
            layers = condense(model, tokens.to(args.device), args.condense_layers, args.condense_experts,
                              args.batch_size, log)
            new = mm.MixtralConfig.from_dict({**config.to_dict(), "condensed_layers": layers})
            model.config = new
            mm.save_model(model, args.out, dtype=reader.stored_dtype(), overwrite=args.overwrite, src_dir=model_dir,
                          extra_files={"expert_prune_report.json": {"method": "cd-moe", "condensed_layers": layers,
                                                                    "calibration_tokens": tokens.numel()}})
            return {"condensed_layers": layers}
        return naee(reader, tokens, args.r if args.r is not None else config.num_local_experts, args.skip,
                    args.out, args.overwrite, args.batch_size, args.device, log)
    except (mm.CheckpointError, data.DataError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
