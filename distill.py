"""
Expert-wise knowledge distillation from the dense teacher into the pruned student (MoE-Pruner
Section 3.3, Eq. 10), keeping the sparsity mask exactly.

    L = L_CE + lambda * sum_layers sum_experts MSE(E_teacher(x_t), E_student(x_s))

L_CE: next-token cross-entropy of the student. For each layer and expert e, the MSE runs over
the tokens the *teacher* routes to e (the paper does not say which tokens; this is the natural
reading): the teacher expert's output on the teacher's hidden states of those tokens against the
student expert's output on the student's hidden states of the same tokens, both before gating.
lambda is set to L_CE / L_expert on the first batch, as the paper says, and then kept
(--rebalance-every N re-balances it every N optimizer steps).

Full-parameter fine-tuning that keeps the mask: every weight that is zero in a pruned matrix of
the student (those prune_report.json lists, else the expert matrices) gets its gradient zeroed
before each step and is set to exactly zero again after it, so the zero pattern after training
is bitwise the one before. --loss ce (the cross-entropy alone: no teacher is run) and --loss mse
(the expert term alone) are the ablations that show what each term of Eq. 10 is worth.

Two modes:
  - full (default): the whole student and teacher, the loss above. Under torchrun both are
    sharded with FSDP2 and each rank takes its share of every global batch (distributed.py);
  - per-expert (--mode per-expert): memory-light, for models far larger than memory. Layer by
    layer, as prune.py works, the teacher's activations are run forward and each student expert
    is trained to match its teacher expert's output on the cached inputs of the tokens the teacher
    routes to it (MSE alone; only one layer of each model is ever loaded). Attention, router and
    norms are copied from the student unchanged. Under torchrun, expert parallel.

Paper settings as defaults where they fit: 1000 samples, 3 epochs, AdamW at lr 2e-5 with a cosine
schedule. Sequence length is not given by the paper; the default is 128 tokens, a quarter of the
embedded model's context.

    python distill.py --teacher models/tiny-mixtral --student out/moe-pruner-50 --out out/moe-pruner-50-kd
    torchrun --nproc_per_node 8 distill.py --teacher DENSE --student PRUNED --out KD --device cuda
"""

import argparse
import contextlib
import json
import math
import os
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, replace

import cli


# -----------------------------------------------------------------------------
# The configuration and the command line, first (cli.parse_first)


@dataclass
class DistillConfig:
    nsamples: int = 1000  # training windows (paper: 1000 C4 samples)
    seqlen: int = 128  # not stated by the paper; small, so the embedded model distils in minutes on CPU
    epochs: int = 3  # paper
    lr: float = 2e-5  # paper, AdamW peak, cosine to 0
    warmup_steps: int = 10
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # no decay: fine-tuning a pretrained model
    rebalance_every: int = 0  # 0: lambda fixed after the first batch (paper); N: re-balance every N steps
    seed: int = 0
    loss: str = "eq10"  # eq10: L_CE + lambda L_expert (the paper); ce: L_CE alone; mse: L_expert alone (ablations;
    # per-expert mode computes mse alone, and its report says so)
    dtype: str = "float32"  # compute dtype on CPU (bfloat16: autocast, fast only with AMX / AVX-512 BF16); CUDA: bf16


