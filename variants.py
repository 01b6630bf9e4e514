"""
The expert-level variants of a Mixtral checkpoint, and the loader that builds them: what
expert_prune.py writes and eval_ppl.py evaluates.

A variant keeps the official tensors whole and names, in config.json, the MoE blocks it runs
instead of Mixtral's (keys transformers ignores):

  - dynamic_skip_beta: NAEE's dynamic skipping (Lu et al. 2024, arXiv 2402.14800, Section 3.2),
    one beta per layer: a token whose second gate is below beta times its first runs its first
    expert alone, with weight 1 (SkippingMoeBlock);
  - condensed_layers: CD-MoE's condensed layers (arXiv 2412.00069): fixed experts with fixed
    weights on every token, no router (CondensedMoeBlock).

load_model reads a checkpoint and installs the blocks its config asks for; every script that would
run such a checkpoint as a plain Mixtral refuses it (checkpoint.refuse_variant).
"""

from typing import Optional

import torch
import torch.nn as nn

import mini_mixtral as mm
from checkpoint import CheckpointError, number, whole
from checkpoint import load_model as load_plain_model


def skip_second(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """NAEE dynamic skipping (arXiv 2402.14800, Section 3.2): with top-2 weights g0 >= g1, a token
    skips its second expert when g1 < beta * g0. Returns the [N] bool mask of skipping tokens."""
    return weights[:, 1] < beta * weights[:, 0]


class SkippingMoeBlock(mm.SparseMoeBlock):
    """A top-2 MoE block with NAEE's dynamic skipping: a skipping token's second expert is not run
    and its first gets weight 1. Shares the router and experts of the block it wraps."""

    def __init__(self, block: mm.SparseMoeBlock, beta: float):
        nn.Module.__init__(self)
        self.top_k, self.gate, self.experts, self.beta = block.top_k, block.gate, block.experts, beta
        self.renormalise = block.renormalise

    def run_experts(self, x, weights, experts, observer=None):
        """The routed block's forward runs this in place of Mixtral's: weights, experts [N, 2] each."""
        skip = skip_second(weights, self.beta)  # [N]
        weights = torch.where(skip[:, None], torch.tensor([1.0, 0.0], device=x.device), weights)
        keep = torch.stack([torch.ones_like(skip), ~skip], dim=1).reshape(-1)  # [N * 2]: a skipper's second is not run
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(2)  # [N * 2]
        return self.dispatch(x, token_of[keep], experts.reshape(-1)[keep], weights.reshape(-1)[keep], observer)


class CondensedMoeBlock(nn.Module):
    """A CD-MoE condensed layer: fixed experts with fixed weights on every token, no router.
    Holds the whole router and expert list of the block it replaces (the checkpoint stores them)."""

    def __init__(self, block: mm.SparseMoeBlock, experts: list, weights: list):
        super().__init__()
        self.gate, self.experts = block.gate, block.experts
        self.always_on, self.weights = list(experts), list(weights)

    def forward(self, x, observer=None, router_logits=None):  # no router: router_logits is never used
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, hidden]
        out = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0], device=x.device)
        for e, w in zip(self.always_on, self.weights):
            expert = self.experts[e]
            h = expert.hidden(x)  # [N, intermediate]
            y = expert.w2(h)  # [N, hidden]
            if observer is not None:
                observer(mm.ExpertCall(e, tokens, x, torch.full((x.shape[0],), float(w), device=x.device), h, y))
            out += (y * w).to(x.dtype)
        return out.view(B, T, H), None  # no router logits


def skip_betas(config: mm.MixtralConfig) -> Optional[list]:
    """NAEE's per-layer beta, config.json's dynamic_skip_beta (a key transformers ignores), checked;
    None for a model that does not skip."""
    beta, n = config.extra.get("dynamic_skip_beta"), config.num_hidden_layers
    if beta is not None and not (isinstance(beta, list) and len(beta) == n and all(number(v) and v >= 0 for v in beta)):
        raise CheckpointError(f"config.json's dynamic_skip_beta must list {n} numbers >= 0, one per layer")
    return beta


def condensed_layers(config: mm.MixtralConfig) -> dict:
    """CD-MoE's {"layer": {"experts": [...], "weights": [...]}}, config.json's condensed_layers (a key
    transformers ignores), checked; {} for a model with none."""
    layers, L, E = config.extra.get("condensed_layers") or {}, config.num_hidden_layers, config.num_local_experts
    for layer, c in (layers.items() if isinstance(layers, dict) else [("?", None)]):
        if not (str(layer).isdigit() and int(layer) < L and isinstance(c, dict)
                and isinstance(c.get("experts"), list) and isinstance(c.get("weights"), list)
                and 0 < len(c["experts"]) == len(c["weights"])
                and all(whole(e) and 0 <= e < E for e in c["experts"]) and all(map(number, c["weights"]))):
            raise CheckpointError(f"config.json's condensed_layers[{layer!r}] must name a layer below {L}, experts "
                                  f"below {E} and one finite weight each")
    return layers


def install_variants(model: mm.Mixtral) -> mm.Mixtral:
    """Replace the MoE blocks that the config marks as condensed or skipping, in place."""
    cfg = model.config
    condensed, betas = condensed_layers(cfg), skip_betas(cfg)
    for l, layer in enumerate(model.model.layers):
        c = condensed.get(str(l))
        if c:
            layer.block_sparse_moe = CondensedMoeBlock(layer.block_sparse_moe, c["experts"], c["weights"])
        elif betas:
            layer.block_sparse_moe = SkippingMoeBlock(layer.block_sparse_moe, betas[l])
    return model


def load_model(path: str, dtype=torch.float32, device="cpu", allow_nonfinite: bool = False) -> mm.Mixtral:
    """checkpoint.load_model, with the expert-level variants a checkpoint's config asks for."""
    return install_variants(load_plain_model(path, dtype, device, allow_nonfinite, allow_variants=True))
