"""
A hand-written Mixtral that reads and writes the official Hugging Face checkpoint layout.

What is here, in dependency order:
  1. MixtralConfig: every field of a Mixtral config.json.
  2. The model: RMSNorm, rotary embeddings (half-split "rotate_half" convention), grouped-query
     causal attention (optionally sliding-window), SwiGLU experts, the top-k router of
     MoE-Pruner's Eq. 2, and a sparse MoE block that runs each expert on its routed tokens only.
  3. Router statistics shared by every script: the load-balancing loss (Switch/Mixtral) and the
     expert-load coefficient of variation of MoE-Pruner's Eq. 4-5.
  4. Checkpoint I/O: lazy, memory-mapped reading of config.json + (sharded) safetensors, one
     decoder layer at a time; streaming writing in the same layout with an index.

The module and parameter names reproduce the checkpoint keys of mistralai/Mixtral-8x7B-v0.1
one for one (model.layers.N.block_sparse_moe.experts.E.w1.weight, ...), so a state_dict of this
model *is* an official checkpoint. The experts stay separate 2-D matrices, as in the checkpoint,
because pruning works per matrix and torch's semi-structured sparse tensors are 2-D only.

References:
  - Mixtral of Experts, Jiang et al. 2024 (arXiv 2401.04088).
  - MoE-Pruner, Xie et al. 2024 (arXiv 2410.12013): Eq. 2 (router), Eq. 4-5 (expert load).
  - Switch Transformers, Fedus et al. 2021 (arXiv 2101.03961): the load-balancing loss.
  - transformers' MixtralForCausalLM, the independent reference this file is tested against.
  - nanoGPT's model.py, for the shape of this file.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file


# -----------------------------------------------------------------------------
# 1. Configuration


@dataclass
class MixtralConfig:
    # Defaults are those of mistralai/Mixtral-8x7B-v0.1's config.json.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert: 3.5x hidden, the SwiGLU width of Mistral-7B
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8  # grouped-query attention: 4 query heads share one k/v head
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads (as in transformers)
    num_local_experts: int = 8
    num_experts_per_tok: int = 2  # top-2 routing (Eq. 2)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6  # Mixtral's RoPE base, larger than Llama's 1e4 for its 32k context
    sliding_window: Optional[int] = None  # null for Mixtral-8x7B-v0.1; an int limits attention to W keys
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"  # SwiGLU; the only activation Mixtral uses
    torch_dtype: str = "bfloat16"  # the dtype the weights are stored in
    # Not transformers fields (transformers ignores them): expert-level baselines of expert_prune.py.
    dynamic_skip_beta: Optional[list] = None  # NAEE dynamic skipping: per layer beta, skip expert 2 if g1 < beta g0
    condensed_layers: Optional[dict] = None  # CD-MoE: {"layer": {"experts": [...], "weights": [...]}}, router skipped
    # config.json keys this class does not use (architectures, bos_token_id, ...): kept verbatim
    # so that a saved checkpoint has the same config.json as the one loaded.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "MixtralConfig":
        if d.get("model_type") != "mixtral":
            raise CheckpointError(f"model_type is {d.get('model_type')!r}, not 'mixtral'")
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)  # transformers v5 name
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]  # transformers v5 name
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {cfg.hidden_act!r} is not supported (Mixtral uses 'silu')")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 1 <= cfg.num_experts_per_tok <= cfg.num_local_experts:
            raise CheckpointError("num_experts_per_tok must lie in [1, num_local_experts]")
        return cfg

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        for optional in ("head_dim", "dynamic_skip_beta", "condensed_layers"):
            if d[optional] is None:
                del d[optional]
        d["model_type"] = "mixtral"
        d.setdefault("architectures", ["MixtralForCausalLM"])
        return d


# -----------------------------------------------------------------------------
# 2. The model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 whatever the compute dtype, then scale in the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(config: MixtralConfig, seqlen: int, device=None, dtype=torch.float32):
    """Rotary tables for positions 0..seqlen-1, each [seqlen, head_dim].

    Half-split convention: frequency i rotates the pair (x_i, x_{i + d/2}). The official HF
    checkpoint's q_proj/k_proj rows are permuted for exactly this convention; Mistral's own
    reference code rotates interleaved pairs (x_{2i}, x_{2i+1}) and would be silently wrong here.
    """
    d = config.dim_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    t = torch.arange(seqlen, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [seqlen, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [seqlen, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x: [batch, heads, seqlen, head_dim]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def attention_mask(seqlen: int, sliding_window: Optional[int], device=None):
    """Boolean [seqlen, seqlen] mask, True = may attend; None when plain causal suffices.

    With a sliding window W, query i sees keys j with i - W < j <= i (W keys including itself),
    the convention of transformers' Mixtral/Mistral.
    """
    if sliding_window is None or seqlen <= sliding_window:
        return None
    i = torch.arange(seqlen, device=device)
    dist = i[:, None] - i[None, :]  # [query, key]
    return (dist >= 0) & (dist < sliding_window)


class Attention(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.dim_head
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, heads, T, head_dim]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, kv_heads, T, head_dim]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, kv_heads, T, head_dim]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, heads * head_dim]
        return self.o_proj(y)


class Expert(nn.Module):
    """SwiGLU feed-forward with the official names: w1 = gate proj, w3 = up proj, w2 = down proj."""

    def __init__(self, config: MixtralConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w1 = nn.Linear(h, i, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=False)

    def hidden(self, x):
        """The input of w2: silu(w1 x) * (w3 x). Pruning needs it as w2's calibration input."""
        return F.silu(self.w1(x)) * self.w3(x)

    def forward(self, x):
        return self.w2(self.hidden(x))


