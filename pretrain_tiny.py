"""
Train the embedded tiny Mixtral the way Mixtral was made: dense first, then upcycled.

Everything runs without a download, and pruning random weights says nothing, so the
project trains its own small Mixtral on a corpus every machine has: the Python standard
library's source (data.py). Up to four stages, one script:

  1. a byte-level BPE tokenizer (vocab 4096) on the train split;
  2. a dense model of the same shape: a Mixtral with one expert and top-1 routing, whose router
     softmax over one logit is exactly 1, i.e. a plain SwiGLU transformer;
  3. sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055; MoE-Pruner Section 3.1 on
     Mixtral's likely origin): every expert starts as a copy of the dense FFN, the router starts
     fresh, and training continues with the load-balancing loss (Switch Transformers Eq. 4);
  4. optionally (--init-from), more MoE training from an upcycled checkpoint, e.g. with another
     form or weight of the balancing loss;
  5. optionally (--init-from an MoE with --granularity g), granular upcycling into a fine-grained
     MoE: each expert becomes g experts, each 1/g as wide, as Qwen1.5-MoE split its FFN, with g
     times the top-k, so the active parameters stay; with --layout olmoe the model is OLMoE's (gates
     not renormalised, q/k RMSNorm over the projections) and ships in OLMoE's checkpoint layout.

Load balancing: by default the Switch loss is applied per layer (--balance per-layer); the
pooled form of transformers' load_balancing_loss_func balances only the experts' total over
layers and let the first layers collapse onto two experts (docs/embedded-model.md).

Deterministic for a seed on a given machine and thread count; shows progress; resumable
(--resume) from the state it saves every --save-every steps. The default budget (~2.4M tokens)
is cached for every script whose --model is not given; report.json records the minutes a run took
and the machine it ran on. The shipped model in models/tiny-mixtral took two commands
(docs/embedded-model.md gives them with their report.json): 12M dense + 8M upcycled tokens with the pooled loss, then 6M more tokens
with the per-layer loss at weight 1.0, which revived the collapsed experts:

    python pretrain_tiny.py                       # to the cache folder
    python pretrain_tiny.py --out pooled --dense-tokens 12e6 --moe-tokens 8e6 --balance pooled \
        --aux-loss-coef 0.02 --threads 2
    python pretrain_tiny.py --init-from pooled --out models/tiny-mixtral --moe-tokens 6e6 \
        --moe-lr 3e-4 --aux-loss-coef 1.0 --threads 2
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import cli


# -----------------------------------------------------------------------------
# The configuration and the command line, first (cli.parse_first)


@dataclass
class TrainConfig:
    seed: int = 1337
    vocab_size: int = 4096  # byte-level BPE; ~3.4 bytes per token on Python source
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # GQA with 4 query heads per k/v head, Mixtral's ratio
    intermediate_size: int = 512  # 2x hidden (Mixtral: 3.5x): less redundant experts, so pruning shows
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    rope_theta: float = 10000.0  # the classic RoPE base; Mixtral's 1e6 is for its 32k context
    seqlen: int = 512  # training context = max_position_embeddings of the tiny model
    batch_size: int = 16  # windows per step: 8192 tokens
    dense_tokens: float = 1.6e6  # stage 2 budget (~6 min at ~4.5k tok/s on 2 cores)
    moe_tokens: float = 0.8e6  # stage 3 budget (~5 min at ~2.8k tok/s)
    lr: float = 1e-3  # AdamW peak, cosine to 10%; small models take a high rate
    moe_lr: float = 5e-4  # upcycled training restarts warm, at half the peak
    warmup_steps: int = 50
    weight_decay: float = 0.1
    aux_loss_coef: float = 0.02  # per-layer: Switch's 0.01 per layer (load_balancing_loss). Reviving collapsed experts took 1.0
    balance: str = "per-layer"  # Switch's per-layer loss; "pooled" = transformers' all-layers-pooled form
    grad_clip: float = 1.0
    eval_windows: int = 64  # held-out windows for the final report, spread over the eval split (data.sample_windows)
    # Levers for a decisive router, all off by default as for models/tiny-mixtral; models/tiny-mixtral-decisive
    # used 0.1, 10 and 0 with --aux-loss-coef 0.04 (docs/embedded-model.md has both commands):
    upcycle_noise: float = 0.0  # relative std of Gaussian noise added to each upcycled expert copy (breaks symmetry)
    router_lr_mult: float = 1.0  # the router's learning rate = moe_lr x this
    router_weight_decay: float = -1.0  # the router's weight decay; -1: the same as weight_decay
    # Granular upcycling (stage 5, --init-from an MoE); models/tiny-olmoe used 4 and "olmoe":
    granularity: int = 1  # split each expert into this many, each 1/g as wide, with g times the top-k
    layout: str = "mixtral"  # the output's family (checkpoint.FAMILIES): "olmoe" routes without renormalising


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--out", help="output checkpoint directory (default: the cache folder, ~/.cache/mini-moe-pruner/tiny-mixtral)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--resume", action="store_true", help="continue from --out's .train_state.pt if present")
    p.add_argument("--save-every", type=cli.nonnegative_int, default=100,
                   help="save resumable state every N steps (0: never)")
    types = {"seed": int, "dense_tokens": cli.nonnegative_float, "moe_tokens": cli.nonnegative_float,
             "batch_size": cli.positive_int, "seqlen": cli.seqlen, "lr": cli.positive_float, "moe_lr": cli.positive_float,
             "warmup_steps": cli.nonnegative_int, "aux_loss_coef": cli.nonnegative_float,
             "weight_decay": cli.nonnegative_float, "intermediate_size": cli.positive_int,
             "hidden_size": cli.positive_int, "num_hidden_layers": cli.positive_int,
             "num_local_experts": cli.positive_int}
    for f, type_ in types.items():
        default = getattr(TrainConfig, f)
        p.add_argument("--" + f.replace("_", "-"), type=type_, default=default, help=f"TrainConfig.{f} (default {default})")
    p.add_argument("--balance", choices=["per-layer", "pooled"], default=TrainConfig.balance,
                   help="load-balancing loss form: per-layer (Switch Transformers, default) or pooled over "
                        "all layers (transformers' load_balancing_loss_func; balances only the layers' total)")
    p.add_argument("--init-from", default=None,
                   help="start from this checkpoint (its tokenizer and shape) instead of training tokenizer + dense "
                        "model: a dense one (one expert, as --moe-tokens 0 writes) is upcycled and trained for "
                        "--moe-tokens (stage 3); an MoE one is trained for --moe-tokens more (stage 4)")
    p.add_argument("--upcycle-noise", type=float, default=TrainConfig.upcycle_noise,
                   help="relative std of the noise added to each upcycled expert copy (default 0: exact copies)")
    p.add_argument("--router-lr-mult", type=float, default=TrainConfig.router_lr_mult,
                   help="the router's learning rate as a multiple of the stage's (default 1)")
    p.add_argument("--router-weight-decay", type=float, default=TrainConfig.router_weight_decay,
                   help="the router's weight decay (default: --weight-decay's 0.1; decay pulls router logits "
                        "towards uniform routing)")
    p.add_argument("--tokenizer", default=None,
                   help="reuse this checkpoint directory's tokenizer.json instead of training one (stage 1), so a "
                        "new model shares the shipped model's tokenizer")
    p.add_argument("--granularity", type=cli.positive_int, default=TrainConfig.granularity,
                   help="with --init-from an MoE: split each expert into this many experts, each 1/g as wide, and "
                        "route each token to g times as many (granular upcycling; default 1: no split)")
    p.add_argument("--layout", choices=["mixtral", "olmoe"], default=TrainConfig.layout,
                   help="the output's architecture and checkpoint layout with --granularity: olmoe's gates are not "
                        "renormalised and its queries and keys are RMS-normalised (default mixtral)")
    p.add_argument("--threads", type=cli.positive_int, default=None, help="torch threads (default: torch's choice)")
    return p


cli.parse_first(__name__, build_parser)

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

import checkpoint
import data
import mini_mixtral as mm
from checkpoint import load_model, read_config, save_model
from outputs import check_output
from eval_ppl import expert_load_cv, perplexity, router_stats, topk_mass
from progress import log


def cosine_lr(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def model_config(tc: TrainConfig, experts: int, top_k: int) -> mm.MixtralConfig:
    return mm.MixtralConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads, num_local_experts=experts, num_experts_per_tok=top_k,
        rope_theta=tc.rope_theta, max_position_embeddings=tc.seqlen, torch_dtype="float16",
        extra={"bos_token_id": None, "eos_token_id": 0, "router_aux_loss_coef": tc.aux_loss_coef})


def upcycle(dense: mm.Mixtral, config: mm.MixtralConfig, seed: int, noise: float = 0.0) -> mm.Mixtral:
    """Sparse upcycling: copy every dense weight; each of the n experts = the dense FFN; fresh router.
    noise > 0 adds N(0, (noise * std of the matrix)^2) to every expert matrix, seeded per matrix, so
    the copies differ from the start and the router has a reason to choose between them."""
    moe = mm.init_weights(mm.Mixtral(config), seed=seed)
    sd = dense.state_dict()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts." in name:
                src = name.split(".experts.")[0] + ".experts.0." + name.split(".experts.")[1].split(".", 1)[1]
                p.copy_(sd[src])
                if noise:
                    p.add_(torch.randn(p.shape, generator=g) * (noise * sd[src].std()))
            elif not name.endswith("block_sparse_moe.gate.weight"):
                p.copy_(sd[name])
    return moe


@torch.no_grad()
def granular_upcycle(moe: mm.Mixtral, g: int, layout: str, windows: torch.Tensor) -> mm.Mixtral:
    """Split each expert of moe into g experts, each a 1/g slice of its hidden units, routed to g
    times as many per token; in OLMoE's form with layout "olmoe". Starts as close to moe's function
    as the new form allows, on the calibration windows [n, seqlen]:
      - router rows repeat, so a token's top-(g k) are the g slices of its top-k experts, each with
        gate p_e / g (the softmax over g copies of every logit);
      - the slices' w2 are scaled by g, so that with renormalised gates (p_e / g over the top-(g k)'s
        sum, 1 / g of the renormalised p_e) the block's output is moe's exactly; without, by g / m, m
        the layer's mean top-k mass on the windows, so that p_e / g times them is p_e / m, the
        renormalised gate on average;
      - new q/k RMSNorms are scaled by the mean RMS of each projection's output on the windows.
    """
    c = moe.config
    family = checkpoint.FAMILIES[layout]
    d = {**c.to_dict(), "model_type": layout, "architectures": [family["architecture"]], **family["defaults"],
         **family["switches"], "intermediate_size": c.intermediate_size // g, "num_local_experts": c.num_local_experts * g,
         "num_experts_per_tok": c.num_experts_per_tok * g}
    new = mm.Mixtral(mm.MixtralConfig.from_dict(d))
    dense_part = {k: v for k, v in moe.state_dict().items() if ".block_sparse_moe." not in k}
    new.load_state_dict(dense_part, strict=False)  # embeddings, attention, norms, lm_head: the rest is below
    rms, masses = {}, {}

    def keep_rms(name):
        return lambda mod, inp, out: rms.setdefault(name, []).append(out.float().pow(2).mean(-1).sqrt().mean())

    hooks = [getattr(layer.self_attn, p).register_forward_hook(keep_rms((l, p)))
             for l, layer in enumerate(moe.model.layers) for p in ("q_proj", "k_proj")]
    for w in windows.split(8):
        _, router_logits = moe(w, return_router_logits=True)
        for l, rl in enumerate(router_logits):  # [N, n_experts] -> each token's top-k probability mass
            masses.setdefault(l, []).append(topk_mass(rl, c.num_experts_per_tok).mean())
    for h in hooks:
        h.remove()
    w = c.intermediate_size // g
    for l, (old, layer) in enumerate(zip(moe.model.layers, new.model.layers)):
        scale = g if new.config.norm_topk_prob else g / torch.stack(masses[l]).mean().item()
        layer.block_sparse_moe.gate.weight.copy_(old.block_sparse_moe.gate.weight.repeat_interleave(g, dim=0))
        for e, expert in enumerate(old.block_sparse_moe.experts):
            for s in range(g):
                part = layer.block_sparse_moe.experts[e * g + s]
                part.w1.weight.copy_(expert.w1.weight[s * w:(s + 1) * w])  # [w, hidden]
                part.w3.weight.copy_(expert.w3.weight[s * w:(s + 1) * w])  # [w, hidden]
                part.w2.weight.copy_(expert.w2.weight[:, s * w:(s + 1) * w] * scale)  # [hidden, w]
        if new.config.qk_norm is not None:
            layer.self_attn.q_norm.weight.fill_(torch.stack(rms[l, "q_proj"]).mean().item())
            layer.self_attn.k_norm.weight.fill_(torch.stack(rms[l, "k_proj"]).mean().item())
    return new


def load_balancing_loss(router_logits: list, top_k: int, per_layer: bool = False) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss: n_experts * sum_e f_e * P_e.

    f_e = fraction of (token, slot) assignments that go to expert e, P_e = mean router
    probability of e. Minimal (= top_k) when both are uniform. per_layer=False pools every
    layer's tokens first, exactly as transformers' load_balancing_loss_func does: that balances
    only the experts' total over layers, so one layer can send most tokens to experts that
    another layer avoids. per_layer=True is Switch Transformers' form (Fedus et al. 2021, Eq. 4,
    applied in every MoE layer), averaged over layers. Scale: f sums to top_k here, as in
    transformers, and to 1 in Switch and Megatron, which add every layer's loss at the full
    coefficient; so a coefficient c here is their c * top_k / layers per layer (0.02 with top-2
    and 4 layers = Switch's 0.01).
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


def batch_load_cv(router_logits: torch.Tensor) -> float:
    """Eq. 4-5's load CV of one layer on the current batch (top-1 counts), to watch balance live."""
    n_experts = router_logits.shape[-1]
    return expert_load_cv(torch.bincount(router_logits.detach().argmax(-1), minlength=n_experts))


