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

Full-parameter fine-tuning that keeps the mask: every weight that is zero in the pruned
student (the pruned ones) gets its gradient zeroed before each step and is set to exactly zero
again after it, so the zero pattern after training is bitwise the one before.

Two modes:
  - full (default): the whole student and teacher in memory, the loss above;
  - per-expert (--mode per-expert): memory-light, for models far larger than memory. Layer by
    layer, as prune.py works, the teacher's activations are run forward and each student expert
    is trained to match its teacher expert's output on the cached inputs of the tokens the teacher
    routes to it (MSE alone; only one layer of each model is ever loaded). Attention, router and
    norms are copied from the student unchanged.

Paper settings as defaults where they fit: 1000 samples, 3 epochs, AdamW at lr 2e-5 with a cosine
schedule. Sequence length is not given by the paper; the default, 128 tokens, is sized so that the
embedded model distils in a few minutes on 2 CPU cores.

    python distill.py --teacher models/tiny-mixtral --student out/moe-pruner-50 --out out/moe-pruner-50-kd
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import cli
import data
import mini_mixtral as mm
from checkpoint import CheckpointReader, CheckpointWriter, check_output, load_layer, load_model, read_config
from layerwise import embed_windows, layers, run_layer
from progress import log


@dataclass
class DistillConfig:
    samples: int = 1000  # training windows (paper: 1000 C4 samples)
    seqlen: int = 128  # not stated by the paper; small, so the embedded model distils in minutes on CPU
    epochs: int = 3  # paper
    lr: float = 2e-5  # paper, AdamW peak, cosine to 0
    warmup_steps: int = 10
    batch_size: int = 8  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0  # no decay: fine-tuning a pretrained model
    rebalance_every: int = 0  # 0: lambda fixed after the first batch (paper); N: re-balance every N steps
    seed: int = 0


# -----------------------------------------------------------------------------
# The loss (Eq. 10) and the mask


def expert_mse(teacher_calls: dict, student_inputs: dict, student: mm.Mixtral) -> torch.Tensor:
    """sum over layers and experts of MSE(teacher expert output, student expert output) on the
    tokens the teacher routes to each expert (the expert term of Eq. 10).

    teacher_calls: {layer: [ExpertCall]} from the teacher's forward; student_inputs: {layer:
    [N, hidden] student MoE-block input}.
    """
    total = 0.0
    for l, calls in teacher_calls.items():
        x_s = student_inputs[l]  # [N, hidden] the student's post-attention-normed hidden states
        experts = student.model.layers[l].block_sparse_moe.experts
        for c in calls:
            y_s = experts[c.expert](x_s[c.tokens])  # [n, hidden] the student expert on the same tokens
            total = total + F.mse_loss(y_s.float(), c.y.float())
    return total


def kd_lambda(ce: torch.Tensor, l_expert: torch.Tensor) -> float:
    """Eq. 10's lambda, set to L_CE / L_expert (the paper) so that both terms start equal."""
    if not (torch.isfinite(ce) and torch.isfinite(l_expert)) or l_expert.item() == 0:
        raise data.DataError(f"lambda = L_CE / L_expert is undefined on the first batch (L_CE {ce.item():.4g}, "
                             f"L_expert {l_expert.item():.4g}): the student's experts compute the teacher's "
                             f"exactly; is the student pruned?")
    return (ce / l_expert).item()


def pruned_matrices(student_dir: str, model: torch.nn.Module) -> list:
    """The names of the matrices that pruning changed: those prune_report.json lists with sparsity
    > 0 when the student has one, else every expert matrix. Only these keep a mask; an exact zero
    elsewhere (the embedding has a few) is an ordinary weight."""
    report = os.path.join(student_dir, "prune_report.json")
    if os.path.isfile(report):
        with open(report) as f:
            return [n for n, s in json.load(f).get("per_matrix_sparsity", {}).items() if s > 0]
    return [n for n, p in model.named_parameters() if ".experts." in n and p.dim() == 2]


def zero_masks(model: torch.nn.Module, names=None) -> dict:
    """{parameter name: bool mask of its exact zeros} for the named matrices (default: every
    matrix of the module) that have any: the pruned weights, which must stay zero."""
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.dim() == 2] if names is None else names
    return {n: params[n] == 0 for n in names if bool((params[n] == 0).any())}


def apply_masks(model, masks, grads=False):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, m in masks.items():
            t = params[n].grad if grads else params[n]
            if t is not None:
                t.masked_fill_(m, 0)


