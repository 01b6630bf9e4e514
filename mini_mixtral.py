"""
A hand-written Mixtral: the model and nothing else (checkpoint I/O is checkpoint.py).

The same model reads OLMoE's and Qwen3-MoE's checkpoints, whose decoders differ from Mixtral's
in two switches, each a config field: the top-k gates are renormalised or not (norm_topk_prob),
and queries and keys are RMS-normalised before RoPE, over the whole projection (OLMoE) or per
head (Qwen3-MoE) (qk_norm). Their tensor and config.json names are mapped in checkpoint.py.

In dependency order: MixtralConfig (every field of a Mixtral config.json), RMSNorm, rotary
embeddings (half-split "rotate_half" convention), grouped-query causal attention (optionally
sliding-window), SwiGLU experts, the top-k router of MoE-Pruner's Eq. 2, the sparse MoE block
that runs each expert on its routed tokens only and shows what each expert saw to an observer,
the decoder layer and the whole model; then weight initialisation and the next-token loss.

The module and parameter names reproduce the checkpoint keys of mistralai/Mixtral-8x7B-v0.1
one for one (model.layers.N.block_sparse_moe.experts.E.w1.weight, ...), so a state_dict of this
model *is* an official checkpoint: checkpoint.load_model / save_model read and write it, checking
key sets and shapes one for one as nanoGPT's from_pretrained does. The experts stay separate 2-D
matrices, as in the checkpoint, because pruning works per matrix and torch's semi-structured
sparse tensors are 2-D only.

References:
  - Mixtral of Experts, Jiang et al. 2024 (arXiv 2401.04088).
  - MoE-Pruner, Xie et al. 2024 (arXiv 2410.12013): Eq. 2 (router).
  - OLMoE, Muennighoff et al. 2024 (arXiv 2409.02060); Qwen3 Technical Report, 2025 (arXiv 2505.09388).
  - transformers' MixtralForCausalLM, OlmoeForCausalLM and Qwen3MoeForCausalLM, the independent
    references this file is tested against.
  - nanoGPT's model.py and gpt-fast's Mixtral, for the shape of this file.
"""

from dataclasses import dataclass, field, fields
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class MixtralConfig:
    # Defaults are those of mistralai/Mixtral-8x7B-v0.1's config.json.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert: 3.5x hidden, the SwiGLU width of Mistral-7B (Qwen3-MoE's
    # config.json calls the expert width moe_intermediate_size; checkpoint.FAMILIES maps the names)
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
    norm_topk_prob: bool = True  # renormalise each token's top-k gates to sum to 1 (Mixtral always does;
    # OLMoE-1B-7B does not, and keeps the softmax's probabilities over all experts)
    qk_norm: Optional[str] = None  # RMSNorm of queries and keys before RoPE: None (Mixtral), "projection"
    # over each token's whole q and k projections (OLMoE), or "head" over each head (Qwen3-MoE)
    # config.json keys this class does not use (architectures, bos_token_id, ...): kept verbatim
    # so that a saved checkpoint has the same config.json as the one loaded.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def model_type(self) -> str:
        """The checkpoint family ("mixtral", "olmoe" or "qwen3_moe"): its layout and names."""
        return self.extra.get("model_type", "mixtral")

    @classmethod
    def from_dict(cls, d: dict) -> "MixtralConfig":
        """A dict in Mixtral's names (checkpoint.read_config maps the other families' config.json to
        them); ValueError (one line) for a field of the wrong kind (checkpoint.check_config then
        checks its values)."""
        if not isinstance(d, dict):
            raise ValueError(f"not a JSON object but a {type(d).__name__}")
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", cls.rope_theta)  # transformers v5 name
        if "torch_dtype" not in d and "dtype" in d:
            d["torch_dtype"] = d["dtype"]  # transformers v5 name
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        try:
            cfg = cls(**known, extra={k: v for k, v in d.items() if k not in names})
        except TypeError as e:
            raise ValueError(str(e)) from None
        return cfg

    def to_dict(self) -> dict:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"})
        if d["head_dim"] is None:
            del d["head_dim"]
        d["model_type"] = self.model_type
        return d


# -----------------------------------------------------------------------------
# The model


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
        self.qk_norm = config.qk_norm
        if self.qk_norm is not None:  # OLMoE: norms as wide as the projections; Qwen3-MoE: as a head
            per_head = self.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else self.n_head * self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else self.n_kv_head * self.head_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)  # [B, T, heads * head_dim], [B, T, kv_heads * head_dim]
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)  # [B, T, heads, head_dim]
        k = k.view(B, T, self.n_kv_head, self.head_dim)  # [B, T, kv_heads, head_dim]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, head_dim], [B, kv_heads, T, head_dim]
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


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool = True):
    """MoE-Pruner Eq. 2: Gate(x) = Softmax(TopK(x W_g)), with Mixtral's order of operations.

    Softmax over *all* logits in float32, keep the top-k probabilities, renormalise them to sum
    to 1 (identical to a softmax over the top-k logits). Without renormalise (OLMoE) the gates are
    the top-k probabilities of the softmax over all experts, summing to less than 1. Returns
    (weights [N, k] float32, experts [N, k] int64); every expert not among a token's top-k has gate 0.
    """
    probs = F.softmax(router_logits.float(), dim=-1)  # [N, n_experts]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [N, k]
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