FORMER = {"nsamples": ("--samples",)}  # DistillConfig field -> its other spellings (earlier versions' names)
# DistillConfig field -> the argparse type that refuses bad values before any work
FIELD_TYPES = {"nsamples": cli.positive_int, "seqlen": cli.seqlen, "epochs": cli.positive_int, "lr": cli.positive_float,
               "warmup_steps": cli.nonnegative_int, "batch_size": cli.positive_int, "grad_accum": cli.positive_int,
               "weight_decay": cli.nonnegative_float, "rebalance_every": cli.nonnegative_int, "seed": cli.nonnegative_int,
               "loss": str, "dtype": str}


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__)
    p.add_argument("--teacher", help="the dense checkpoint (default: the embedded tiny Mixtral)")
    p.add_argument("--student", help="the pruned checkpoint (same config)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mode", default="full", choices=("full", "per-expert"),
                   help="full: Eq. 10 (or --loss) on the whole model; per-expert: one expert at a time on cached "
                        "inputs, Eq. 10's expert term alone (MSE; --loss eq10 or ce is refused there)")
    cli.add_calib_data_arg(p, "train", former=("--data",))
    for f, default in asdict(DistillConfig()).items():
        former = FORMER.get(f, ())
        p.add_argument("--" + f.replace("_", "-"), *former, type=FIELD_TYPES[f], default=default,
                       choices={"loss": ("eq10", "ce", "mse"), "dtype": cli.COMPUTE_DTYPES}.get(f),
                       help=f"DistillConfig.{f} (default {default}; see the module docstring)" + cli.spelled(former))
    cli.add_device_arg(p)
    cli.add_recipe_arg(p, "distill_report.json", "same arguments and seed, so the same windows and steps")
    return p


cli.parse_first(__name__, build_parser)

import torch
import torch.nn.functional as F

import data
import distributed
import mini_mixtral as mm
from checkpoint import (CheckpointReader, CheckpointWriter, expected_shapes, load_layer, load_model, read_config,
                        refuse_variant)
from layerwise import compute_dtype, embed_windows, layers, run_layer
from outputs import check_output
from progress import log


# -----------------------------------------------------------------------------
# The loss (Eq. 10) and the mask


def expert_term(expert: mm.Expert, x_s: torch.Tensor, call: mm.ExpertCall, count) -> torch.Tensor:
    """One (layer, expert) term of Eq. 10: the student expert on the student's hidden states x_s
    [N, hidden] of the tokens the teacher routed to it, against the teacher expert's outputs:
    sum of squared errors / (count x hidden), i.e. MSE(E_teacher, E_student) when count is the
    number of those tokens (under torchrun, the number over all ranks)."""
    y_s = expert(x_s[call.tokens])  # [n, hidden]
    return (y_s.float() - call.y.float()).pow(2).sum() / (count * y_s.shape[-1])


def kd_lambda(ce: torch.Tensor, l_expert: torch.Tensor) -> float:
    """Eq. 10's lambda, set to L_CE / L_expert (the paper) so that both terms start equal."""
    if not (torch.isfinite(ce) and torch.isfinite(l_expert)) or l_expert.item() == 0:
        raise data.DataError(f"lambda = L_CE / L_expert is undefined on the first batch (L_CE {ce.item():.4g}, "
                             f"L_expert {l_expert.item():.4g}): the student's experts compute the teacher's "
                             f"exactly; is the student pruned?")
    return (ce / l_expert).item()


def pruned_matrices(student_dir: str, config: mm.MixtralConfig) -> list:
    """The names of the matrices that pruning changed: those prune_report.json lists with sparsity
    > 0 when the student has one, else every expert matrix. Only these keep a mask; an exact zero
    elsewhere (the embedding has a few) is an ordinary weight."""
    matrices = {n for n, shape in expected_shapes(config).items() if len(shape) == 2}
    report = os.path.join(student_dir, "prune_report.json")
    if not os.path.isfile(report):
        return sorted(n for n in matrices if ".experts." in n)
    try:
        with open(report) as f:
            sparsity = json.load(f)["per_matrix_sparsity"]
        names = [n for n, s in sparsity.items() if s > 0]
        if not set(names) <= matrices:
            raise ValueError("it names a matrix the student does not have")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise data.DataError(f"{report}: not a prune report of this student ({e}); remove it to keep every expert "
                             f"matrix's zeros") from None
    return names