def route(router_logits: torch.Tensor, top_k: int):
    """MoE-Pruner Eq. 2: Gate(x) = Softmax(TopK(x W_g)), with Mixtral's order of operations.

    Softmax over *all* logits in float32, keep the top-k probabilities, renormalise them to sum
    to 1 (identical to a softmax over the top-k logits). Returns (weights [N, k] float32,
    experts [N, k] int64); every expert not among a token's top-k has gate 0.
    """
    probs = F.softmax(router_logits.float(), dim=-1)  # [N, n_experts]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [N, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def skip_second(weights: torch.Tensor, beta: float) -> torch.Tensor:
    """NAEE dynamic skipping (arXiv 2402.14800, Section 3.2): with top-2 weights g0 >= g1, a token
    skips its second expert when g1 < beta * g0. Returns the [N] bool mask of skipping tokens."""
    return weights[:, 1] < beta * weights[:, 0]


class ExpertCall(NamedTuple):
    """What one expert saw and produced in one MoE forward; handed to an observer."""

    expert: int  # expert index within the layer
    tokens: torch.Tensor  # [n] indices into the flattened [batch * seqlen] token axis
    x: torch.Tensor  # [n, hidden] the routed tokens' inputs (post-attention RMSNorm output): input of w1, w3
    gate: torch.Tensor  # [n] float32 renormalised routing weight of this expert for those tokens (Eq. 2)
    h: torch.Tensor  # [n, intermediate] silu(w1 x) * (w3 x): input of w2
    y: torch.Tensor  # [n, hidden] the expert's output before it is scaled by the gate