def cosine(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# -----------------------------------------------------------------------------
# Full mode


class Capture:
    """Observers and pre-hooks that record a model's expert calls and MoE inputs per layer."""

    def __init__(self, model: mm.Mixtral, inputs=False):
        self.calls, self.inputs, self.hooks = {}, {}, []
        n = model.config.num_hidden_layers
        self.observers = {l: (lambda c, l=l: self.calls.setdefault(l, []).append(c)) for l in range(n)}
        if inputs:
            for l, layer in enumerate(model.model.layers):
                self.hooks.append(layer.block_sparse_moe.register_forward_pre_hook(
                    # the block's input [B, T, hidden] kept as [N, hidden]
                    lambda mod, args, l=l: self.inputs.__setitem__(l, args[0].reshape(-1, args[0].shape[-1]))))

    def clear(self):
        self.calls, self.inputs = {}, {}

    def remove(self):
        for h in self.hooks:
            h.remove()


def distill_full(teacher, student, masks: dict, windows, cfg: DistillConfig, device, log):
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    steps_per_epoch = math.ceil(len(windows) / (cfg.batch_size * cfg.grad_accum))
    total = steps_per_epoch * cfg.epochs
    t_cap, s_cap = Capture(teacher), Capture(student, inputs=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    g = torch.Generator().manual_seed(cfg.seed)
    lam, history, step, t0 = None, [], 0, time.time()
    student.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(windows), generator=g)
        sums = {"ce": 0.0, "expert": 0.0, "n": 0}
        for i in range(0, len(windows), cfg.batch_size):
            x = windows[order[i:i + cfg.batch_size]].to(device)  # [b, T]
            with torch.no_grad(), autocast:
                t_cap.clear()
                teacher(x, observers=t_cap.observers)
            with autocast:
                s_cap.clear()
                logits = student(x)
                ce = mm.next_token_nll(logits, x)
                l_exp = expert_mse(t_cap.calls, s_cap.inputs, student)
            starts_step = sums["n"] % cfg.grad_accum == 0
            if lam is None or (cfg.rebalance_every and starts_step and step % cfg.rebalance_every == 0):
                lam = kd_lambda(ce, l_exp)  # on the first batch (and every rebalance_every steps)
            loss = (ce + lam * l_exp) / cfg.grad_accum
            if not torch.isfinite(loss):
                raise data.DataError(f"non-finite loss at step {step} (CE {ce.item():.4g}, expert MSE "
                                     f"{l_exp.item():.4g}, lambda {lam:.4g}); nothing was written")
            loss.backward()
            sums["ce"] += ce.item()
            sums["expert"] += l_exp.item()
            sums["n"] += 1
            if sums["n"] % cfg.grad_accum == 0 or i + cfg.batch_size >= len(windows):
                for grp in opt.param_groups:
                    grp["lr"] = cfg.lr * cosine(step, total, cfg.warmup_steps)
                apply_masks(student, masks, grads=True)  # pruned weights receive no update ...
                opt.step()
                opt.zero_grad(set_to_none=True)
                apply_masks(student, masks)  # ... and are exactly zero after it
                step += 1
                if step % 10 == 0 or step == total:
                    log(f"epoch {epoch + 1} step {step}/{total}: CE {ce.item():.4f}, expert MSE {l_exp.item():.5f}, "
                        f"lambda {lam:.3g}, {time.time() - t0:.0f}s")
        history.append({"epoch": epoch + 1, "ce": sums["ce"] / sums["n"], "expert_mse": sums["expert"] / sums["n"]})
        log(f"epoch {epoch + 1}: mean CE {history[-1]['ce']:.4f}, mean expert MSE {history[-1]['expert_mse']:.5f}")
    t_cap.remove()
    s_cap.remove()
    return student.eval(), {"lambda": lam, "epochs": history, "optimizer_steps": step}


# -----------------------------------------------------------------------------
# Per-expert mode: one layer of each model at a time


def distill_per_expert(teacher_dir, student_dir, windows, cfg: DistillConfig, writer, device, log):
    """Layer by layer: teacher activations forward, each student expert regressed on its teacher
    expert's outputs for the tokens the teacher routes to it; the layer is then written. Holds one
    decoder layer of each model (the teacher's only while it runs) and the cached expert data."""
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

        x = run_layer(t_layer, x, pos, cfg.batch_size, observer)  # teacher activations feed l+1
        del t_layer
        layer_hist = []
        for e, expert in enumerate(s_layer.block_sparse_moe.experts):
            if not inputs[e]:
                continue
            xe, ye = torch.cat(inputs[e]), torch.cat(targets[e])  # [n_e, hidden] cached routed inputs and outputs
            before, after = train_expert(expert, xe, ye, cfg)
            layer_hist.append({"expert": e, "tokens": len(xe), "mse_before": before, "mse_after": after})
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
        order = torch.randperm(len(x), generator=g)
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
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "head_dim"):
        if getattr(t, f) != getattr(s, f):
            raise data.DataError(f"teacher and student configs differ: {f} {getattr(t, f)} vs {getattr(s, f)}")
    return s