def zero_masks(model: torch.nn.Module, names=None) -> dict:
    """{parameter name: bool mask of its exact zeros} for the named matrices (default: every
    matrix of the module) that have any: the pruned weights, which must stay zero. Under FSDP2
    each rank holds the mask of its shard, and the zero counts are summed over ranks (a collective
    every rank joins); a module that is not sharded (per-expert mode's expert, on the one rank that
    trains it) is counted where it is, with no collective."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() == 2] if names is None else names
    masks = {n: distributed.local(params[n]) == 0 for n in names}
    zeros = torch.tensor([float(m.sum()) for m in masks.values()], dtype=torch.float64, device="cpu")
    if any(distributed.sharded(params[n]) for n in names):
        zeros = distributed.all_sum(zeros)  # through gloo under torchrun
    return {n: m for (n, m), z in zip(masks.items(), zeros.tolist()) if z > 0}


def apply_masks(model, masks, grads=False):
    """Zero the pruned weights (or their gradients). Under FSDP2 each rank zeroes its shard with
    its shard of the mask."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            t = params[n].grad if grads else params[n]
            if t is not None:
                distributed.local(t).masked_fill_(m, 0)


def cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# -----------------------------------------------------------------------------
# Full mode


Routed = namedtuple("Routed", "expert tokens y")  # what Eq. 10 needs of a teacher's expert call: its routed
# tokens and outputs (not its gathered inputs x nor its [tokens, intermediate] hidden h, freed at once)


class TeacherCalls:
    """Observers recording, per layer, the teacher's expert calls (routed tokens and outputs)."""

    def __init__(self, n_layers: int):
        self.calls = {}
        self.observers = {l: (lambda c, l=l: self.calls.setdefault(l, []).append(Routed(c.expert, c.tokens, c.y)))
                          for l in range(n_layers)}

    def counts(self, n_layers: int, n_experts: int, device, idle: bool = False) -> torch.Tensor:
        """[layers, experts] routed tokens of this batch, summed over ranks: the MSE's denominators.
        An idle rank (no window of this micro-batch; see distill_full) counts none of its stand-in's."""
        n = torch.zeros(n_layers, n_experts, dtype=torch.float32, device=device)  # exact counts below 2^24
        for l, calls in self.calls.items():
            for c in calls:
                n[l, c.expert] += 0 if idle else len(c.tokens)
        return distributed.all_sum(n)


class ExpertLoss:
    """The expert term of Eq. 10, computed inside the student's forward: a pre-hook on every MoE
    block applies the student's experts to its own hidden states of the tokens the teacher routed
    to them, while the layer's weights are at hand (FSDP2 gathers them for its forward only).
    Each (layer, expert) adds sum of squared errors / (routed tokens over all ranks x hidden), so
    the sum over ranks is the mean over the global batch, exactly as in one process."""

    def __init__(self, student: mm.Mixtral, teacher: TeacherCalls):
        self.teacher, self.terms, self.counts = teacher, [], None
        self.hooks = [layer.block_sparse_moe.register_forward_pre_hook(self.hook(l))
                      for l, layer in enumerate(student.model.layers)]

    def hook(self, l):
        def add(block, inputs):
            x_s = inputs[0].reshape(-1, inputs[0].shape[-1])  # [N, hidden] the student's MoE input
            for c in self.teacher.calls[l]:  # the teacher routed every token of the batch at every layer
                count = self.counts[l, c.expert].clamp(min=1)  # >= 1 but on an idle rank, whose terms weigh 0
                self.terms.append(expert_term(block.experts[c.expert], x_s, c, count))
        return add

    def remove(self):
        for h in self.hooks:
            h.remove()