class SparseMoeBlock(nn.Module):
    """Router + experts. Each expert runs on the tokens routed to it, gathered into one batch.

    forward(x, observer) calls observer(ExpertCall) once per expert that received tokens, which
    is how pruning collects per-expert inputs and gates and how distillation collects expert
    outputs, without hooks or monkey-patching. Returns (output, router logits or None).

    Two expert-level variants from the related papers, both off for a plain Mixtral: NAEE's
    dynamic skipping (skip_beta) and a CD-MoE condensed layer (condensed: fixed experts with fixed
    weights on every token, no router).
    """

    def __init__(self, config: MixtralConfig, layer_idx: int = 0):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)  # the router W_g
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))
        self.skip_beta = config.dynamic_skip_beta[layer_idx] if config.dynamic_skip_beta else None
        c = (config.condensed_layers or {}).get(str(layer_idx))
        self.condensed = (list(c["experts"]), list(c["weights"])) if c else None

    def forward(self, x, observer: Optional[Callable[[ExpertCall], None]] = None):
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, hidden]
        if self.condensed is not None:
            return self._condensed(x, observer).view(B, T, H), None  # [B, T, hidden], no router
        router_logits = self.gate(x)  # [N, n_experts]
        weights, experts = route(router_logits, self.top_k)  # [N, k], [N, k]
        flat_expert, flat_weight = experts.reshape(-1), weights.reshape(-1)  # [N*k]
        slot = torch.arange(flat_expert.numel(), device=x.device)
        if self.skip_beta is not None:  # drop skipped second choices, renormalise the first to 1
            skip = skip_second(weights, self.skip_beta)
            weights = torch.where(skip[:, None], torch.tensor([1.0, 0.0], device=x.device), weights)
            flat_weight = weights.reshape(-1)  # [N*k]
            dropped = torch.stack([torch.zeros_like(skip), skip], dim=1).reshape(-1)  # [N*k] second slots of skippers
            slot = slot[~dropped]
            flat_expert = flat_expert[slot]
        # Sort the (token, expert) assignments by expert, so each expert's tokens are contiguous.
        order = slot[torch.argsort(flat_expert, stable=True)]
        token_of = order // self.top_k  # token index of each sorted assignment
        gate_of = flat_weight[order]  # its routing weight
        counts = torch.bincount(experts.reshape(-1)[order], minlength=len(self.experts)).tolist()  # per expert
        xs = x[token_of]  # [assignments, hidden] gather the tokens, never the weights
        ys = []
        for e, (x_e, g_e, t_e) in enumerate(zip(xs.split(counts), gate_of.split(counts), token_of.split(counts))):
            if x_e.shape[0] == 0:
                continue
            expert = self.experts[e]
            h_e = expert.hidden(x_e)  # [n, intermediate]
            y_e = expert.w2(h_e)  # [n, hidden]
            if observer is not None:
                observer(ExpertCall(e, t_e, x_e, g_e, h_e, y_e))
            ys.append(y_e * g_e[:, None])  # float32 product, as in transformers
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, torch.cat(ys).to(x.dtype))  # each token sums its experts
        return out.view(B, T, H), router_logits  # [B, T, hidden], [N, n_experts]

    def _condensed(self, x, observer):
        out = torch.zeros_like(x)
        tokens = torch.arange(x.shape[0], device=x.device)
        for e, w in zip(*self.condensed):
            expert = self.experts[e]
            h = expert.hidden(x)
            y = expert.w2(h)
            if observer is not None:
                observer(ExpertCall(e, tokens, x, torch.full((x.shape[0],), float(w), device=x.device), h, y))
            out += (y * w).to(x.dtype)
        return out


