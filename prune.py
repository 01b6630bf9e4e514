"""
One-shot, layer-wise pruning of a Mixtral checkpoint: MoE-Pruner and its baselines.

MoE-Pruner (Xie et al. 2024, arXiv 2410.12013), Section 3.2 and Algorithm 1: every expert
matrix W is pruned on each output row by the router-hinted score (Eq. 9)

    S_ij = |W_ij| * || X_j * Gate ||_2

where the norm runs over calibration tokens, X_j is input feature j of the matrix, and Gate is
each token's renormalised top-k routing weight for this expert (Eq. 2; 0 for tokens not routed
to it, so the norm runs over the expert's routed tokens, each scaled by its gate).
Baselines, with the same comparison group unless stated:
  - wanda (Sun et al. 2023, arXiv 2306.11695; Eq. 8 of the paper): the same score with every
    gate = 1, i.e. the activation norm over the expert's routed tokens;
  - sparsegpt (Frantar & Alistarh 2023, arXiv 2301.00774): OBS reconstruction with weight
    update, Hessian X^T X from each expert's routed inputs, lazy blocks of 128 columns, 1%
    dampening; as in its reference algorithm the unstructured mask is chosen per 128-column
    block across all rows (N:M per row and group);
  - magnitude: |W_ij|.
Which matrices: every expert's w1 and w3 (input: the post-attention RMSNorm output of the
routed tokens) and w2 (input: silu(w1 x) * (w3 x) of the routed tokens). Router and attention
stay dense and bitwise unchanged unless --prune-attention, which prunes q/k/v/o with the
method's router-free form (gate = 1 over all tokens).

Protocol: MoE-Pruner's Algorithm 1, in `prune_layers`, as Wanda's and SparseGPT's reference
code run it: embed the calibration windows; for each layer l: read it from the checkpoint, run
the calibration activations through it once with dense weights collecting every matrix's
statistics, prune all its matrices, run it again with the pruned weights to make the inputs of
layer l+1, write it to the output, free it (layerwise.py). With --dense-forward the dense
outputs feed layer l+1 instead (Algorithm 1 read literally). Only one decoder layer's weights
and the calibration activations are ever in memory.

    python prune.py --method moe-pruner --sparsity 0.5 --out out/moe-pruner-50
    python prune.py --model DIR --method wanda --sparsity 0.5 --nm 2:4 --out out/wanda-24
"""

import argparse
import contextlib
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import cli