class SameExperts:
    """Under torchrun, FSDP2 reduce-scatters the gradient of every parameter that has one, and every
    rank must reduce the same parameters. An expert gets a gradient on a rank only where its loss
    reaches it there: through the student's routing (the cross-entropy) or the teacher's (the
    expert term). A forward hook on every MoE block sums the layer's [experts] usage over ranks
    (one small all-reduce, every rank in the same order), and each expert used on some rank but
    not on this one adds a term 0 x its weights: a gradient of zeros, the one it contributes to the
    average in any case."""

    def __init__(self, student: mm.Mixtral, teacher: TeacherCalls, loss: str):
        self.teacher, self.loss, self.terms = teacher, loss, []
        self.hooks = [layer.block_sparse_moe.register_forward_hook(self.hook(l))
                      for l, layer in enumerate(student.model.layers)]

    def hook(self, l):
        def join(block, inputs, output):
            used = torch.zeros(len(block.experts), dtype=torch.float32, device=output[0].device)  # [experts]
            if self.loss != "mse":  # the cross-entropy reaches the experts the student routes to
                used[mm.route(output[1], block.top_k)[1].flatten()] = 1
            if self.loss != "ce":  # the expert term reaches those the teacher routes to
                used[[c.expert for c in self.teacher.calls[l]]] = 1
            anywhere = distributed.all_sum(used.clone())
            for e in ((anywhere > 0) & (used == 0)).nonzero().flatten().tolist():
                self.terms.append(sum(p.sum() for p in block.experts[e].parameters()) * 0)
        return join

    def remove(self):
        for h in self.hooks:
            h.remove()


def distill_full(teacher, student, masks: dict, windows, cfg: DistillConfig, device, log):
    """Eq. 10 on the whole model, the mask kept. Under torchrun the models are FSDP2-sharded and
    each rank takes its share of every micro-batch: the logged losses, lambda and the update are
    those of the global micro-batch. FSDP2 averages the gradients over the W ranks, so each rank's
    cross-entropy, a mean over its own windows, is weighted by W x its share of the windows, and
    the expert term, already a share of the global mean, by W. A micro-batch with fewer windows than
    ranks (an epoch's last) leaves some ranks idle: each runs its forward and backward on a stand-in
    window with weight 0, so that every rank joins every collective, and adds nothing."""
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(windows) / (cfg.batch_size * cfg.grad_accum))
    total = steps_per_epoch * cfg.epochs
    L, E = student.config.num_hidden_layers, student.config.num_local_experts
    expert = cfg.loss != "ce"  # --loss ce: no teacher forward, no expert term (the ablation costs what it computes)
    t_calls = TeacherCalls(L)
    s_loss = ExpertLoss(student, t_calls) if expert else None
    joins = SameExperts(student, t_calls, cfg.loss) if distributed.active() else None
    if device.type == "cuda":  # bf16: autocast in one process; under torchrun FSDP2's mixed-precision policy
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=not distributed.active())
    else:
        autocast = compute_dtype(device.type, cfg.dtype)
    W = distributed.world()
    g = torch.Generator().manual_seed(cfg.seed)
    lam, history, epochs, step, t0 = None, [], [], 0, time.time()
    student.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(windows), generator=g, device="cpu")  # the windows live on the CPU
        for n, i in enumerate(range(0, len(windows), cfg.batch_size), 1):  # n: the micro-batch's place in the epoch, from 1
            batch = windows[order[i:i + cfg.batch_size]]  # [b, T] the micro-batch
            mine = distributed.share(batch)  # [b_r, T] this rank's windows: none on an idle rank
            share = len(mine) / len(batch)  # this rank's fraction of the global mean (1.0 in one process)
            x = (mine if len(mine) else batch[:1]).to(device)  # an idle rank's stand-in window weighs 0
            t_calls.calls = {}
            if expert:
                with torch.no_grad(), autocast:
                    teacher(x, observers=t_calls.observers)
                s_loss.terms, s_loss.counts = [], t_calls.counts(L, E, device, idle=not len(mine))
            if joins:
                joins.terms = []
            with autocast:
                logits = student(x)
                ce = mm.next_token_nll(logits, x)
                l_exp = torch.stack(s_loss.terms).sum() if expert else torch.zeros((), device=device)  # one term per
                # (layer, expert) the teacher routed to
                if not len(mine):
                    l_exp = l_exp * 0  # an idle rank's stand-in adds nothing
            ce_all = distributed.all_sum(ce.detach() * share)  # the global micro-batch's mean, weighted by windows
            exp_all = distributed.all_sum(l_exp.detach().clone()) if expert else None
            starts_step = (n - 1) % cfg.grad_accum == 0
            if lam is None or (cfg.rebalance_every and starts_step and step % cfg.rebalance_every == 0):
                lam = kd_lambda(ce_all, exp_all) if cfg.loss == "eq10" else 0.0  # on the first batch
            ce = ce * (W * share)  # exactly ce where every rank has an equal share
            loss = {"eq10": ce + lam * W * l_exp, "ce": ce, "mse": W * l_exp}[cfg.loss] / cfg.grad_accum
            if joins and joins.terms:
                loss = loss + sum(joins.terms)  # zeros: the same experts get a gradient on every rank
            mse_text = f"{exp_all.item():.5f}" if expert else "not computed (--loss ce)"
            if not torch.isfinite(loss):
                raise data.DataError(f"non-finite loss at step {step} (CE {ce_all.item():.4g}, expert MSE "
                                     f"{mse_text}, lambda {lam:.4g}); nothing was written")
            loss.backward()
            if n % cfg.grad_accum == 0 or i + cfg.batch_size >= len(windows):
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * cosine(step, total, cfg.warmup_steps)
                apply_masks(student, masks, grads=True)  # pruned weights receive no update ...
                opt.step()
                opt.zero_grad(set_to_none=True)
                apply_masks(student, masks)  # ... and are exactly zero after it
                step += 1
                history.append({"step": step, "ce": ce_all.item(), "expert_mse": exp_all.item() if expert else None})
                if step % 10 == 0 or step == total:
                    log(f"epoch {epoch + 1} step {step}/{total}: CE {ce_all.item():.4f}, expert MSE "
                        f"{mse_text}, lambda {lam:.3g}, {time.time() - t0:.0f}s")
        done = history[-steps_per_epoch:]  # this epoch's optimizer steps
        epochs.append({"epoch": epoch + 1, "ce": sum(h["ce"] for h in done) / steps_per_epoch,
                       "expert_mse": sum(h["expert_mse"] for h in done) / steps_per_epoch if expert else None})
        log(f"epoch {epoch + 1}: mean CE {epochs[-1]['ce']:.4f}, mean expert MSE "
            + (f"{epochs[-1]['expert_mse']:.5f}" if expert else "not computed (--loss ce)"))
    if s_loss:
        s_loss.remove()
    if joins:
        joins.remove()
    return student.eval(), {"lambda": lam, "epochs": epochs, "steps": history, "optimizer_steps": step}