class DecoderLayer(nn.Module):
    """One Mixtral block: x + attn(norm(x)), then + moe(norm(x)). Buildable and runnable alone."""

    def __init__(self, config: MixtralConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(config, layer_idx)

    def attend(self, x, cos, sin, mask=None):
        """The attention half: x + attn(norm(x)). The MoE half's input is post_attention_layernorm of it."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask)

    def forward(self, x, cos, sin, mask=None, observer=None):
        """x: [B, T, hidden]; cos/sin: [T, head_dim]. Returns (x, router_logits [B*T, n_experts])."""
        x = self.attend(x, cos, sin, mask)
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(x), observer)
        return x + moe_out, router_logits


class Mixtral(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        # Named as in the checkpoint so that state_dict() keys are the official keys.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, l) for l in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, idx, observers=None, return_router_logits=False):
        """idx: [B, T] token ids. observers: optional {layer index: observer} for the MoE blocks.

        Returns logits [B, T, vocab] (and the per-layer router logits when asked, for the
        load-balancing loss).
        """
        B, T = idx.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.config.max_position_embeddings}")
        x = self.model.embed_tokens(idx)  # [B, T, hidden]
        cos, sin = rope_cos_sin(self.config, T, idx.device, x.dtype)
        mask = attention_mask(T, self.config.sliding_window, idx.device)
        all_router_logits = []
        for i, layer in enumerate(self.model.layers):
            x, router_logits = layer(x, cos, sin, mask, (observers or {}).get(i))
            all_router_logits.append(router_logits)
        logits = self.lm_head(self.model.norm(x))
        return (logits, all_router_logits) if return_router_logits else logits


def init_weights(model: nn.Module, std: float = 0.02, seed: Optional[int] = None):
    """Normal(0, std) for every matrix, ones for norms (transformers' Mixtral init; std 0.02 is its
    initializer_range)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def next_token_nll(logits: torch.Tensor, idx: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of predicting idx[:, t+1] from logits[:, t] (float32), over all windows.
    logits [B, T, vocab], idx [B, T]; B * (T - 1) predictions."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B * (T-1), vocab]
    return F.cross_entropy(pred, idx[:, 1:].reshape(-1), reduction=reduction)  # targets [B * (T-1)]


# -----------------------------------------------------------------------------
# 3. Router statistics


def load_balancing_loss(router_logits: list, top_k: int, per_layer: bool = False) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: n_experts * sum_e f_e * P_e.

    f_e = fraction of (token, slot) assignments that go to expert e, P_e = mean router
    probability of e. Minimal (= top_k) when both are uniform. per_layer=False pools every
    layer's tokens first, exactly as transformers' load_balancing_loss_func does: that balances
    only the experts' total over layers, so one layer can send most tokens to experts that
    another layer avoids. per_layer=True is Switch Transformers' form (Fedus et al. 2021, Eq. 4,
    applied in every MoE layer): the mean over layers of each layer's own loss.
    """
    if per_layer:
        return torch.stack([load_balancing_loss([l], top_k) for l in router_logits]).mean()
    logits = torch.cat(router_logits)  # [layers * N, n_experts]
    n_experts = logits.shape[-1]
    probs = F.softmax(logits.float(), dim=-1)
    _, chosen = torch.topk(probs, top_k, dim=-1)  # [M, k]
    f = F.one_hot(chosen, n_experts).float().mean(dim=0)  # [k, n_experts]
    p = probs.mean(dim=0)  # [n_experts]
    return n_experts * (f * p).sum()


def expert_load_cv(top1_counts: torch.Tensor) -> float:
    """MoE-Pruner Eq. 4-5: coefficient of variation sigma / mu of how often each expert of a layer
    is a token's top-1 choice (population std, as in the paper's definition). 0 = perfectly
    balanced; sqrt(n_experts - 1) = every token picks the same expert."""
    c = top1_counts.double()
    mu = c.mean()
    return float(torch.sqrt(((c - mu) ** 2).mean()) / mu)


# -----------------------------------------------------------------------------
# 4. Checkpoint I/O (official Hugging Face layout)


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message is one line naming the problem."""


def expected_shapes(config: MixtralConfig) -> dict:
    """Every tensor name of an official Mixtral checkpoint with its shape, from the config alone."""
    h = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for l in range(config.num_hidden_layers):
        shapes.update(layer_shapes(config, l))
    return shapes


def layer_shapes(config: MixtralConfig, l: int) -> dict:
    h, i, d = config.hidden_size, config.intermediate_size, config.dim_head
    p = f"model.layers.{l}."
    s = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (config.num_attention_heads * d, h),
        p + "self_attn.k_proj.weight": (config.num_key_value_heads * d, h),
        p + "self_attn.v_proj.weight": (config.num_key_value_heads * d, h),
        p + "self_attn.o_proj.weight": (h, config.num_attention_heads * d),
        p + "block_sparse_moe.gate.weight": (config.num_local_experts, h),
    }
    for e in range(config.num_local_experts):
        q = f"{p}block_sparse_moe.experts.{e}."
        s.update({q + "w1.weight": (i, h), q + "w3.weight": (i, h), q + "w2.weight": (h, i)})
    return s


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_config(path: str) -> MixtralConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path}: no config.json")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        return MixtralConfig.from_dict(d)
    except CheckpointError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except TypeError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