class ExpertCall(NamedTuple):
    """What one expert saw and produced in one MoE forward; handed to an observer."""

    expert: int  # expert index within the layer
    tokens: torch.Tensor  # [n] indices into the flattened [batch * seqlen] token axis
    x: torch.Tensor  # [n, hidden] the routed tokens' inputs (post-attention RMSNorm output): input of w1, w3
    gate: torch.Tensor  # [n] float32 routing weight of this expert for those tokens (Eq. 2, as the model routes)
    h: torch.Tensor  # [n, intermediate] silu(w1 x) * (w3 x): input of w2
    y: torch.Tensor  # [n, hidden] the expert's output before it is scaled by the gate


class SparseMoeBlock(nn.Module):
    """Router + experts. Each expert runs on the tokens routed to it, gathered into one batch.

    forward(x, observer) calls observer(ExpertCall) once per expert that received tokens, which
    is how pruning collects per-expert inputs and gates and how distillation collects expert
    outputs, without hooks or monkey-patching. Returns (output, router logits).
    """

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.top_k, self.renormalise = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)  # the router W_g
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))

    def forward(self, x, observer: Optional[Callable[[ExpertCall], None]] = None, router_logits=None):
        """router_logits: [N, n_experts] of an earlier forward on the same x with the same router, reused
        instead of running the router again (pruning's second pass, where only experts changed)."""
        B, T, H = x.shape
        x = x.reshape(B * T, H)  # [N, hidden]
        if router_logits is None:
            router_logits = self.gate(x)  # [N, n_experts]
        weights, experts = route(router_logits, self.top_k, self.renormalise)  # [N, k] each: Eq. 2
        return self.run_experts(x, weights, experts, observer).view(B, T, H), router_logits

    def run_experts(self, x, weights, experts, observer=None):
        """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]) for every token t, each expert run once
        on all of its tokens. x [N, hidden]; weights, experts [N, k]. Returns [N, hidden]."""
        token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(experts.shape[1])  # [N * k]
        return self.dispatch(x, token_of, experts.reshape(-1), weights.reshape(-1), observer)

    def dispatch(self, x, token_of, expert_of, gate_of, observer=None):
        """Each (token, expert, gate) assignment, [n] each: every expert runs once on its assignments'
        tokens, and each token sums its experts' outputs times their gates. Returns [N, hidden]."""
        # Sort the assignments by expert, so each expert's tokens are contiguous.
        order = torch.argsort(expert_of, stable=True)
        token_of, gate_of = token_of[order], gate_of[order]  # each sorted assignment's token and routing weight
        counts = torch.bincount(expert_of[order], minlength=len(self.experts)).tolist()  # per expert
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
            ys.append(y_e * g_e[:, None])  # times the float32 gate (transformers casts the gate to the
            # hidden dtype first: the same in float32, one rounding apart in bfloat16)
        out = torch.zeros_like(x)
        out.index_add_(0, token_of, torch.cat(ys).to(x.dtype))  # each token sums its experts
        return out


class DecoderLayer(nn.Module):
    """One Mixtral block: x + attn(norm(x)), then + moe(norm(x)). Buildable and runnable alone."""

    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(config)

    def attend(self, x, cos, sin, mask=None):
        """The attention half: x + attn(norm(x)). The MoE half's input is post_attention_layernorm of it."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, mask)

    def moe_half(self, a, observer=None, router_logits=None):
        """The MoE half: a + moe(norm(a)), a the attention half's output. With router_logits of an
        earlier forward on the same a, the router is not run again. Returns (x, router_logits)."""
        moe_out, router_logits = self.block_sparse_moe(self.post_attention_layernorm(a), observer, router_logits)
        return a + moe_out, router_logits

    def forward(self, x, cos, sin, mask=None, observer=None):
        """x: [B, T, hidden]; cos/sin: [T, head_dim]. Returns (x, router_logits [B*T, n_experts])."""
        return self.moe_half(self.attend(x, cos, sin, mask), observer)


class Mixtral(nn.Module):
    def __init__(self, config: MixtralConfig):
        super().__init__()
        self.config = config
        # Named as in the checkpoint so that state_dict() keys are the official keys.
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
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