# -----------------------------------------------------------------------------
# Per-expert mode: one layer of each model at a time


def distill_per_expert(teacher_dir, student_dir, windows, cfg: DistillConfig, writer, device, log):
    """Layer by layer: teacher activations forward, each student expert regressed on its teacher
    expert's outputs for the tokens the teacher routes to it; the layer is then written. Holds one
    decoder layer of each model (the teacher's only while it runs) and the cached expert data.
    Under torchrun every rank runs the teacher on all windows and distils every W-th expert."""
    t_reader, s_reader = CheckpointReader(teacher_dir), CheckpointReader(student_dir)
    config = t_reader.config
    x, pos = embed_windows(t_reader, windows, device)  # x: [n, T, hidden] teacher activations
    history = []
    for l, s_layer in layers(s_reader, writer, device):
        t_layer = load_layer(t_reader, l, torch.float32, device)
        inputs = {e: [] for e in range(config.num_local_experts)}
        targets = {e: [] for e in range(config.num_local_experts)}

        def observer(c: mm.ExpertCall):
            inputs[c.expert].append(c.x)
            targets[c.expert].append(c.y)

        x = run_layer(t_layer, x, pos, cfg.batch_size, observer, cfg.dtype)  # teacher activations feed l+1
        del t_layer
        layer_hist = []
        for e, expert in enumerate(s_layer.block_sparse_moe.experts):
            if not inputs[e] or e % distributed.world() != distributed.rank():  # expert parallel: every W-th
                continue
            xe, ye = torch.cat(inputs[e]), torch.cat(targets[e])  # [n_e, hidden] cached routed inputs and outputs
            with compute_dtype(torch.device(device).type, cfg.dtype):
                before, after = train_expert(expert, xe, ye, cfg)
            layer_hist.append({"expert": e, "tokens": len(xe), "mse_before": before, "mse_after": after})
        gather_experts(s_layer)
        layer_hist = sorted(distributed.gather_lists(layer_hist), key=lambda h: h["expert"])
        history.append({"layer": l, "experts": layer_hist})
        log(f"layer {l}: expert MSE {sum(h['mse_before'] for h in layer_hist):.5f} -> "
            f"{sum(h['mse_after'] for h in layer_hist):.5f}")
    return {"layers": history}


