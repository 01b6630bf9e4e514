"""
Where the router's hint acts: the readings run_paper.py's anatomy part takes of a model and of two
pruned checkpoints, beside the perplexities.

MoE-Pruner's score (Eq. 9) differs from Wanda's (Eq. 8) only through each routed token's gate:
|W_ij| ||X_j * Gate|| = |W_ij| ||X_j|| r_j with r_j = ||X_j * Gate|| / ||X_j||. A mask changes only
where r_j varies over a matrix's input columns j (gate_anatomy measures how much, layer by layer),
and mask_difference counts the weights whose mask the gate changed.
"""

import torch

import mini_mixtral as mm
import prune
from checkpoint import CheckpointReader
from eval_ppl import topk_mass
from layerwise import embed_windows, layers, run_layer


@torch.no_grad()
def gate_anatomy(model_dir: str, tokens: torch.Tensor, batch_size: int = 8) -> list:
    """Per layer of the dense model: the gates' mean and spread (as the model weights by, renormalised
    or not), the top-k probability mass, and how much the gate can change a per-row mask. The gate
    enters MoE-Pruner's score only through r_j = ||X_j * Gate|| / ||X_j|| = sqrt(sum g^2 x_j^2 / sum x_j^2) over an expert's
    routed tokens: if r_j were the same for every input column j, every row's ranking, and so
    the mask, would be Wanda's. Reported: the coefficient of variation of r_j over j, averaged
    over the layer's experts, for the input of w1/w3 (x) and of w2 (h)."""
    reader = CheckpointReader(model_dir)
    x, pos = embed_windows(reader, tokens, "cpu")
    out = []
    for l, layer in layers(reader, None, "cpu"):
        E = len(layer.block_sparse_moe.experts)
        sums = {(e, k): [0.0, 0.0] for e in range(E) for k in "xh"}  # sum x_j^2, sum g^2 x_j^2 (vectors)
        gates, mass = [], []

        def observer(c: mm.ExpertCall):
            gates.append(c.gate)
            for k, v in (("x", c.x), ("h", c.h)):
                sums[(c.expert, k)][0] = sums[(c.expert, k)][0] + prune.sq_norm(v)
                sums[(c.expert, k)][1] = sums[(c.expert, k)][1] + prune.sq_norm(v, c.gate)

        hook = layer.block_sparse_moe.gate.register_forward_hook(
            lambda mod, a, logits: mass.append(topk_mass(logits, layer.config.num_experts_per_tok)))
        x = run_layer(layer, x, pos, batch_size, observer)
        hook.remove()
        g = torch.cat(gates)
        spread = {}
        for k in "xh":
            cvs = []
            for e in range(E):
                plain, gated = sums[(e, k)]
                if isinstance(plain, torch.Tensor):
                    r = (gated / plain.clamp(min=1e-300)).sqrt()
                    cvs.append((r.std() / r.mean()).item())
            spread[k] = sum(cvs) / len(cvs)
        out.append({"layer": l, "gate_mean": g.mean().item(), "gate_std": g.std().item(),
                    "topk_mass": torch.cat(mass).mean().item(), "r_spread_x": spread["x"], "r_spread_h": spread["h"]})
    return out


def mask_difference(a: str, b: str, n_layers: int) -> list:
    """Per layer and expert matrix kind (w1, w2, w3): the fraction of weights pruned in one
    checkpoint and kept in the other."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    rows = []
    for l in range(n_layers):
        for kind in ("w1", "w2", "w3"):
            names = [k for k in ra.weight_map if k.startswith(f"model.layers.{l}.") and k.endswith(f".{kind}.weight")
                     and ".experts." in k]
            diff = sum(int(((ra.get(k) == 0) != (rb.get(k) == 0)).sum()) for k in names)
            total = sum(ra.get(k).numel() for k in names)
            rows.append({"layer": l, "matrix": kind, "mask_difference": diff / total})
    return rows