class CheckpointReader:
    """Lazy, memory-mapped view of a checkpoint directory: nothing is read until asked for.

    Holds only the shards' headers, so a single decoder layer of Mixtral-8x7B (~93 GB) can be
    materialised without touching the rest. On opening it checks, from headers alone, that the
    key set and every shape match the config one for one (as nanoGPT's from_pretrained does).
    """

    def __init__(self, path: str):
        self.path = path
        self.config = read_config(path)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        elif os.path.isfile(single):
            self.weight_map = None
        else:
            raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
        if self.weight_map is None:
            self.weight_map = {k: "model.safetensors" for k in self._open("model.safetensors").keys()}
        else:
            for shard in sorted(set(self.weight_map.values())):
                # every shard named by the index must exist and hold the keys the index says it does
                keys = set(self._open(shard).keys())
                missing = [k for k, s in self.weight_map.items() if s == shard and k not in keys]
                if missing:
                    raise CheckpointError(f"{shard}: index names {missing[0]} but the shard does not hold it")
        self._check_keys()

    def _open(self, shard: str):
        """A fresh handle on a shard. Not cached: a cached handle keeps every page it has read
        mapped, so reading a 93 GB checkpoint layer by layer would grow the resident set."""
        fn = os.path.join(self.path, shard)
        if not os.path.isfile(fn):
            raise CheckpointError(f"{self.path}: missing shard {shard}")
        try:
            return safe_open(fn, framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{fn}: unreadable safetensors file ({str(e).splitlines()[0]})") from None

    def _check_keys(self):
        want = expected_shapes(self.config)
        have = set(self.weight_map)
        if self.config.tie_word_embeddings:
            have.discard("lm_head.weight")  # some tied checkpoints still store it; it is the embedding
        missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
        if missing:
            raise CheckpointError(f"{self.path}: missing key {missing[0]} ({len(missing)} missing in all)")
        if unexpected:
            raise CheckpointError(f"{self.path}: unexpected key {unexpected[0]} ({len(unexpected)} unexpected in all)")
        headers = {s: self._open(s) for s in set(self.weight_map.values())}  # headers only: no data is read
        for k, shape in want.items():
            got = tuple(headers[self.weight_map[k]].get_slice(k).get_shape())
            if got != shape:
                raise CheckpointError(f"{self.path}: {k} has shape {list(got)}, config implies {list(shape)}")

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype a tensor is stored in (read from the header, not the data)."""
        code = self._open(self.weight_map[name]).get_slice(name).get_dtype()  # e.g. "BF16"
        return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]

    def stored_dtype(self) -> torch.dtype:
        """The dtype the expert weights are stored in."""
        return self.dtype_of("model.layers.0.block_sparse_moe.experts.0.w1.weight")

    def get(self, name: str, dtype=None, device="cpu") -> torch.Tensor:
        handle = self._open(self.weight_map[name])
        try:
            t = handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read {name} ({str(e).splitlines()[0]})") from None
        return t.to(device=device, dtype=dtype or t.dtype)

    def load_into(self, module: nn.Module, prefix: str, dtype=None, device="cpu"):
        """Fill module's parameters from the tensors named prefix + parameter name."""
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.data = self.get(prefix + name, dtype, device)
        return module


def load_layer(reader: CheckpointReader, l: int, dtype=torch.float32, device="cpu") -> DecoderLayer:
    """Materialise decoder layer l alone (the rest of the checkpoint is not read)."""
    with torch.device("meta"):
        layer = DecoderLayer(reader.config, l)
    layer = layer.to_empty(device=device)
    return reader.load_into(layer, f"model.layers.{l}.", dtype, device)


def load_embedding(reader: CheckpointReader, dtype=torch.float32, device="cpu") -> nn.Embedding:
    with torch.device("meta"):
        emb = nn.Embedding(reader.config.vocab_size, reader.config.hidden_size)
    return reader.load_into(emb.to_empty(device=device), "model.embed_tokens.", dtype, device)


def load_model(path: str, dtype=torch.float32, device="cpu") -> Mixtral:
    """The whole model from an official-layout checkpoint, computing in `dtype` on `device`."""
    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = Mixtral(reader.config)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "lm_head.weight" and reader.config.tie_word_embeddings:
                continue  # to_empty() untied it; it is re-tied to the embedding below
            p.data = reader.get(name, dtype, device)
        if reader.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class CheckpointWriter:
    """Streams tensors into an official-layout checkpoint, a shard at a time.

    Everything goes to a temporary sibling folder that is renamed to `path` by close(), so an
    interrupted run leaves `path` untouched. An existing `path` is an error unless overwrite.
    Shards are named model-0000i-of-0000n.safetensors with model.safetensors.index.json, as the
    official checkpoints are (a single shard is written as model.safetensors).
    """

    def __init__(self, path: str, config: MixtralConfig, overwrite: bool = False, src_dir: Optional[str] = None,
                 max_shard_bytes: int = 2 * 1024**3):  # 2 GB shards: 47 files for Mixtral-8x7B in bf16
        path = os.path.abspath(path)
        if os.path.exists(path) and not overwrite:
            raise CheckpointError(f"{path} exists (pass --overwrite to replace it)")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        self.path, self.config, self.overwrite, self.src_dir = path, config, overwrite, src_dir
        self.max_shard_bytes = max_shard_bytes
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
        self.pending, self.pending_bytes, self.shards, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor):
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = t
        self.pending_bytes += nbytes
        self.total += nbytes

    def add_module(self, module: nn.Module, prefix: str):
        for name, p in module.named_parameters():
            self.add(prefix + name, p)

    def flush(self):
        """Write what is pending as a shard now (prune.py calls this after every layer, so that no
        more than one layer is ever held)."""
        if not self.pending:
            return
        fn = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, os.path.join(self.tmp, fn), metadata={"format": "pt"})
        self.shards.append(fn)
        self.weight_map.update({k: fn for k in self.pending})
        self.pending, self.pending_bytes = {}, 0

    def close(self, extra_files: Optional[dict] = None):
        """Finish the checkpoint: shard names, index, config.json, tokenizer files, then rename."""
        self.flush()
        n = len(self.shards)
        final = {s: "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                 for i, s in enumerate(self.shards)}
        for s, f in final.items():
            os.rename(os.path.join(self.tmp, s), os.path.join(self.tmp, f))
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {k: final[s] for k, s in sorted(self.weight_map.items())}}
            with open(os.path.join(self.tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(self.tmp, "config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        if self.src_dir:
            for fn in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(self.src_dir, fn)):
                    shutil.copy(os.path.join(self.src_dir, fn), os.path.join(self.tmp, fn))
        for fn, content in (extra_files or {}).items():
            with open(os.path.join(self.tmp, fn), "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content, indent=2))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint is an ordinary folder
        for fn in os.listdir(self.tmp):
            os.chmod(os.path.join(self.tmp, fn), 0o666 & ~umask)
        if os.path.exists(self.path):  # only reachable with overwrite=True
            old = self.path + ".old"
            os.rename(self.path, old)
            os.rename(self.tmp, self.path)
            shutil.rmtree(old)
        else:
            os.rename(self.tmp, self.path)

    def abort(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# -----------------------------------------------------------------------------
# 5. Layer by layer (prune.py, distill.py, expert_prune.py): one decoder layer in memory at a time


@torch.no_grad()
def embed_windows(reader: CheckpointReader, tokens: torch.Tensor, device="cpu", act_dtype=torch.float32):
    """Calibration windows [n, T] -> (activations [n, T, hidden] in act_dtype, cos, sin, mask)."""
    emb = load_embedding(reader, torch.float32, device)
    x = emb(tokens.to(device)).to(act_dtype)
    cos, sin = rope_cos_sin(reader.config, tokens.shape[1], device)
    return x, cos, sin, attention_mask(tokens.shape[1], reader.config.sliding_window, device)


@torch.no_grad()
def run_layer(layer: DecoderLayer, x, cos, sin, mask, batch_size: int, observer=None):
    """The layer's outputs for all windows, x [n, T, hidden] -> [n, T, hidden] in x's dtype,
    computed in float32, batch_size windows at a time."""
    out = torch.empty_like(x)
    for i in range(0, len(x), batch_size):
        out[i:i + batch_size] = layer(x[i:i + batch_size].float(), cos, sin, mask, observer)[0].to(x.dtype)
    return out


def copy_outside_layers(reader: CheckpointReader, writer: "CheckpointWriter"):
    """Embedding, final norm and lm_head, written bitwise as stored."""
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        if name in reader.weight_map and not (name == "lm_head.weight" and reader.config.tie_word_embeddings):
            writer.add(name, reader.get(name))


def save_model(model: Mixtral, path: str, dtype=None, overwrite=False, src_dir=None, max_shard_bytes=2 * 1024**3,
               extra_files=None):
    """Write model in the official layout (tied lm_head is not stored, as transformers does)."""
    config = model.config
    if dtype is not None:
        config = MixtralConfig.from_dict({**config.to_dict(), "torch_dtype": {v: k for k, v in DTYPES.items()}[dtype]})
    w = CheckpointWriter(path, config, overwrite, src_dir, max_shard_bytes)
    try:
        for name, p in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            w.add(name, p.to(dtype) if dtype is not None else p)
        w.close(extra_files)
    except BaseException:
        w.abort()
        raise