def train_expert(expert, x, y, cfg: DistillConfig):
    """AdamW on MSE(expert(x), y) over the cached tokens, the expert's zeros kept. Returns the MSE
    before and after."""
    masks = zero_masks(expert)
    opt = torch.optim.AdamW(expert.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    bs = cfg.batch_size * cfg.seqlen // 2  # tokens per step: about a micro-batch's routed tokens
    steps = max(1, math.ceil(len(x) / bs)) * cfg.epochs
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        before = F.mse_loss(expert(x), y).item()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g, device="cpu")  # the same order on every device
        for i in range(0, len(x), bs):
            idx = order[i:i + bs]
            loss = F.mse_loss(expert(x[idx]), y[idx])
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * cosine(step, steps, cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            apply_masks(expert, masks, grads=True)
            opt.step()
            apply_masks(expert, masks)
            step += 1
    with torch.no_grad():
        after = F.mse_loss(expert(x), y).item()
    return before, after


# -----------------------------------------------------------------------------


def check_pair(teacher_dir, student_dir):
    t, s = read_config(teacher_dir), read_config(student_dir)
    refuse_variant(teacher_dir, t)
    refuse_variant(student_dir, s)
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim"):
        if getattr(t, f) != getattr(s, f):
            raise data.DataError(f"teacher and student configs differ: {f} {getattr(t, f)} vs {getattr(s, f)}")
    return s


def load_sharded(path: str, device: torch.device) -> mm.Mixtral:
    """Under torchrun: the model built on the meta device, sharded with FSDP2, and each rank's
    shards filled from the checkpoint one tensor at a time (no rank holds the whole model)."""
    reader = CheckpointReader(path)
    if reader.config.tie_word_embeddings:
        raise data.DataError(f"{path}: tied embeddings are not supported under torchrun")
    with torch.device("meta"):
        model = mm.Mixtral(reader.config)
    distributed.shard_model(model, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            distributed.local(p).copy_(distributed.shard_like(reader.get(name, torch.float32, device), p))
    return model


def gather_experts(layer: mm.DecoderLayer):
    """Expert parallel: each expert's weights from the rank that distilled it (expert e: rank e % W)."""
    for e, expert in enumerate(layer.block_sparse_moe.experts):
        for p in expert.parameters():
            distributed.broadcast(p.data, e % distributed.world())


def distill_checkpoint(teacher_dir: str, student_dir: str, out: str, cfg: DistillConfig, mode: str = "full",
                       text: str = "stdlib", device: str = "cpu", overwrite: bool = False, log=log,
                       recipe: dict = None) -> dict:
    """Distil the pruned student_dir from the dense teacher_dir on text (Eq. 10), write out;
    returns the report. Under torchrun rank 0 writes; every rank checks the input alike first."""
    config = check_pair(teacher_dir, student_dir)
    CheckpointReader(teacher_dir), CheckpointReader(student_dir)  # every key, shape and shard, before any work
    check_output(out, overwrite, [student_dir, teacher_dir, data.input_path(text)])
    if cfg.seqlen > config.max_position_embeddings or cfg.seqlen < 2:
        raise data.DataError(f"--seqlen {cfg.seqlen} outside [2, max_position_embeddings "
                             f"{config.max_position_embeddings}]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise data.DataError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.loss not in ("eq10", "ce", "mse"):
        raise data.DataError(f"--loss {cfg.loss!r}: eq10, ce or mse")
    if mode == "per-expert":
        if cfg.loss == "ce":
            raise data.DataError("--mode per-expert trains each expert on Eq. 10's expert term alone (mse); "
                                 "--loss ce needs --mode full")
        cfg = replace(cfg, loss="mse")  # what per-expert mode computes, and so what its report records
    if mode == "full" and cfg.batch_size % distributed.world():
        raise data.DataError(f"--batch-size {cfg.batch_size} must be a multiple of the {distributed.world()} processes")
    ids = data.encode(data.load_tokenizer(teacher_dir), data.text_source(text, "train"))
    windows = data.calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    pruned = pruned_matrices(student_dir, config)  # the matrices whose zeros stay zero
    if distributed.is_main():  # every check passed: say what runs before the first minutes of it
        log(f"{data.shown_path(student_dir)} distilled from {data.shown_path(teacher_dir)} -> {data.shown_path(out)}: "
            f"{mode} mode, loss {cfg.loss}, {cfg.nsamples} x {cfg.seqlen} tokens of {text}, {cfg.epochs} epochs")
    device = torch.device(device)
    writer = CheckpointWriter(out, config, overwrite=overwrite, src_dir=student_dir, inputs=[teacher_dir]) \
        if distributed.is_main() else contextlib.nullcontext()
    with writer:
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        if mode == "full":
            load = (lambda p: load_sharded(p, device)) if distributed.active() else \
                (lambda p: load_model(p, torch.float32, device))
            teacher = load(teacher_dir).requires_grad_(False) if cfg.loss != "ce" else None  # ce needs no teacher
            student = load(student_dir)
            masks = zero_masks(student, pruned)
            if not masks:
                raise data.DataError(f"{student_dir}: no pruned weights (no exact zeros in its pruned matrices); "
                                     f"distil a checkpoint written by prune.py")
            student, report = distill_full(teacher, student, masks, windows, cfg, device, log)
            after = zero_masks(student, list(masks))
            assert masks.keys() == after.keys() and all(torch.equal(masks[k], after[k]) for k in masks)
            s_reader = CheckpointReader(student_dir)
            for name, p_ in student.named_parameters():  # one tensor gathered at a time
                full = distributed.gathered(p_.detach())
                if writer is not None and distributed.is_main():
                    writer.add(name, full.to(s_reader.dtype_of(name)))
        else:
            report = distill_per_expert(teacher_dir, student_dir, windows, cfg, writer if distributed.is_main()
                                        else None, device, log)
        report.update({"mode": mode, "teacher": data.shown_path(teacher_dir), "student": data.shown_path(student_dir),
                       "data": text, "settings": asdict(cfg), "tokens": windows.numel(),
                       "seconds": time.time() - t0, "world_size": distributed.world(),
                       "args": {"teacher": data.shown_path(teacher_dir), "student": data.shown_path(student_dir),
                                "mode": mode, "calib_data": text, "device": str(device), **asdict(cfg)}})
        if recipe:
            report["recipe"] = recipe
        if distributed.is_main():
            writer.extra_files["distill_report.json"] = report
    if distributed.is_main():
        log(f"wrote {out} ({report['seconds']:.0f}s)")
    return report


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with cli.errors():
        recipe = cli.apply_recipe(p, args, argv, paths=("teacher", "student", "calib_data"),
                                  renamed={"samples": "nsamples", "data": "calib_data"})
        if args.student is None:
            p.error("--student is required (or --recipe)")
        cfg = DistillConfig(**{f: getattr(args, f) for f in asdict(DistillConfig())})
        if args.mode == "per-expert" and args.loss == "eq10" and "loss" in cli.given_flags(p, argv):
            raise data.DataError("--mode per-expert trains each expert on Eq. 10's expert term alone: --loss mse "
                                 "(the default there), or --mode full for --loss eq10")
        device = distributed.init(args.device)  # under torchrun: join the process group
        try:
            return distill_checkpoint(args.teacher or data.default_model_dir(), args.student, args.out, cfg,
                                      args.mode, args.calib_data, device, args.overwrite, recipe=recipe)
        finally:
            distributed.finish()


if __name__ == "__main__":
    main()