def train_stage(model, tokens, n_tokens, tc: TrainConfig, lr, stage, state, save_fn, save_every, log):
    """AdamW on random windows of the train tokens; returns when n_tokens have been seen."""
    steps = max(1, int(n_tokens // (tc.batch_size * tc.seqlen)))
    is_router = lambda n: n.endswith("block_sparse_moe.gate.weight")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not is_router(n)]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    router = [p for n, p in model.named_parameters() if is_router(n)]
    router_wd = tc.weight_decay if tc.router_weight_decay < 0 else tc.router_weight_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay, "lr_mult": 1.0},
                             {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
                             {"params": router, "weight_decay": router_wd, "lr_mult": tc.router_lr_mult}],
                            lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng([tc.seed, stage])
    start = 0
    if state is not None and state["stage"] == stage:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        start = state["step"]
        log(f"stage {stage}: resumed at step {start}/{steps}")
    k = model.config.num_experts_per_tok
    per_layer = tc.balance == "per-layer"
    is_moe = model.config.num_local_experts > 1  # the dense stage has no router to balance
    t0, seen = time.time(), 0
    for step in range(start, steps):
        starts = rng.integers(0, len(tokens) - tc.seqlen, size=tc.batch_size)
        x = torch.from_numpy(np.stack([tokens[s:s + tc.seqlen] for s in starts]).astype(np.int64))  # [B, T]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, tc.warmup_steps) * g["lr_mult"]
        logits, router_logits = model(x, return_router_logits=True)
        ce = mm.next_token_nll(logits, x)
        aux = load_balancing_loss(router_logits, k, per_layer) if is_moe else torch.zeros((), device=x.device)
        loss = ce + tc.aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        seen += x.numel()
        if step % 20 == 0 or step == steps - 1:
            rate = seen / (time.time() - t0)
            eta = (steps - step - 1) * x.numel() / rate
            cv = [round(batch_load_cv(r), 2) for r in router_logits] if is_moe else []
            mass = [round(topk_mass(r.detach(), k).mean().item(), 2) for r in router_logits] if is_moe else []
            log(f"stage {stage} step {step + 1}/{steps}: ce {ce.item():.3f} aux {aux.item():.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {rate:.0f} tok/s, eta {eta / 60:.1f} min"
                + (f", batch load CV {cv}, top-{k} mass {mass}" if cv else ""))
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            save_fn({"stage": stage, "step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                     "rng": rng.bit_generator.state})
    return model


def train_dense_and_upcycle(tc: TrainConfig, train_ids, eval_ids, state, save_state, save_every, log):
    """Stages 2-3: train a dense model, upcycle it into an MoE, train the MoE; returns (moe, dense ppl)."""
    dense_cfg = model_config(tc, 1, 1)
    dense = mm.init_weights(mm.Mixtral(dense_cfg), seed=tc.seed)
    if state is None or state["stage"] == 2:
        dense = train_stage(dense, train_ids, tc.dense_tokens, tc, tc.lr, 2, state, save_state, save_every, log)
        dense_ppl = perplexity(dense.eval(), data.sample_windows(data.eval_windows(eval_ids, tc.seqlen), tc.eval_windows)[0])
        log(f"dense model: held-out ppl {dense_ppl:.2f}")
        state = None
    else:
        dense_ppl = state.get("dense_ppl")
    if tc.moe_tokens == 0:  # dense stage only: the dense model is the output (an --init-from for stage 3)
        return dense, dense_ppl
    moe_cfg = model_config(tc, tc.num_local_experts, tc.num_experts_per_tok)
    moe = upcycle(dense, moe_cfg, tc.seed + 1, tc.upcycle_noise).train()
    save_fn = lambda s: save_state({**s, "dense_ppl": dense_ppl})  # keep the dense ppl across a resume
    moe = train_stage(moe, train_ids, tc.moe_tokens, tc, tc.moe_lr, 3, state, save_fn, save_every, log)
    return moe, dense_ppl


def start_from(init: mm.Mixtral, tc: TrainConfig, calib_windows: torch.Tensor):
    """--init-from: (model to train, stage). A dense checkpoint is upcycled and trained as stage 3
    would be after the dense stage; an MoE one is trained further as stage 4 (fresh AdamW state and
    other random windows than stage 3), or with --granularity split first and trained as stage 5."""
    if init.config.num_local_experts == 1:
        moe = upcycle(init, model_config(tc, tc.num_local_experts, tc.num_experts_per_tok), tc.seed + 1,
                      tc.upcycle_noise)
        return moe.train(), 3
    if tc.granularity > 1 or tc.layout != init.config.model_type:
        if init.config.intermediate_size % tc.granularity:
            raise data.DataError(f"--granularity {tc.granularity} does not divide the experts' width "
                                 f"{init.config.intermediate_size}")
        moe = granular_upcycle(init, tc.granularity, tc.layout, calib_windows)
        moe.config.extra["router_aux_loss_coef"] = tc.aux_loss_coef  # this stage's, not the source's
        tc.intermediate_size, tc.num_local_experts = moe.config.intermediate_size, moe.config.num_local_experts
        tc.num_experts_per_tok = moe.config.num_experts_per_tok
        return moe.train(), 5
    return init.train(), 4


def unigram_ppl(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity of a unigram model (add-one smoothed counts of the train tokens): the floor any
    language model must beat."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[eval_ids[1:]].mean()))


def train(tc: TrainConfig, out: str, overwrite: bool = False, resume: bool = False, save_every: int = 100,
          init_from: str = None, tokenizer: str = None):
    """The whole run: tokenizer, dense stage and upcycled MoE stage (or the stage --init-from
    asks for), then the report and the checkpoint at out."""
    out = os.path.abspath(out)
    check_output(out, overwrite, [init_from, tokenizer])
    state_path = out + ".train_state.pt"
    state = torch.load(state_path, weights_only=False) if resume and os.path.isfile(state_path) else None

    def save_state(s):
        torch.save({**s, "tokenizer": tok.to_str()}, state_path + ".tmp")
        os.replace(state_path + ".tmp", state_path)

    torch.manual_seed(tc.seed)
    t_start = time.time()
    previous = None
    if init_from:  # upcycle a dense checkpoint or continue an MoE one: shape and tokenizer come from it
        c = read_config(init_from)
        init = load_model(init_from)
        tok = data.load_tokenizer(init_from)
        fn = os.path.join(init_from, "report.json")
        previous = json.load(open(fn)) if os.path.isfile(fn) else None
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            setattr(tc, f, getattr(c, f))
        if c.num_local_experts > 1:
            tc.num_local_experts = c.num_local_experts
        tc.dense_tokens = 0  # no dense stage in this run; the previous one is in report.json's "previous"
    log(f"corpus: {data.corpus_id()}")
    if state is not None:  # a resumed run keeps the tokenizer it started with
        tok = Tokenizer.from_str(state["tokenizer"])
    elif tokenizer and not init_from:
        tok = data.load_tokenizer(tokenizer)
        if tok.get_vocab_size() != tc.vocab_size:
            raise data.DataError(f"{tokenizer}'s tokenizer has {tok.get_vocab_size()} tokens, not --vocab-size "
                                 f"{tc.vocab_size}")
        log(f"stage 1 skipped: tokenizer of {tokenizer}")
    elif not init_from:
        log(f"stage 1: byte-level BPE tokenizer, vocab {tc.vocab_size}")
        tok = data.train_tokenizer(data.stdlib_texts("train"), tc.vocab_size)
    train_ids = data.encode(tok, data.stdlib_text("train"))
    eval_ids = data.encode(tok, data.stdlib_text("eval"))
    calib_ids = data.encode(tok, data.stdlib_text("calib"))
    log(f"tokens: train {len(train_ids):,}, calib {len(calib_ids):,}, eval {len(eval_ids):,}")

    if init_from:
        dense_ppl = (previous or {}).get("dense_ppl")
        moe, stage = start_from(init, tc, data.calibration_windows(calib_ids, 16, tc.seqlen, tc.seed))
        save_fn = lambda s: save_state({**s, "dense_ppl": dense_ppl})
        moe = train_stage(moe, train_ids, tc.moe_tokens, tc, tc.moe_lr, stage, state, save_fn, save_every, log)
    else:
        moe, dense_ppl = train_dense_and_upcycle(tc, train_ids, eval_ids, state, save_state, save_every, log)
    moe = moe.to(torch.float16).to(torch.float32).eval()  # report on exactly the weights that are shipped

    ew, ew_indices = data.sample_windows(data.eval_windows(eval_ids, tc.seqlen), tc.eval_windows)
    cw = data.calibration_windows(calib_ids, 64, tc.seqlen, tc.seed)
    ppl = perplexity(moe, ew)
    stats = router_stats(moe, cw)
    report = {"train_config": asdict(tc), "corpus": data.corpus_id(), "torch": torch.__version__,
              "tokens": {"train": len(train_ids), "calib": len(calib_ids), "eval": len(eval_ids)},
              "eval_windows": len(ew), "eval_window_indices": ew_indices, "dense_ppl": dense_ppl, "ppl": ppl,
              "unigram_ppl": unigram_ppl(train_ids, eval_ids, tc.vocab_size), "router_calib": stats,
              "minutes": (time.time() - t_start) / 60,
              "init_from": data.shown_path(init_from), "previous": previous}
    log(f"{'MoE' if moe.config.num_local_experts > 1 else 'dense model'}: held-out ppl {ppl:.2f} (dense {dense_ppl:.2f}, unigram {report['unigram_ppl']:.1f}); "
        f"load CV per layer {[round(s['load_cv'], 3) for s in stats]}")
    save_model(moe, out, dtype=torch.float16, overwrite=overwrite, inputs=[init_from, tokenizer],
               extra_files={"tokenizer.json": tok.to_str(pretty=True), "report.json": report})
    if os.path.isfile(state_path):
        os.remove(state_path)
    log(f"saved {out} ({report['minutes']:.1f} min)")


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    tc = TrainConfig(**{f: getattr(args, f) for f in TrainConfig.__dataclass_fields__ if hasattr(args, f)})
    if args.threads:
        torch.set_num_threads(args.threads)
    with cli.errors():
        train(tc, args.out or data.CACHE_MODEL, args.overwrite, args.resume, args.save_every, args.init_from, args.tokenizer)


if __name__ == "__main__":
    main()