def distill_checkpoint(teacher_dir: str, student_dir: str, out: str, cfg: DistillConfig, mode: str = "full",
                       text: str = "stdlib", device: str = "cpu", overwrite: bool = False, log=log,
                       recipe: dict = None) -> dict:
    """Distil the pruned student_dir from the dense teacher_dir on text (Eq. 10), write out; returns the report."""
    config = check_pair(teacher_dir, student_dir)
    CheckpointReader(teacher_dir), CheckpointReader(student_dir)  # every key, shape and shard, before any work
    check_output(out, overwrite, [student_dir, teacher_dir])
    if cfg.seqlen > config.max_position_embeddings or cfg.seqlen < 2:
        raise data.DataError(f"--seqlen {cfg.seqlen} outside [2, max_position_embeddings "
                             f"{config.max_position_embeddings}]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise data.DataError("--device cuda asked for, but torch sees no CUDA device")
    ids = data.encode(data.load_tokenizer(teacher_dir), data.text_source(text, "train"))
    windows = data.calibration_windows(ids, cfg.samples, cfg.seqlen, cfg.seed)
    device = torch.device(device)
    with CheckpointWriter(out, config, overwrite=overwrite, src_dir=student_dir, inputs=[teacher_dir]) as writer:
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        if mode == "full":
            teacher = load_model(teacher_dir, torch.float32, device).requires_grad_(False)
            student = load_model(student_dir, torch.float32, device)
            masks = zero_masks(student, pruned_matrices(student_dir, student))
            if not masks:
                raise data.DataError(f"{student_dir}: no pruned weights (no exact zeros in its pruned matrices); "
                                     f"distil a checkpoint written by prune.py")
            student, report = distill_full(teacher, student, masks, windows, cfg, device, log)
            after = zero_masks(student, list(masks))
            assert masks.keys() == after.keys() and all(torch.equal(masks[k], after[k]) for k in masks)
            s_reader = CheckpointReader(student_dir)
            for name, p_ in student.state_dict().items():
                if not (name == "lm_head.weight" and config.tie_word_embeddings):
                    writer.add(name, p_.to(s_reader.dtype_of(name)))
        else:
            report = distill_per_expert(teacher_dir, student_dir, windows, cfg, writer, device, log)
        report.update({"mode": mode, "teacher": data.shown_path(teacher_dir), "student": data.shown_path(student_dir),
                       "data": text, "settings": asdict(cfg), "tokens": windows.numel(),
                       "seconds": time.time() - t0,
                       "args": {"teacher": data.shown_path(teacher_dir), "student": data.shown_path(student_dir),
                                "mode": mode, "data": text, "device": str(device), **asdict(cfg)}})
        if recipe:
            report["recipe"] = recipe
        writer.extra_files["distill_report.json"] = report
    log(f"wrote {out} ({report['seconds']:.0f}s)")
    return report


# DistillConfig field -> the argparse type that refuses bad values before any work
FIELD_TYPES = {"samples": cli.positive_int, "seqlen": cli.seqlen, "epochs": cli.positive_int, "lr": cli.positive_float,
               "warmup_steps": cli.nonnegative_int, "batch_size": cli.positive_int, "grad_accum": cli.positive_int,
               "weight_decay": cli.nonnegative_float, "rebalance_every": cli.nonnegative_int, "seed": int}


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--teacher", help="the dense checkpoint (default: the embedded tiny Mixtral)")
    p.add_argument("--student", help="the pruned checkpoint (same config)")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--mode", default="full", choices=("full", "per-expert"),
                   help="full: Eq. 10 on the whole model; per-expert: one expert at a time on cached inputs")
    p.add_argument("--data", default="stdlib",
                   help="training text: a C4 json/json.gz shard, any text file, or 'stdlib' (the embedded corpus's "
                        "train split, default)")
    for f, default in asdict(DistillConfig()).items():
        p.add_argument("--" + f.replace("_", "-"), type=FIELD_TYPES[f], default=default,
                       help=f"DistillConfig.{f} (default {default}; see the module docstring)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda when available")
    p.add_argument("--recipe", help="repeat the run a distill_report.json records (same arguments and seed, so the "
                                    "same windows and steps); flags given as well override it")
    args = p.parse_args(argv)
    with cli.errors():
        recipe = cli.apply_recipe(p, args, argv, paths=("teacher", "student", "data"))
        if args.student is None:
            p.error("--student is required (or --recipe)")
        cfg = DistillConfig(**{f: getattr(args, f) for f in asdict(DistillConfig())})
        return distill_checkpoint(args.teacher or data.default_model_dir(), args.student, args.out, cfg, args.mode,
                                  args.data, args.device, args.overwrite, recipe=recipe)


if __name__ == "__main__":
    main()