# -----------------------------------------------------------------------------
# The command line, first (cli.parse_first)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--model", help="input checkpoint directory (official layout); default: the embedded tiny Mixtral")
    p.add_argument("--method", choices=cli.METHODS, help="the pruning score (required unless --recipe)")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of each expert matrix row to prune, in [0, 1)")
    p.add_argument("--nm", help="N:M semi-structured sparsity instead, e.g. 2:4: keep N of every M consecutive inputs "
                                "(NVIDIA's reading; Wanda's and SparseGPT's reference code prune N of every M, the "
                                "same only for 2:4 and 4:8)")
    cli.add_calibration_args(p)
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--prune-attention", action="store_true",
                   help="also prune q/k/v/o with the method's router-free form (gate = 1), for whole-model sparsity")
    p.add_argument("--prune-router", action="store_true",
                   help="also prune the router W_g (gate = 1 over all tokens), as reference Wanda/SparseGPT code, which "
                        "prunes every Linear of a layer, does")
    p.add_argument("--stats-tokens", default="routed", choices=("routed", "all"),
                   help="each expert's statistics over the tokens routed to it (default; what Wanda's reference code "
                        "sees when it hooks an expert's Linear) or over all tokens (a router-blind Wanda/SparseGPT)")
    p.add_argument("--group", default="row", choices=("row", "matrix"),
                   help="unstructured comparison group: each output row (Wanda, MoE-Pruner; default) or the whole "
                        "matrix (the reference magnitude baseline's one threshold per matrix)")
    p.add_argument("--layer-sparsity",
                   help="non-uniform sparsity: a comma list of one value per decoder layer, or 'owl' (Outlier-Weighed "
                        "Layerwise sparsity, Yin et al. 2023: layers with more outlier scores pruned less, mean kept "
                        "at --sparsity)")
    p.add_argument("--owl-lambda", type=cli.nonnegative_float, default=0.08,
                   help="OWL: layer sparsities span 2 x lambda around --sparsity, never beyond +- 2 x lambda "
                        "(default 0.08, the reference's)")
    p.add_argument("--owl-m", type=cli.positive_float, default=5.0,
                   help="OWL: a score is an outlier above M x its layer's mean (default 5, as the reference's README "
                        "commands; its argparse default is 3)")
    p.add_argument("--percdamp", type=cli.positive_float, default=0.01,
                   help="SparseGPT: dampening added to diag(H), as a fraction of its mean (default 0.01, the reference's)")
    p.add_argument("--blocksize", type=cli.positive_int, default=128,
                   help="SparseGPT: columns updated together, also the unstructured mask's group (default 128)")
    p.add_argument("--dense-forward", action="store_true",
                   help="feed layer l+1 the dense layer l's outputs (Algorithm 1 read literally) instead of the "
                        "pruned layer's (Wanda/SparseGPT reference protocol, the default)")
    p.add_argument("--round-updates", action="store_true",
                   help="SparseGPT: feed layer l+1 through layer l's updated weights rounded to the checkpoint's dtype "
                        "(what the written checkpoint holds, as the reference computes) instead of their float32 values")
    p.add_argument("--error-stride", type=cli.positive_int, default=16,
                   help="the report's per-matrix errors ||W X - W' X|| / ||W X|| are measured on every N-th input row of "
                        "each matrix (default 16: about 6%% of the forwards' cost; 1 measures every row, exactly)")
    p.add_argument("--exact-solver-error", action="store_true",
                   help="SparseGPT: the report's solver errors ||dW X^T|| / ||W X^T|| from the products with the Hessian "
                        "(two of out x in^2 per matrix) instead of from the OBS loss the solver accumulates and the dense "
                        "outputs' norms (the same value to ~1e-6, at no cost)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="calibration windows per forward pass")
    p.add_argument("--act-dtype", default="float32", choices=cli.DTYPES,
                   help="dtype the calibration activations are kept in between layers (half precision halves memory)")
    p.add_argument("--dtype", default="float32", choices=cli.COMPUTE_DTYPES,
                   help="compute dtype of the layer forward: bfloat16 runs the matrix products in bfloat16 (autocast; "
                        "weights, masks and statistics stay exact), several times faster on CPUs with AMX or AVX-512 "
                        "BF16 and on GPUs; statistics are accumulated in float64, Hessians in float32")
    cli.add_device_arg(p)
    cli.add_recipe_arg(p, "prune_report.json", "same arguments, same calibration tokens from the calibration_tokens.npy "
                                                "beside it")
    return p


cli.parse_first(__name__, build_parser)

import numpy as np
import torch
import torch.nn.functional as F

import data
import distributed
import masks
import mini_mixtral as mm
from checkpoint import CheckpointReader, CheckpointWriter, DTYPES, expected_shapes
from layerwise import Positions, copy_outside_layers, embed_windows, layers, rerun_moe_half, run_layer, write_layer
from outputs import check_output
from progress import Laps, log


# -----------------------------------------------------------------------------
# Statistics of a matrix's calibration inputs


def sq_norm(x: torch.Tensor, gate=None) -> torch.Tensor:
    """Squared column norms of a batch of inputs, [tokens, in] -> [in] float64.

    With gate ([tokens]), each token's row is scaled by its routing weight first: the
    ||X_j * Gate||^2 of MoE-Pruner's Eq. 9. Without, Wanda's ||X_j||^2 (Eq. 8). float64, so that
    summing over calibration batches is exact to ~1e-16 and masks do not depend on batching.
    A block of columns at a time, so that the float64 copy of x never exceeds 4 MB (it stays in
    cache); a column's sum does not depend on the others, so the result is bitwise the whole
    batch's at once.
    """
    out = torch.empty(x.shape[1], dtype=torch.float64, device=x.device)
    g = None if gate is None else gate.double()[:, None]  # [tokens, 1]
    step = max(64, 2**19 // max(1, x.shape[0]) // 64 * 64)  # columns a block: ~2^19 float64 values, 4 MB; a
    # multiple of 64 columns, so that each column is summed by the same vector code as in the whole batch
    for j in range(0, x.shape[1], step):
        xb = x[:, j:j + step].to(torch.float64, copy=True)  # [tokens, step], never x itself
        if g is not None:
            xb.mul_(g)
        out[j:j + step] = xb.pow_(2).sum(dim=0)
    return out


def hessian(x: torch.Tensor) -> torch.Tensor:
    """SparseGPT's H = X^T X over a batch of inputs, [tokens, in] -> [in, in] float32.
    (The reference's 2/n factor is omitted: dampening is relative to mean(diag H) and the update
    uses H^-1 ratios, so the scale cancels.)"""
    x = x.float()
    with torch.autocast(x.device.type, enabled=False):  # float32 products inside a bfloat16 forward too
        return x.T @ x


def input_statistic(method: str, x: torch.Tensor, gate: Optional[torch.Tensor]):
    """What each method keeps of a batch of one matrix's inputs x [tokens, in], with each routed
    token's gate [tokens] (None for attention and the router): MoE-Pruner's one new line is the first."""
    if method == "moe-pruner":
        return sq_norm(x, gate)  # Eq. 9: ||X_j * Gate||^2, each routed token scaled by its gate
    if method == "wanda":
        return sq_norm(x)  # Eq. 8: ||X_j||^2 over the same routed tokens
    if method == "sparsegpt":
        return hessian(x)  # X^T X
    return None  # magnitude: nothing


class InputStats:
    """Accumulates what a method needs of one matrix input's calibration tokens (input_statistic)."""

    def __init__(self, method: str, n_in: int = None):
        self.method, self.n_in, self.tokens, self.value = method, n_in, 0, None
        self.out_sq = {}  # SparseGPT: {matrix name: sum over these inputs of ||W x||^2}, where output_sq_hooks sum it

    def add(self, x: torch.Tensor, gate=None):
        v = input_statistic(self.method, x, gate)
        if v is not None:
            self.value = v if self.value is None else self.value + v
        self.tokens += x.shape[0]

    def reduce(self, device):
        """Under torchrun: the sums over every rank's windows, identical on every rank."""
        if not distributed.active():
            return
        if self.method != "magnitude":
            if self.value is None:  # no token of this rank's windows reached the matrix
                shape = (self.n_in, self.n_in) if self.method == "sparsegpt" else (self.n_in,)
                self.value = torch.zeros(shape, dtype=torch.float32 if self.method == "sparsegpt" else torch.float64,
                                         device=device)
            distributed.all_sum(self.value)
        if self.out_sq:
            totals = distributed.all_sum(torch.tensor(list(self.out_sq.values()), dtype=torch.float64, device="cpu"))
            self.out_sq = dict(zip(self.out_sq, totals.tolist()))
        self.tokens = int(distributed.all_sum(torch.tensor([self.tokens], dtype=torch.float64, device="cpu")).item())


# -----------------------------------------------------------------------------
# Scores and masks (one function per equation)


def magnitude_score(w: torch.Tensor) -> torch.Tensor:
    return w.abs().double()


def activation_score(w: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """MoE-Pruner Eq. 9 (Wanda's Eq. 8 when the norms are ungated): S_ij = |W_ij| * ||X_j||.
    w [out, in], sq_norms [in] (squared norms, gated or not) -> [out, in] float64."""
    return w.abs().double() * sq_norms.double().sqrt()[None, :]


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True = prune. Per output row, exactly floor(sparsity * in) lowest scores, as in Wanda's
    reference code; among equal scores the lower column index goes first (what a stable sort
    gives), selected without a sort (masks.py)."""
    return masks.lowest_k_mask(score, int(score.shape[1] * sparsity))


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True = prune. In each row, in every group of m consecutive inputs, keep the n highest."""
    rows, cols = score.shape
    groups = score.reshape(rows, cols // m, m)  # [out, in/m, m]
    keep = torch.sort(groups, dim=2, descending=True, stable=True).indices[:, :, :n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, keep, False)
    return mask.reshape(rows, cols)


def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float, nm=None,
                    blocksize: int = 128, percdamp: float = 0.01, losses: Optional[list] = None) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): prune and update W column by column so
    that the layer output on the calibration inputs changes least, using the inverse Hessian.

    blocksize 128: the reference's lazy-update block (columns updated together; also the group
    over which an unstructured mask is chosen). percdamp 0.01: dampening of 1% of mean(diag H),
    the reference value, which keeps the Cholesky factorisation stable.
    Returns the pruned and updated W [out, in] in float32. With losses a list, appends the OBS loss
    the updates accumulate, sum (w - q)^2 / [H^-1]_jj^2 = tr(dW H_damped dW^T) (solver_error).
    A block is updated transposed ([b, out]: a column's remaining columns are one contiguous slice),
    the same arithmetic in the same order as the reference's.
    """
    W = w.clone().float()
    rows, cols = W.shape
    H = H.clone().float()
    dead = torch.diag(H) == 0  # inputs never active on calibration data: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].T.contiguous()  # [b, out]: row i is column i1 + i of W
        Q1, Err1, update = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # [b]
        if nm is None:  # the block's lowest OBS saliencies w^2 / [H^-1]_jj^2, ties to the lower flat index
            saliency = W[:, i1:i2] ** 2 / d[None, :] ** 2  # [out, b]
            mask1 = unstructured_mask(saliency.reshape(1, -1), sparsity).reshape(saliency.shape).T.contiguous()
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)  # [b, out]
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                saliency = W1[i:i + m].T ** 2 / d[i:i + m][None, :] ** 2  # [out, m]
                mask1[i:i + m] = nm_mask(saliency.double(), n, m).T
            col = W1[i]  # [out]
            Q1[i] = col  # pruned entries zeroed for the whole block below
            err = torch.div(col.masked_fill(~mask1[i], 0), d[i], out=Err1[i])  # (w - q) / [H^-1]_ii
            W1[i:] -= torch.mul(Hinv1[i, i:, None], err[None, :], out=update[i:])  # OBS update of the remaining columns
        Q1.masked_fill_(mask1, 0)
        W[:, i1:i2] = Q1.T
        loss += Err1.double().pow(2).sum()
        W[:, i2:].addmm_(Err1.T.contiguous(), Hinv[i1:i2, i2:], alpha=-1)  # lazy update of the later blocks, in place
    if losses is not None:
        losses.append(loss.item())
    return W


def prune_matrix(w: torch.Tensor, method: str, stats: InputStats, sparsity: float, nm=None, group: str = "row",
                 blocksize: int = 128, percdamp: float = 0.01, losses: Optional[list] = None, out=None):
    """The pruned matrix (same dtype as w) and whether the method fell back to magnitude
    because the matrix saw no calibration tokens (an expert no calibration token was routed to).
    group "row" compares the weights of each output row (Wanda, MoE-Pruner); "matrix" the whole
    matrix (the reference magnitude baseline's one threshold per matrix). losses: SparseGPT's
    accumulated OBS loss is appended to it. out: where the per-row masks write the pruned matrix
    (w itself: in place)."""
    if sparsity == 0 and nm is None:
        return w, False
    fallback = method != "magnitude" and (stats is None or stats.tokens == 0)
    if method == "sparsegpt" and not fallback:
        return sparsegpt_prune(w, stats.value, sparsity, nm, blocksize, percdamp, losses).to(w.dtype), False
    by_magnitude = method == "magnitude" or fallback
    if nm is None and group == "row":  # the score's order found on a float32 key (masks.py): the same mask
        k = int(w.shape[1] * sparsity)
        return masks.prune_rows(w, k, None if by_magnitude else stats.value, activation_score, out=out), fallback
    score = magnitude_score(w) if by_magnitude else activation_score(w, stats.value)
    if nm is not None:
        mask = nm_mask(score, *nm)
    else:
        mask = unstructured_mask(score.reshape(1, -1), sparsity).reshape(score.shape)
    return w.masked_fill(mask, 0), fallback


def relative_error(dw: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> float:
    """||dW X^T||_F / ||W X^T||_F from the Gram matrix H = X^T X alone: sqrt(tr(dW H dW^T) / tr(W H W^T)).
    The products in float32 (a reported error, good to ~1e-6 relative; float64 would cost minutes a
    layer at Mixtral's width), their sums in float64."""
    dw, w, H = dw.float(), w.float(), H.float()
    num = ((dw @ H) * dw).double().sum().item()
    return math.sqrt(max(0.0, num) / max(((w @ H) * w).double().sum().item(), 1e-300))


def obs_relative_error(obs_loss: float, w_new: torch.Tensor, w: torch.Tensor, H: torch.Tensor, percdamp: float,
                       dense_sq: float) -> float:
    """relative_error's value without its two products, from what SparseGPT computed anyway:
    tr(dW H dW^T) = obs_loss - lambda ||dW||^2, since the OBS loss sum (w - q)^2 / [H^-1]_jj^2 that
    sparsegpt_prune accumulates is tr(dW (H + lambda I) dW^T) (lambda = percdamp * mean diag H, a
    dead input's diagonal counted as 1, as there; dW is 0 on dead inputs); and tr(W H W^T) =
    dense_sq, the sum of ||W x||^2 over the calibration inputs, which the dense pass computed."""
    diag = H.diagonal().double()
    dead = diag == 0
    lam = percdamp * torch.where(dead, 1.0, diag).mean()
    num = obs_loss - lam.item() * (w_new - w.float())[:, ~dead].double().pow(2).sum().item()
    return math.sqrt(max(0.0, num) / max(dense_sq, 1e-300))


# -----------------------------------------------------------------------------
# One decoder layer: collect statistics, prune, measure what pruning changed


@dataclass
class PruneArgs:
    """Everything that decides a pruning run's output (recorded as the report's "args")."""

    method: str = "moe-pruner"
    sparsity: float = 0.5  # fraction of each expert matrix row pruned; N:M overrides it with (M - N) / M
    nm: Optional[str] = None  # "N:M" semi-structured sparsity, e.g. "2:4"
    calib_data: str = "stdlib"  # a text file, or the embedded corpus's calibration split
    calib_tokens: Optional[str] = None  # an int .npy [nsamples, seqlen] used verbatim instead
    nsamples: int = 128  # paper: 128 calibration sequences
    seqlen: Optional[int] = None  # None: 2048 (Wanda's; the paper does not say), capped at the model's context
    seed: int = 0
    prune_attention: bool = False  # q/k/v/o too, router-free (gate = 1 over all tokens)
    prune_router: bool = False  # the router W_g too (reference Wanda/SparseGPT prune every Linear)
    stats_tokens: str = "routed"  # "all": each expert's statistics over every token (a router-blind Wanda)
    group: str = "row"  # comparison group of an unstructured mask: "row" or "matrix"
    layer_sparsity: Optional[str] = None  # per-layer sparsities "s0,s1,...", or "owl" (Yin et al. 2023)
    owl_lambda: float = 0.08  # OWL: layer sparsities span 2 lambda around sparsity (reference default 0.08)
    owl_m: float = 5.0  # OWL: an outlier score is > M x its layer's mean score (reference default 5)
    blocksize: int = 128  # SparseGPT: lazy-update block of columns (reference default)
    percdamp: float = 0.01  # SparseGPT: dampening, a fraction of mean(diag H) (reference default)
    dense_forward: bool = False
    round_updates: bool = False  # SparseGPT: layer l+1 sees layer l's updated weights rounded to the checkpoint's
    # dtype, as the reference (whose model computes in it) does; default: the float32 updates, rounded when written
    error_stride: int = 16  # per-matrix errors on every 16th input row of each call: ~6% of the forwards' cost
    exact_solver_error: bool = False  # SparseGPT's solver error from two products per matrix, not from its OBS loss
    batch_size: int = 8  # calibration windows per forward pass; does not change the result (float64 sums)
    act_dtype: str = "float32"  # dtype the activations are kept in between layers
    dtype: str = "float32"  # compute dtype of the layer forward (weights stay float32; bfloat16 uses autocast)
    device: str = "cpu"


def attention_input_hooks(layer: mm.DecoderLayer, stats: dict):
    """Forward pre-hooks recording the inputs of q/k/v (shared) and of o_proj."""
    def hook(key):
        def record(module, args):
            x = args[0]
            stats[key].add(x.reshape(-1, x.shape[-1]))
        return record
    attn = layer.self_attn
    return [attn.q_proj.register_forward_pre_hook(hook("attn.qkv")),
            attn.o_proj.register_forward_pre_hook(hook("attn.o"))]


def moe_input_hooks(layer: mm.DecoderLayer, stats: dict, args: PruneArgs):
    """A forward pre-hook on the router recording its input, every token of the MoE block: the
    router's own statistics (--prune-router) and, with --stats-tokens all, every expert's
    statistics over all tokens instead of its routed ones (w2's input computed for all tokens)."""
    block = layer.block_sparse_moe

    def record(module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])  # [N, hidden] every token
        if args.prune_router:
            stats["router"].add(x)
        if args.stats_tokens == "all":
            for e, expert in enumerate(block.experts):
                stats[f"expert.{e}.x"].add(x)
                stats[f"expert.{e}.h"].add(expert.hidden(x))
    return [block.gate.register_forward_pre_hook(record)]


def matrices(layer: mm.DecoderLayer, args: PruneArgs):
    """(parameter name within the layer, module, key of its input statistics) to prune."""
    out = []
    for e, expert in enumerate(layer.block_sparse_moe.experts):
        p = f"block_sparse_moe.experts.{e}."
        out += [(p + "w1.weight", expert.w1, f"expert.{e}.x"), (p + "w3.weight", expert.w3, f"expert.{e}.x"),
                (p + "w2.weight", expert.w2, f"expert.{e}.h")]
    if args.prune_attention:
        a = layer.self_attn
        out += [("self_attn.q_proj.weight", a.q_proj, "attn.qkv"), ("self_attn.k_proj.weight", a.k_proj, "attn.qkv"),
                ("self_attn.v_proj.weight", a.v_proj, "attn.qkv"), ("self_attn.o_proj.weight", a.o_proj, "attn.o")]
    if args.prune_router:
        out.append(("block_sparse_moe.gate.weight", layer.block_sparse_moe.gate, "router"))
    return out


def only_experts_change(args: PruneArgs) -> bool:
    """Whether the second pass may start from the first pass's attention-half outputs and router
    logits: attention and router stay dense, and the activations are float32 (keeping the
    attention-half outputs then costs no more memory than the layer inputs they replace)."""
    return not (args.prune_attention or args.prune_router) and args.act_dtype == "float32"


def output_sq_hooks(layer: mm.DecoderLayer, stats: dict, args: PruneArgs):
    """Forward hooks adding each pruned matrix's ||W x||^2 over the inputs it sees to its InputStats'
    out_sq: SparseGPT's tr(W H W^T), which its solver error divides by (obs_relative_error), from
    the products the dense pass computes anyway. Only where a matrix's module sees exactly the
    inputs of its Hessian: not with --stats-tokens all, whose Hessians are over tokens not routed."""
    if args.method != "sparsegpt" or args.exact_solver_error or args.stats_tokens != "routed":
        return []
    hooks = []
    for name, module, key in matrices(layer, args):
        stats[key].out_sq[name] = 0.0

        def record(module, inputs, out, name=name, key=key):
            stats[key].out_sq[name] += torch.linalg.vector_norm(out, dtype=torch.float32).item() ** 2
        hooks.append(module.register_forward_hook(record))
    return hooks


@dataclass
class DensePass:
    """What the dense pass over a layer leaves for pruning and for the second pass."""

    stats: dict  # {input key: InputStats} every pruned matrix's input statistics
    routed: list  # tokens routed to each expert
    dense_out: torch.Tensor  # [n, T, hidden] the dense layer's outputs
    halves: Optional[list]  # each batch's attention-half output and router logits, where the second pass reuses them
    inputs: Optional[torch.Tensor]  # [n, T, hidden] the layer's inputs, where the second pass needs them (else None)

    def release(self):
        """Drop the activations and statistics: nothing of layer l stays in memory while layer l+1 is read."""
        self.stats = self.dense_out = self.halves = self.inputs = None


@torch.no_grad()
def collect_stats(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, args: PruneArgs,
                  laps: Optional[Laps] = None) -> DensePass:
    """One dense calibration pass through the layer: every matrix's input statistics, the tokens
    routed to each expert, the dense outputs; and what the second pass starts from: each batch's
    attention-half output and router logits when only experts change (only_experts_change), else
    the inputs x. laps times it as "stats_forward_s"."""
    n_experts = len(layer.block_sparse_moe.experts)
    stats = {key: InputStats(args.method, module.in_features) for _, module, key in matrices(layer, args)}
    routed = [0] * n_experts

    def observer(call: mm.ExpertCall):
        routed[call.expert] += len(call.tokens)
        if args.stats_tokens == "routed":
            stats[f"expert.{call.expert}.x"].add(call.x, call.gate)
            stats[f"expert.{call.expert}.h"].add(call.h, call.gate)

    hooks = attention_input_hooks(layer, stats) if args.prune_attention else []
    if args.prune_router or args.stats_tokens == "all":
        hooks += moe_input_hooks(layer, stats, args)
    hooks += output_sq_hooks(layer, stats, args)
    halves = [] if only_experts_change(args) else None
    try:
        dense_out = run_layer(layer, x, pos, args.batch_size, observer, DTYPES[args.dtype], halves)
    finally:
        for h in hooks:
            h.remove()
    for s in stats.values():  # under torchrun: every rank's windows
        s.reduce(x.device)
    routed = [int(v) for v in distributed.all_sum(torch.tensor(routed, dtype=torch.float64, device="cpu")).tolist()]
    if laps:
        laps.lap("stats_forward_s")
    return DensePass(stats, routed, dense_out, halves, None if halves else x)


@torch.no_grad()
def prune_matrices(layer: mm.DecoderLayer, stats: dict, args: PruneArgs, sparsity: float, nm, round_to=None,
                   laps: Optional[Laps] = None) -> dict:
    """Prune the layer's matrices in place (with round_to, a dtype, each as that dtype holds it: what
    the checkpoint will, an identity but for SparseGPT's updates). Returns {"counts": {name: (zeros, numel)},
    "fallbacks": [names pruned by magnitude for want of calibration tokens], "dense": {name:
    the weight before pruning}, "solver_error": {name: SparseGPT's relative error on its Hessian}}.
    laps times it as "prune_s"."""
    counts, fallbacks, dense, solver = {}, [], {}, {}
    for name, module, key in matrices(layer, args):
        dense[name] = dense_copy(module.weight.data)
        losses = []
        try:
            w, fell_back = prune_matrix(module.weight.data, args.method, stats[key], sparsity, nm, args.group,
                                        args.blocksize, args.percdamp, losses, out=module.weight.data)
        except torch.linalg.LinAlgError:  # SparseGPT's Cholesky factorisation of the damped Hessian
            raise data.DataError(f"{name}: SparseGPT's Hessian is not positive definite after damping by --percdamp "
                                 f"{args.percdamp:g} of its mean diagonal (too few calibration tokens for its "
                                 f"{module.weight.shape[1]} inputs?): raise --percdamp (the reference's 0.01) or "
                                 f"calibrate on more tokens") from None
        if round_to is not None:
            w = w.to(round_to).to(w.dtype)
        module.weight.data = w
        counts[name] = (masks.count_zeros(w), w.numel())
        if fell_back:
            fallbacks.append(name)
        elif losses and name in stats[key].out_sq:  # from the solver's own OBS loss
            solver[name] = obs_relative_error(losses[0], w, dense[name], stats[key].value, args.percdamp,
                                              stats[key].out_sq[name])
        elif args.method == "sparsegpt" and stats[key].value is not None:
            solver[name] = relative_error(w - dense[name], dense[name], stats[key].value)
    if laps:
        laps.lap("prune_s")
    return {"counts": counts, "fallbacks": fallbacks, "dense": dense, "solver_error": solver}


def dense_copy(w: torch.Tensor, block_elements: int = 2**20) -> torch.Tensor:
    """w in bfloat16 when that is exact (a checkpoint stored in bfloat16, as Mixtral's is), so that
    keeping a layer's dense weights for the error measurement costs half as much; else a copy of w.
    Converted and checked a block of rows at a time, in cache (masks.indicator_like: a float 0/1
    sums faster than a bool)."""
    if w.dtype == torch.bfloat16:  # a layer held in bfloat16 (layerwise.weight_dtype)
        return w.clone()
    half = torch.empty(w.shape, dtype=torch.bfloat16, device=w.device)
    rows = max(1, block_elements // max(1, w.shape[1]))
    back = torch.empty((min(rows, w.shape[0]),) + tuple(w.shape[1:]), dtype=w.dtype, device=w.device)
    for i in range(0, w.shape[0], rows):
        wb, hb = w[i:i + rows], half[i:i + rows]
        hb.copy_(wb)
        same = torch.eq(back[:len(wb)].copy_(hb), wb, out=back[:len(wb)]).sum()
        if same.item() != wb.numel():  # float32 sums of ones are exact below 2^24, a block is 2^20
            return w.clone()
    return half


def sample_rows(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Every stride-th row of x [rows, in], starting at stride // 2 (so not always a window's first
    token); all rows when there are too few for one (an expert few tokens reach)."""
    return x[stride // 2::stride] if x.shape[0] > stride // 2 else x


@contextlib.contextmanager
def output_errors(layer: mm.DecoderLayer, dense: dict, stride: int = 1):
    """While a pruned layer runs: for every pruned matrix, ||W x - W' x||^2 and ||W x||^2 summed
    over the inputs it sees (W the weight before pruning), on every stride-th input row of each
    call (sample_rows; 1: all, exact). Yields {name: [err^2, ref^2]}. The products run as the
    forward's do: in bfloat16 under autocast, W' x taken from the forward's own output (W kept in
    bfloat16 needs no cast), else in float32, W copied into one float32 buffer per shape (no fresh
    allocation a call)."""
    sums = {name: [0.0, 0.0] for name in dense}
    modules = dict(layer.named_modules())
    buffers = {}

    def hook(name):
        def record(module, inputs, output):
            x = sample_rows(inputs[0].reshape(-1, inputs[0].shape[-1]), stride)  # [rows / stride, in]
            if torch.is_autocast_enabled(x.device.type):
                out = sample_rows(output.reshape(-1, output.shape[-1]), stride).float()  # the forward's W' x
                ref = F.linear(x, dense[name]).float()
            else:
                w = dense[name]
                if w.dtype != torch.float32:
                    w = buffers.setdefault(w.shape, torch.empty(w.shape, device=w.device)).copy_(w)
                x = x.float()
                ref, out = x @ w.T, x @ module.weight.float().T
            sums[name][0] += (ref - out).double().pow(2).sum().item()
            sums[name][1] += ref.double().pow(2).sum().item()
        return record
    hooks = [modules[name.rsplit(".", 1)[0]].register_forward_hook(hook(name)) for name in dense]
    try:
        yield sums
    finally:
        for h in hooks:
            h.remove()


def norm_ratio(err2: float, ref2: float) -> float:
    """sqrt(err2 / ref2): a relative error from its squared norms (0 where the reference is 0)."""
    return math.sqrt(err2 / ref2) if ref2 > 0 else 0.0


@torch.no_grad()
def next_forward(layer: mm.DecoderLayer, x: torch.Tensor, pos: Positions, args: PruneArgs, halves,
                 act_dtype) -> torch.Tensor:
    """The pruned layer's outputs on the calibration windows, in act_dtype: from the first pass's
    attention-half outputs and router logits when only experts changed (bitwise the same as the
    whole layer run again on its inputs x, without attention and router), else the whole layer."""
    if halves:
        return rerun_moe_half(layer, halves, act_dtype, dtype=DTYPES[args.dtype])
    return run_layer(layer, x, pos, args.batch_size, dtype=DTYPES[args.dtype])


def pruned_forward(layer: mm.DecoderLayer, x, pos: Positions, args: PruneArgs, halves, dense: dict, act_dtype):
    """next_forward, measuring every pruned matrix's output error on the way (output_errors, against
    its weights before pruning, `dense`). Returns (outputs, output_errors' sums)."""
    with output_errors(layer, dense, args.error_stride) as sums:
        return next_forward(layer, x, pos, args, halves, act_dtype), sums


def measured_errors(sums: dict, dense_out: torch.Tensor, pruned_out: torch.Tensor) -> dict:
    """One layer's errors for the report, over every rank's windows under torchrun: each pruned
    matrix's ||W X - W' X|| / ||W X|| from output_errors' sums, and the layer output's relative error."""
    flat = [v for pair in sums.values() for v in pair]
    flat += [(pruned_out.double() - dense_out.double()).pow(2).sum().item(), dense_out.double().pow(2).sum().item()]
    totals = distributed.all_sum(torch.tensor(flat, dtype=torch.float64, device="cpu")).tolist()
    return {"layer_error": norm_ratio(*totals[-2:]),
            "matrix_error": {k: norm_ratio(totals[2 * i], totals[2 * i + 1]) for i, k in enumerate(sums)}}


@torch.no_grad()
def next_inputs(layer: mm.DecoderLayer, dense: DensePass, pruned: dict, pos: Positions, args: PruneArgs,
                laps: Optional[Laps] = None) -> torch.Tensor:
    """The inputs of the next layer: the pruned layer's outputs (the dense ones with --dense-forward),
    from the first pass's attention halves when only experts changed, measuring every pruned matrix's
    output error on the way (pruned_forward); pruned gains "routed", "layer_error" and "matrix_error"
    and loses "dense", and dense is released. laps times it as "next_forward_s"."""
    pruned_out, sums = pruned_forward(layer, dense.inputs, pos, args, dense.halves, pruned.pop("dense"),
                                      dense.dense_out.dtype)
    x = dense.dense_out if args.dense_forward else pruned_out
    if laps:
        laps.lap("next_forward_s")
    pruned.update(routed=dense.routed, **measured_errors(sums, dense.dense_out, pruned_out))
    dense.release()
    return x


# -----------------------------------------------------------------------------
# Algorithm 1


def prune_layers(decoder_layers, x: torch.Tensor, pos: Positions, args: PruneArgs, sparsities: list, nm=None,
                 laps: Laps = None, round_to=None):
    """MoE-Pruner Algorithm 1, the layer-wise loop every method here shares. decoder_layers yields
    (l, decoder layer l) in order (layerwise.layers); x [n, T, hidden] are layer 0's inputs;
    sparsities[l] is layer l's target; round_to (--round-updates) the checkpoint's dtype. Yields (l,
    layer l pruned, prune_matrices's summary with the measured output errors), for the caller to
    write; laps times the three phases, and as "io_s" what lies between them (reading layer l,
    writing layer l - 1)."""
    laps = laps or Laps()
    for l, layer in laps.each(decoder_layers, "io_s"):
        # 1. a dense pass: every expert matrix's routed inputs X and their gates (Eq. 2), the dense outputs
        dense, x = collect_stats(layer, x, pos, args, laps), None  # dense keeps x where the second pass needs it
        # 2. every matrix pruned by its score, S_ij = |W_ij| * ||X_j * Gate|| (Eq. 9) or a baseline's
        pruned = prune_matrices(layer, dense.stats, args, sparsities[l], nm, round_to, laps)
        # 3. the pruned layer's outputs: the inputs of layer l+1 (the dense ones with --dense-forward)
        x = next_inputs(layer, dense, pruned, pos, args, laps)
        yield l, layer, pruned


# -----------------------------------------------------------------------------
# Per-layer sparsity: uniform, a list, or OWL


def owl_sparsities(outlier_ratios: list, sparsity: float, lam: float) -> list:
    """OWL (Yin et al. 2023, arXiv 2310.05175, Section 3): layers with more outliers are pruned less.
    The outlier ratios D_l are min-max normalised to [0, 2 lam], centred, and subtracted from the
    target (the reference prune_wanda_outlier's arithmetic), so the layer sparsities average exactly
    `sparsity` and span at most 2 lam: all within sparsity +- lam only when the ratios are spread
    symmetrically, and within sparsity +- 2 lam always (one outlying layer moves by up to
    2 lam (L - 1) / L)."""
    d = torch.tensor(outlier_ratios, dtype=torch.float64, device="cpu")
    span = d.max() - d.min()
    scaled = (d - d.min()) / span * 2 * lam if span > 0 else torch.zeros_like(d)
    return (sparsity - (scaled - scaled.mean())).tolist()


def outlier_ratio(scores: list, m: float) -> float:
    """OWL's D_l: the fraction of a layer's scores above m times their mean (all its pruned matrices pooled)."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return (flat > m * flat.mean()).double().mean().item()


@torch.no_grad()
def owl_outlier_ratios(reader: CheckpointReader, x: torch.Tensor, pos: Positions, args: PruneArgs, device) -> list:
    """A first pass over the dense model, one layer at a time: each layer's outlier ratio of the
    method's scores (|W_ij| ||X_j (* Gate)||; |W_ij| for magnitude) on its dense inputs."""
    ratios = []
    for l, layer in layers(reader, None, device):
        dense = collect_stats(layer, x, pos, args)
        stats, x = dense.stats, dense.dense_out
        scores = []
        for name, module, key in matrices(layer, args):
            v, w = stats[key].value, module.weight.data
            if v is None or stats[key].tokens == 0:
                scores.append(magnitude_score(w))
            else:  # SparseGPT's Hessian: its diagonal is the squared column norms
                scores.append(activation_score(w, v.diagonal() if v.dim() == 2 else v))
        ratios.append(outlier_ratio(scores, args.owl_m))
    return ratios


def layer_sparsities(args: PruneArgs, sparsity: float, n_layers: int, ratios=None) -> list:
    """Layer l's target: uniform, the comma list of --layer-sparsity, or OWL's from the outlier ratios."""
    if args.layer_sparsity is None:
        return [sparsity] * n_layers
    if args.layer_sparsity == "owl":
        return owl_sparsities(ratios, sparsity, args.owl_lambda)
    return [float(v) for v in args.layer_sparsity.split(",")]


# -----------------------------------------------------------------------------
# The checkpoint: calibration, Algorithm 1, report, output


def parse_nm(s):
    if s is None:
        return None
    try:
        n, m = (int(v) for v in s.split(":"))
    except ValueError:
        raise data.DataError(f"--nm {s!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise data.DataError(f"--nm {s}: need 0 < N < M")
    return n, m


def check_args(args: PruneArgs, config: mm.MixtralConfig, nm):
    if args.method not in cli.METHODS:
        raise data.DataError(f"unknown method {args.method!r}; choose from {', '.join(cli.METHODS)}")
    if not 0 <= args.sparsity < 1:
        raise data.DataError(f"--sparsity {args.sparsity} outside [0, 1)")
    if nm is not None:
        ins = {"expert w1/w3": config.hidden_size, "expert w2": config.intermediate_size}
        if args.prune_attention:
            ins["o_proj"] = config.num_attention_heads * config.dim_head
        for what, n_in in ins.items():
            if n_in % nm[1]:
                raise data.DataError(f"--nm {nm[0]}:{nm[1]}: M={nm[1]} does not divide the {n_in} inputs of {what}")
        if args.method == "sparsegpt" and args.blocksize % nm[1]:
            raise data.DataError(f"--nm with sparsegpt needs M dividing the block size {args.blocksize}")
        if args.layer_sparsity is not None:
            raise data.DataError("--layer-sparsity applies to unstructured sparsity; N:M fixes every layer's")
    if args.stats_tokens not in ("routed", "all"):
        raise data.DataError(f"--stats-tokens {args.stats_tokens!r}: choose routed or all")
    if args.stats_tokens == "all" and args.method == "moe-pruner":
        raise data.DataError("--stats-tokens all: MoE-Pruner's gate is 0 for the tokens not routed to an expert, so "
                             "its statistics are the routed ones; the router-blind reading is --method wanda")
    if args.group not in ("row", "matrix") or (args.group == "matrix" and args.method == "sparsegpt"):
        raise data.DataError(f"--group {args.group!r}: row or matrix (sparsegpt chooses its mask per block of columns)")
    if not (args.blocksize >= 1 and math.isfinite(args.percdamp) and args.percdamp > 0):
        raise data.DataError(f"--blocksize {args.blocksize} must be >= 1 and --percdamp {args.percdamp} finite and > 0")
    if args.layer_sparsity not in (None, "owl"):
        try:
            values = [float(v) for v in args.layer_sparsity.split(",")]
        except ValueError:
            raise data.DataError(f"--layer-sparsity {args.layer_sparsity!r}: a comma list of numbers, or owl") from None
        if len(values) != config.num_hidden_layers or not all(0 <= v < 1 for v in values):
            raise data.DataError(f"--layer-sparsity: need {config.num_hidden_layers} values in [0, 1), got "
                                 f"{args.layer_sparsity!r}")
    if args.layer_sparsity == "owl" and not (0 <= 2 * args.owl_lambda <= args.sparsity
                                             and args.sparsity + 2 * args.owl_lambda < 1 and args.owl_m > 0):
        raise data.DataError(f"--owl-lambda {args.owl_lambda} must keep every layer in [0, 1): OWL's layers lie within "
                             f"--sparsity {args.sparsity} +- 2 x lambda; and --owl-m {args.owl_m} must be > 0")
    if args.dtype not in cli.COMPUTE_DTYPES:
        raise data.DataError(f"--dtype {args.dtype!r}: float32 or bfloat16")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise data.DataError("--device cuda asked for, but torch sees no CUDA device")


CALIBRATION_FILE = "calibration_tokens.npy"  # beside prune_report.json: the exact calibration windows


def npy_bytes(tokens: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, tokens.numpy().astype(np.int32))
    return buf.getvalue()


def prune_checkpoint(model_dir: str, out: str, args: PruneArgs, overwrite: bool = False, log=log,
                     recipe: dict = None) -> dict:
    """Read model_dir, prune it layer by layer (Algorithm 1), write out. Returns the report
    (recipe: where the arguments came from, recorded in it)."""
    nm = parse_nm(args.nm)
    reader = CheckpointReader(model_dir)
    config = reader.config
    check_args(args, config, nm)
    check_output(out, overwrite, [model_dir, args.calib_tokens, data.input_path(args.calib_data)])
    tokens = data.calibration_tokens(model_dir, config.vocab_size, config.max_position_embeddings, args.calib_data,
                                     args.calib_tokens, args.nsamples, args.seqlen, args.seed)
    sparsity = (nm[1] - nm[0]) / nm[1] if nm is not None else args.sparsity  # N:M fixes it at (M - N) / M
    dev = torch.device(args.device)
    main = distributed.is_main()  # under torchrun rank 0 writes; every rank runs its share of the windows
    log = log if main else (lambda m: None)
    writer = CheckpointWriter(out, config, overwrite=overwrite, src_dir=model_dir) if main else None
    with writer or contextlib.nullcontext():
        t_start = time.time()
        log(f"{data.shown_path(model_dir)} -> {data.shown_path(out)}: {args.method}, sparsity {sparsity:.3f}"
            f"{f' ({nm[0]}:{nm[1]})' if nm else ''}, {tokens.shape[0]} x {tokens.shape[1]} calibration tokens"
            + (f", {distributed.world()} processes" if distributed.active() else ""))
        x, pos = embed_windows(reader, distributed.share(tokens), dev, DTYPES[args.act_dtype])  # x: [n, T, hidden]
        ratios = owl_outlier_ratios(reader, x, pos, args, dev) if args.layer_sparsity == "owl" else None
        sparsities = layer_sparsities(args, sparsity, config.num_hidden_layers, ratios)
        if args.layer_sparsity:
            log("layer sparsities " + ", ".join(f"{s:.4f}" for s in sparsities))
        per_matrix, per_layer, fallbacks, routed, errors, solver, laps = {}, [], [], [], {}, {}, Laps()
        if writer is not None:
            copy_outside_layers(reader, writer)  # embedding, final norm and lm_head, as stored
        steps = prune_layers(layers(reader, None, dev, args.dtype), x, pos, args, sparsities, nm, laps,
                             reader.stored_dtype() if args.round_updates else None)
        del x  # the loop holds layer 0's inputs alone, and frees them once they are not needed
        for l, layer, pruned in steps:
            if writer is not None:
                write_layer(writer, reader, l, layer)  # layer l as the checkpoint stores it, one shard
            prefix, counts = f"model.layers.{l}.", pruned["counts"]
            per_matrix.update({prefix + k: z / n for k, (z, n) in counts.items()})
            errors.update({prefix + k: v for k, v in pruned["matrix_error"].items()})
            solver.update({prefix + k: v for k, v in pruned["solver_error"].items()})
            fallbacks += [prefix + f for f in pruned["fallbacks"]]
            routed.append(pruned["routed"])
            experts = [k for k in counts if "experts" in k]
            mean_err = sum(pruned["matrix_error"].values()) / max(1, len(pruned["matrix_error"]))
            per_layer.append({"layer": l, **laps.times, "sparsity_target": sparsities[l],
                              "expert_sparsity": sum(counts[k][0] for k in experts) / sum(counts[k][1] for k in experts),
                              "output_error": pruned["layer_error"], "mean_matrix_error": mean_err})
            left = (time.time() - t_start) / (l + 1) * (config.num_hidden_layers - l - 1)
            log(f"layer {l}: stats {laps.times['stats_forward_s']:.1f}s, prune {laps.times['prune_s']:.2f}s, "
                f"next {laps.times['next_forward_s']:.1f}s, expert sparsity {per_layer[-1]['expert_sparsity']:.4f}, "
                f"matrix error {mean_err:.4f} (mean), layer output error {pruned['layer_error']:.4f}"
                + (f"; ~{left:.0f}s for the {config.num_hidden_layers - l - 1} layer(s) left"
                   if l + 1 < config.num_hidden_layers else ""))
        shown = data.shown_path(model_dir)
        report = {"args": {"model": shown, "out": data.shown_path(out), "overwrite": overwrite, **asdict(args)},
                  "model": shown, "method": args.method, "sparsity_target": sparsity, "nm": args.nm,
                  "layer_sparsity": sparsities, "owl_outlier_ratios": ratios,
                  "calibration": {"nsamples": tokens.shape[0], "seqlen": tokens.shape[1], "tokens": tokens.numel()},
                  "routed_tokens_per_expert": routed, "magnitude_fallback": fallbacks,
                  "layers": per_layer, "seconds": time.time() - t_start, "world_size": distributed.world()}
        report.update(sparsity_summary(config, per_matrix))
        report["mean_matrix_error"] = sum(errors.values()) / max(1, len(errors))
        report["per_matrix_sparsity"] = per_matrix
        report["per_matrix_error"] = errors  # ||W X - W' X||_F / ||W X||_F on the inputs each matrix saw
        if solver:
            report["per_matrix_solver_error"] = solver  # SparseGPT's, on its Hessian (the dense-pass inputs)
        if recipe:
            report["recipe"] = recipe
        if main:
            writer.extra_files["prune_report.json"] = report
            writer.extra_files[CALIBRATION_FILE] = npy_bytes(tokens)  # what --recipe repeats the run with
    log(f"expert sparsity {report['expert_sparsity']:.4f}, all decoder linear layers "
        f"{report['decoder_linear_sparsity']:.4f}, whole model {report['overall_sparsity']:.4f}, mean matrix "
        f"error {report['mean_matrix_error']:.4f} ({report['seconds']:.1f}s)")
    return report


def sparsity_summary(config, per_matrix):
    """Expert-only, decoder-linear (experts + attention + router, Wanda's check) and whole-model
    sparsity, computed from the pruned matrices' sparsity and the config's shapes."""
    shapes = expected_shapes(config)
    numel = {k: math.prod(s) for k, s in shapes.items()}
    zeros = {k: per_matrix.get(k, 0.0) * numel[k] for k in numel}
    experts = [k for k in numel if ".experts." in k]
    linear = [k for k in numel if ".layers." in k and len(shapes[k]) == 2]
    frac = lambda keys: sum(zeros[k] for k in keys) / sum(numel[k] for k in keys)
    return {"expert_sparsity": frac(experts), "decoder_linear_sparsity": frac(linear),
            "overall_sparsity": frac(list(numel))}


def check_saved_windows(path: str, recipe: str):
    """A recipe's saved calibration windows must be those of the run it records: the [nsamples,
    seqlen] tokens of its "calibration" field (where it has one)."""
    try:
        shape = tuple(np.load(path, mmap_mode="r").shape)
    except (ValueError, OSError) as e:
        raise data.DataError(f"{path}: not a saved array of calibration windows ({e})") from None
    with open(recipe) as f:
        recorded = json.load(f).get("calibration")  # apply_recipe has read the file as JSON already
    if not isinstance(recorded, dict):
        return
    nsamples, seqlen = recorded.get("nsamples"), recorded.get("seqlen")
    if shape != (nsamples, seqlen):
        raise data.DataError(f"{path} holds {' x '.join(map(str, shape))} tokens, but {recipe} records {nsamples} x "
                             f"{seqlen}: not the windows of that run; pass --calib-tokens or --calib-data to choose")


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    with cli.errors():
        recipe = cli.apply_recipe(p, a, argv, paths=("model", "calib_tokens", "calib_data"))
        if recipe and not cli.given_flags(p, argv) & {"calib_data", "calib_tokens", "nsamples", "seqlen", "seed"}:
            saved = os.path.join(os.path.dirname(a.recipe), CALIBRATION_FILE)
            if os.path.isfile(saved):  # the exact windows of the recorded run
                check_saved_windows(saved, a.recipe)
                a.calib_tokens, a.calib_data = saved, "stdlib"
        cli.check_calibration_args(p, a, argv)
        if a.method is None:
            p.error("--method is required (or --recipe)")
        a.device = distributed.init(a.device)  # under torchrun: join the process group
        args = PruneArgs(**{k: v for k, v in vars(a).items() if k not in ("model", "out", "overwrite", "recipe")})
        try:
            return prune_checkpoint(a.model or data.default_model_dir(), a.out, args, a.overwrite, recipe=recipe)
        finally:
            distributed.finish()


if __name__ == "__main__":
    main()
