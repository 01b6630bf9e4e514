"""distill.py: Eq. 10's loss, lambda, the kept sparsity mask, and both modes."""

import copy
import dataclasses
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import data
import distill
import checkpoint
import expert_prune
import cli
import outputs
import prune
from conftest import assert_float32_close, expert_mse, random_model, script_error, small_tokenizer, stand_in_clock, TEXT, write_checkpoint


@pytest.fixture
def pair(tmp_path, ckpt, text_file):
    student = str(tmp_path / "student")
    prune.main(["--model", ckpt, "--method", "moe-pruner", "--sparsity", "0.5", "--calib-data", text_file,
                "--nsamples", "8", "--seqlen", "32", "--out", student])
    return ckpt, student


ARGS = ["--nsamples", "16", "--seqlen", "32", "--epochs", "2", "--lr", "1e-3", "--batch-size", "4"]


def full_mode_models(pair):
    """The pair loaded as distill_full takes it: the frozen teacher, the student, the student's masks."""
    teacher_dir, student_dir = pair
    teacher = checkpoint.load_model(teacher_dir).requires_grad_(False)
    student = checkpoint.load_model(student_dir)
    return teacher, student, distill.zero_masks(student, distill.pruned_matrices(student_dir, student.config))


def step_gradients(monkeypatch, student) -> list:
    """Filled with every parameter's gradient at each AdamW step (zeros where it has none, e.g.
    lm_head under L_expert alone)."""
    grads, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in student.named_parameters()}),
        step(self, *a, **k))[1])
    return grads


def test_full_mode_keeps_the_mask_bitwise_and_learns(tmp_path, pair, text_file):
    teacher, student = pair
    out = str(tmp_path / "kd")
    rep = distill.main(["--teacher", teacher, "--student", student, "--calib-data", text_file, "--out", out, *ARGS])
    before = distill.zero_masks(checkpoint.load_model(student))
    after = distill.zero_masks(checkpoint.load_model(out))
    assert before.keys() == after.keys() and len(before) == 2 * 4 * 3  # every expert matrix, nothing else
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in checkpoint.load_model(out).state_dict().items() if not torch.equal(v, checkpoint.load_model(student).state_dict()[k])]
    assert any("self_attn" in k for k in changed) and any(".experts." in k for k in changed)  # full-parameter
    assert rep["epochs"][1]["ce"] < rep["epochs"][0]["ce"]
    saved = json.load(open(os.path.join(out, "distill_report.json")))
    assert saved["lambda"] == rep["lambda"] and saved["settings"]["epochs"] == 2


def test_lambda_is_ce_over_expert_loss_on_the_first_batch(tmp_path, pair, text_file):
    teacher_dir, student_dir = pair
    rep = distill.main(["--teacher", teacher_dir, "--student", student_dir, "--calib-data", text_file,
                        "--out", str(tmp_path / "kd"), *ARGS])
    # recompute the first batch independently: same windows, same shuffling seed
    ids = data.encode(small_tokenizer(300), TEXT)
    windows = data.calibration_windows(ids, 16, 32, 0)
    first = windows[torch.randperm(16, generator=torch.Generator().manual_seed(0))[:4]]
    teacher, student = checkpoint.load_model(teacher_dir), checkpoint.load_model(student_dir)
    calls, inputs = {}, {}
    observers = {l: (lambda c, l=l: calls.setdefault(l, []).append(c)) for l in range(2)}
    for l, layer in enumerate(student.model.layers):
        layer.block_sparse_moe.register_forward_pre_hook(
            lambda mod, a, l=l: inputs.__setitem__(l, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        teacher(first, observers=observers)
        logits = student(first)
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 300), first[:, 1:].reshape(-1))
        l_exp = expert_mse(calls, inputs, student)
    assert rep["lambda"] == pytest.approx((ce / l_exp).item(), rel=1e-5)


def test_expert_loss_is_zero_for_an_identical_student_and_counts_teacher_routed_tokens():
    teacher, student = random_model(), random_model()
    x = torch.randint(0, 300, (2, 16))
    t_calls = distill.TeacherCalls(2)
    inputs = {}
    for l, layer in enumerate(student.model.layers):
        layer.block_sparse_moe.register_forward_pre_hook(
            lambda mod, a, l=l: inputs.__setitem__(l, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        teacher(x, observers=t_calls.observers)
        student(x)
    assert expert_mse(t_calls.calls, inputs, student).item() == pytest.approx(0, abs=1e-12)
    assert sum(len(c.tokens) for c in t_calls.calls[0]) == 2 * 16 * 2  # top-2: each token in two experts' MSE
    assert t_calls.counts(2, 4, "cpu").sum() == 2 * 2 * 16 * 2
    with torch.no_grad():
        student.model.layers[1].block_sparse_moe.experts[2].w2.weight.mul_(2)  # change one expert
        student(x)
    calls = [c for c in t_calls.calls[1] if c.expert == 2]
    want = F.mse_loss(2 * calls[0].y, calls[0].y).item() if calls else 0.0
    assert expert_mse({1: t_calls.calls[1]}, inputs, student).item() == pytest.approx(want, rel=1e-5)


def test_per_expert_mode(tmp_path, pair, text_file):
    teacher, student = pair
    out = str(tmp_path / "kd")
    rep = distill.main(["--teacher", teacher, "--student", student, "--calib-data", text_file, "--out", out,
                        "--mode", "per-expert", *ARGS])
    experts = [e for l in rep["layers"] for e in l["experts"]]
    assert experts and all(e["mse_after"] < e["mse_before"] for e in experts)
    s, o = checkpoint.CheckpointReader(student), checkpoint.CheckpointReader(out)
    for k in s.weight_map:
        a, b = s.get(k), o.get(k)
        if ".experts." in k:
            assert torch.equal(a == 0, b == 0), k  # mask kept
        else:
            assert torch.equal(a, b), k  # attention, router, norms, embeddings copied


def test_bad_input(tmp_path, pair, text_file, capsys):
    teacher, student = pair
    other = write_checkpoint(tmp_path / "other", num_local_experts=8)
    (tmp_path / "short.txt").write_text("x = 1\n")
    for argv, msg in [(["--teacher", other, "--student", student], "configs differ: num_local_experts 8 vs 4"),
                      (["--teacher", teacher, "--student", str(tmp_path / "none")], "no such checkpoint directory"),
                      (["--teacher", teacher, "--student", student, "--seqlen", "4096"], "outside [2, max_position"),
                      (["--teacher", teacher, "--student", student, "--samples", "4", "--seqlen", "120",
                        "--data", str(tmp_path / "short.txt")], "fewer than one window")]:
        line = script_error(capsys, distill.main, [*argv, "--calib-data", text_file, "--out", str(tmp_path / "o")]
                            if not {"--calib-data", "--data"} & set(argv) else [*argv, "--out", str(tmp_path / "o")])
        assert msg in line, line
        assert not (tmp_path / "o").exists()


def test_kd_masks_only_the_pruned_matrices(tmp_path, pair):
    """The embedding has exact zeros too; only the matrices prune_report.json lists keep a mask."""
    teacher, student = pair
    model = checkpoint.load_model(student)
    with torch.no_grad():
        model.model.embed_tokens.weight[3, :5] = 0  # an ordinary weight that happens to be zero
    names = distill.pruned_matrices(student, model.config)
    masks = distill.zero_masks(model, names)
    assert set(masks) == {n for n in names} and all(".experts." in n for n in masks)
    assert "model.embed_tokens.weight" not in masks and not any("norm" in n or ".gate." in n for n in masks)
    assert "model.embed_tokens.weight" in distill.zero_masks(model)  # what masking every zero would have frozen


def test_a_distill_recipe_repeats_the_run_bit_for_bit(tmp_path, pair, text_file):
    teacher, student = pair
    first = str(tmp_path / "kd1")
    distill.main(["--teacher", teacher, "--student", student, "--calib-data", text_file, "--out", first, *ARGS])
    rep = distill.main(["--recipe", os.path.join(first, "distill_report.json"), "--out", str(tmp_path / "kd2")])
    a, b = (checkpoint.load_model(d) for d in (first, str(tmp_path / "kd2")))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert rep["recipe"]["overridden"] == {}
    rep = distill.main(["--recipe", os.path.join(first, "distill_report.json"), "--epochs", "1",
                        "--out", str(tmp_path / "kd3")])
    assert rep["recipe"]["overridden"] == {"epochs": 1}


def test_per_expert_mode_in_bfloat16_learns_and_keeps_the_mask(tmp_path, pair, text_file):
    teacher, student = pair
    out = str(tmp_path / "kd")
    rep = distill.main(["--teacher", teacher, "--student", student, "--calib-data", text_file, "--out", out,
                        "--mode", "per-expert", "--dtype", "bfloat16", *ARGS])
    assert rep["settings"]["dtype"] == "bfloat16"
    experts = [e for l in rep["layers"] for e in l["experts"]]
    assert experts and all(e["mse_after"] < e["mse_before"] for e in experts)
    s, o = checkpoint.CheckpointReader(student), checkpoint.CheckpointReader(out)
    for k in s.weight_map:
        if ".experts." in k:
            assert torch.equal(s.get(k) == 0, o.get(k) == 0), k


def test_a_report_with_the_former_flag_names_still_repeats_its_run(tmp_path):
    """--samples and --data became --nsamples and --calib-data (the vocabulary of prune.py); a report
    written under the former names still drives --recipe."""
    old = tmp_path / "distill_report.json"
    old.write_text(json.dumps({"args": {"samples": 12, "data": "stdlib", "epochs": 2, "teacher": "models/tiny-mixtral"}}))
    p = cli.parser("t")
    cli.add_calib_data_arg(p, "train", former=("--data",))
    p.add_argument("--nsamples", "--samples", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--recipe")
    a = p.parse_args(["--recipe", str(old), "--epochs", "1"])
    rec = cli.apply_recipe(p, a, ["--recipe", str(old), "--epochs", "1"], renamed={"samples": "nsamples", "data": "calib_data"})
    assert (a.nsamples, a.calib_data, a.epochs) == (12, "stdlib", 1) and rec["overridden"] == {"epochs": 1}
    assert p.parse_args(["--samples", "5", "--data", "x"]).__dict__ == p.parse_args(["--nsamples", "5", "--calib-data", "x"]).__dict__


def test_per_expert_training_steps_follow_the_schedule_over_every_token(monkeypatch):
    """train_expert (--mode per-expert): steps of batch_size x seqlen / 2 tokens, each epoch one
    seeded permutation of all cached tokens, the learning rate of step s lr x cosine(s, steps,
    warmup), the pruned weights kept at zero; it reports the MSE before and after."""
    expert = random_model().model.layers[0].block_sparse_moe.experts[1]
    with torch.no_grad():
        expert.w1.weight[:, ::3] = 0  # a pruned pattern to keep
    zeros = {n: (p == 0).clone() for n, p in expert.named_parameters()}
    untrained = copy.deepcopy(expert)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(50)  # each row says which token it is
    y = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    cfg = distill.DistillConfig(batch_size=2, seqlen=8, epochs=3, lr=1e-3, warmup_steps=2, seed=5, weight_decay=0.05)
    seen, lrs = [], []
    expert.register_forward_pre_hook(lambda m, a: seen.append(a[0][:, 0].long().tolist()))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (lrs.append([(g["lr"], g["weight_decay"], g["betas"]) for g in self.param_groups]),
                                               pruned_grads.append(expert.w1.weight.grad[zeros["w1.weight"]].abs().sum()),
                                               step(self, *a, **k))[2])
    pruned_grads = []
    before, after = distill.train_expert(expert, x, y, cfg)
    assert seen[0] == seen[-1] == list(range(50))  # the MSE before and after, on every token
    g = torch.Generator().manual_seed(5)
    batches = [b for _ in range(3) for b in torch.randperm(50, generator=g).split(8)]  # 7 steps an epoch
    assert seen[1:-1] == [b.tolist() for b in batches]
    assert lrs == [[(1e-3 * distill.cosine(s, 21, 2), 0.05, (0.9, 0.95))] for s in range(21)]
    assert all(g == 0 for g in pruned_grads)  # the pruned weights' gradients are zeroed before each step
    assert all(torch.equal(p == 0, zeros[n]) for n, p in expert.named_parameters())
    with torch.no_grad():
        assert before == pytest.approx(F.mse_loss(untrained(x), y).item())
        assert after == pytest.approx(F.mse_loss(expert(x), y).item()) and after < before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_expert_mode_trains_exactly_the_experts_the_teacher_routes_to(tmp_path, pair, seed):
    """On a handful of tokens some experts receive none: each layer's history lists every expert
    the teacher routed tokens to, with their count, and no other; an expert with no tokens is left
    as the student had it, the others are trained."""
    teacher, student = pair
    windows = torch.randint(0, 300, (1, 3), generator=torch.Generator().manual_seed(seed))
    counts = {}
    observers = {l: (lambda c, l=l: counts.__setitem__((l, c.expert), len(c.tokens))) for l in range(2)}
    with torch.no_grad():
        checkpoint.load_model(teacher)(windows, observers)
    out = str(tmp_path / "kd")
    cfg = distill.DistillConfig(epochs=1, lr=1e-2)
    with checkpoint.CheckpointWriter(out, checkpoint.read_config(student), src_dir=student) as writer:
        lines = []
        rep = distill.distill_per_expert(teacher, student, windows, cfg, writer, "cpu", lines.append)
    assert [h["layer"] for h in rep["layers"]] == [0, 1]
    assert lines == [f"layer {h['layer']}: expert MSE {sum(e['mse_before'] for e in h['experts']):.5f} -> "
                     f"{sum(e['mse_after'] for e in h['experts']):.5f}" for h in rep["layers"]]
    got = {(h["layer"], e["expert"]): e["tokens"] for h in rep["layers"] for e in h["experts"]}
    assert got == counts and len(got) < 8  # some expert had no token
    s, o = checkpoint.load_model(student), checkpoint.load_model(out)
    for l in range(2):
        for e in range(4):
            name = f"model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"
            same = torch.equal(s.get_parameter(name), o.get_parameter(name))
            assert same == ((l, e) not in counts), (l, e)


def test_per_expert_mode_runs_a_bfloat16_stored_teacher_in_float32(tmp_path, text_file):
    """The teacher's layers are loaded as float32 whatever they are stored in: a teacher stored in
    bfloat16 gives the same targets, so the same training, as its values stored in float32."""
    m = random_model()
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16).float()  # values that bfloat16 holds exactly
    t16, t32 = write_checkpoint(tmp_path / "t16", model=m, dtype=torch.bfloat16), write_checkpoint(tmp_path / "t32", model=m)
    student = str(tmp_path / "student")
    prune.main(["--model", t16, "--method", "wanda", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "16",
                "--out", student])
    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    reports = []
    for teacher in (t16, t32):
        out = str(tmp_path / f"kd-{os.path.basename(teacher)}")
        with checkpoint.CheckpointWriter(out, checkpoint.read_config(student), src_dir=student) as writer:
            reports.append(distill.distill_per_expert(teacher, student, windows, distill.DistillConfig(epochs=1), writer,
                                                      "cpu", lambda s: None))
    assert reports[0] == reports[1]


@pytest.mark.parametrize("n", [7, 6])  # 4 micro-batches an epoch, or 3: the epoch's end steps on the odd one
def test_full_mode_steps_follow_the_schedule_over_every_window(tmp_path, pair, monkeypatch, n):
    """distill_full: each epoch one seeded permutation of the windows in micro-batches of
    batch_size, an optimizer step every grad_accum micro-batches and at the epoch's end, the
    learning rate of step s lr x cosine(s, steps, warmup), AdamW with the configured decay and
    betas (0.9, 0.95); the report's epochs average its steps."""
    teacher, student, masks = full_mode_models(pair)
    windows = torch.randint(0, 300, (n, 12), generator=torch.Generator().manual_seed(0))
    cfg = distill.DistillConfig(batch_size=2, grad_accum=2, epochs=2, lr=1e-3, warmup_steps=1, weight_decay=0.05, seed=3)
    seen, steps = [], []
    student.register_forward_pre_hook(lambda m, a: seen.append([next(j for j in range(n) if torch.equal(w, windows[j]))
                                                                for w in a[0]]))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (
        steps.append([(g["lr"], g["weight_decay"], g["betas"]) for g in self.param_groups]), step(self, *a, **k))[1])
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    g = torch.Generator().manual_seed(3)
    assert seen == [b.tolist() for _ in range(2) for b in torch.randperm(n, generator=g).split(2)]
    assert steps == [[(1e-3 * distill.cosine(s, 4, 1), 0.05, (0.9, 0.95))] for s in range(4)]  # 2 steps an epoch
    assert [h["step"] for h in rep["steps"]] == [1, 2, 3, 4] and rep["optimizer_steps"] == 4
    for e, epoch in enumerate(rep["epochs"]):
        assert epoch["ce"] == pytest.approx(sum(h["ce"] for h in rep["steps"][2 * e:2 * e + 2]) / 2)
        assert epoch["expert_mse"] == pytest.approx(sum(h["expert_mse"] for h in rep["steps"][2 * e:2 * e + 2]) / 2)
    assert all(torch.equal(p[masks[n]], torch.zeros_like(p[masks[n]])) for n, p in student.named_parameters() if n in masks)


def test_full_mode_in_bfloat16_runs_teacher_and_student_under_autocast(pair):
    teacher, student, masks = full_mode_models(pair)
    dtypes = []
    for m in (teacher, student):
        m.lm_head.register_forward_hook(lambda mod, a, out: dtypes.append(out.dtype))
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    distill.distill_full(teacher, student, masks, windows, distill.DistillConfig(batch_size=2, epochs=1, dtype="bfloat16"),
                         torch.device("cpu"), lambda s: None)
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the teacher's forward, then the student's
    assert all(p.dtype == torch.float32 for p in student.parameters())  # the weights stay float32


@pytest.mark.parametrize("loss", ["eq10", "ce", "mse"])
def test_each_loss_steps_on_the_gradient_of_its_terms(pair, monkeypatch, loss):
    """The first step's gradients are those of the loss written out here (Eq. 10: L_CE + lambda
    L_expert with lambda = L_CE / L_expert; or one term alone, lambda then 0), zero on every pruned
    weight; the report records lambda."""
    teacher, student, masks = full_mode_models(pair)
    reference = copy.deepcopy(student)
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = step_gradients(monkeypatch, student)
    cfg = distill.DistillConfig(batch_size=2, epochs=1, loss=loss)
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    calls, inputs = {}, {}
    for l, layer in enumerate(reference.model.layers):
        layer.block_sparse_moe.register_forward_pre_hook(
            lambda mod, a, l=l: inputs.__setitem__(l, a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        teacher(windows, observers={l: (lambda c, l=l: calls.setdefault(l, []).append(c)) for l in range(2)})
    logits = reference(windows)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 300), windows[:, 1:].reshape(-1))
    l_exp = expert_mse(calls, inputs, reference)
    lam = (ce / l_exp).item() if loss == "eq10" else 0.0
    assert rep["lambda"] == pytest.approx(lam, rel=1e-5, abs=0)
    {"eq10": ce + lam * l_exp, "ce": ce, "mse": l_exp}[loss].backward()
    for n, p in reference.named_parameters():
        want = torch.zeros_like(p) if p.grad is None else p.grad
        want = want.masked_fill(masks[n], 0) if n in masks else want
        assert_float32_close(grads[0][n], want, terms=300, what=n)  # the widest sum: 300 logits
        if n in masks:
            assert not grads[0][n][masks[n]].any()


@pytest.mark.parametrize("every,balanced_at", [(0, 0), (1, 3), (2, 2), (3, 3)])
def test_rebalance_every_n_steps_sets_lambda_from_that_steps_batch(pair, every, balanced_at):
    """--rebalance-every N: lambda = L_CE / L_expert of the batch of every N-th step (0: the first
    batch only); the report's lambda is the last one set (steps 0..3 here, history holds each
    step's two losses)."""
    teacher, student, masks = full_mode_models(pair)
    windows = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(2))
    cfg = distill.DistillConfig(batch_size=1, epochs=1, rebalance_every=every, lr=1e-3)
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    h = rep["steps"][balanced_at]
    assert len(rep["steps"]) == 4 and rep["lambda"] == pytest.approx(h["ce"] / h["expert_mse"], rel=1e-6)



def test_per_expert_mode_in_bfloat16_runs_the_teacher_and_the_training_under_autocast(pair, monkeypatch, tmp_path):
    teacher, student = pair
    seen = []
    train = distill.train_expert
    monkeypatch.setattr(distill, "train_expert", lambda expert, x, y, cfg: (
        seen.append((y.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))), train(expert, x, y, cfg))[1])
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with checkpoint.CheckpointWriter(str(tmp_path / "kd"), checkpoint.read_config(student), src_dir=student) as writer:
        distill.distill_per_expert(teacher, student, windows, distill.DistillConfig(epochs=1, dtype="bfloat16"), writer,
                                   "cpu", lambda s: None)
    assert seen and all(s == (torch.bfloat16, True, torch.bfloat16) for s in seen)  # teacher outputs, then training


def test_the_pruned_matrices_are_those_the_report_gives_sparsity_else_every_expert_matrix(tmp_path, pair):
    teacher, student = pair
    config = checkpoint.read_config(student)
    report = json.load(open(os.path.join(student, "prune_report.json")))
    expected = [n for n, s in report["per_matrix_sparsity"].items() if s > 0]
    assert distill.pruned_matrices(student, config) == expected and expected
    report["per_matrix_sparsity"]["model.layers.0.self_attn.q_proj.weight"] = 0.0  # listed, not pruned: no mask
    edited = tmp_path / "edited"
    shutil.copytree(student, edited)
    (edited / "prune_report.json").write_text(json.dumps(report))
    assert distill.pruned_matrices(str(edited), config) == expected
    (edited / "prune_report.json").unlink()  # no report: every expert matrix
    every = sorted(n for n, s in checkpoint.expected_shapes(config).items() if len(s) == 2 and ".experts." in n)
    assert distill.pruned_matrices(str(edited), config) == every and len(every) == 2 * 4 * 3
    report["per_matrix_sparsity"]["model.layers.9.block_sparse_moe.experts.0.w1.weight"] = 0.5
    (edited / "prune_report.json").write_text(json.dumps(report))
    with pytest.raises(data.DataError) as e:
        distill.pruned_matrices(str(edited), config)
    assert "it names a matrix the student does not have" in str(e.value)


def test_a_matrix_with_a_single_pruned_weight_keeps_its_mask():
    model = random_model()
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    with torch.no_grad():
        model.get_parameter(name)[2, 3] = 0
    masks = distill.zero_masks(model, [name, "model.layers.0.block_sparse_moe.experts.1.w1.weight"])
    assert list(masks) == [name] and masks[name].sum() == 1 and masks[name][2, 3]


def test_cosine_schedule_by_hand():
    """Linear warm-up to the peak over `warmup` steps, then half a cosine from the peak to 0 at
    step `total`, 0 after it."""
    assert [distill.cosine(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert distill.cosine(2, 10, 2) == 1.0 and distill.cosine(6, 10, 2) == pytest.approx(0.5)
    assert distill.cosine(4, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert distill.cosine(10, 10, 2) == pytest.approx(0.0, abs=1e-12) and distill.cosine(12, 10, 2) == pytest.approx(0.0, abs=1e-12)
    assert distill.cosine(4, 4, 3) == pytest.approx(0.0, abs=1e-12)  # one step of decay: all the way down
    assert distill.cosine(3, 3, 3) == 1.0  # warm-up as long as the run: the peak, no division by zero


def test_a_variant_teacher_or_student_is_refused_naming_it(tmp_path, pair, text_file, capsys):
    teacher, student = pair
    skip = str(tmp_path / "skip")
    expert_prune.main(["--model", teacher, "--skip", "--calib-data", text_file, "--nsamples", "2", "--seqlen", "16",
                       "--out", skip])
    for argv in (["--teacher", skip, "--student", student], ["--teacher", teacher, "--student", skip]):
        line = script_error(capsys, distill.main, [*argv, "--calib-data", text_file, "--out", str(tmp_path / "kd")])
        assert f"{skip} is an expert-level variant" in line


def test_per_expert_training_on_fewer_tokens_than_a_step_takes_one_step_an_epoch(monkeypatch):
    expert = random_model().model.layers[0].block_sparse_moe.experts[0]
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    lrs = []
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (lrs.append(self.param_groups[0]["lr"]),
                                                                         step(self, *a, **k))[1])
    distill.train_expert(expert, x, y, distill.DistillConfig(batch_size=1, seqlen=16, epochs=3, lr=1e-3, warmup_steps=1))
    assert lrs == [1e-3 * distill.cosine(s, 3, 1) for s in range(3)]  # 8 tokens a step: 1 step an epoch, 3 in all


def test_full_mode_logs_every_tenth_step_the_last_and_each_epochs_means(pair, monkeypatch):
    """The progress log: a line at every 10th optimizer step and at the last, with the seconds since
    training began (the clock reads 100 s then, 1100 s after), then one per epoch with the means the
    report records for it."""
    stand_in_clock(monkeypatch, distill)
    teacher, student, masks = full_mode_models(pair)
    windows = torch.randint(0, 300, (6, 8), generator=torch.Generator().manual_seed(4))
    lines = []
    cfg = distill.DistillConfig(batch_size=1, epochs=2, lr=1e-3)  # 6 steps an epoch, 12 in all
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lines.append)
    steps = [l for l in lines if " step " in l]
    assert [l.split(":")[0] for l in steps] == ["epoch 2 step 10/12", "epoch 2 step 12/12"]
    h = rep["steps"][9]
    assert steps[0].endswith(f"CE {h['ce']:.4f}, expert MSE {h['expert_mse']:.5f}, lambda {rep['lambda']:.3g}, 1000s")
    assert [e["epoch"] for e in rep["epochs"]] == [1, 2]
    assert [l for l in lines if " step " not in l] == [
        f"epoch {e['epoch']}: mean CE {e['ce']:.4f}, mean expert MSE {e['expert_mse']:.5f}" for e in rep["epochs"]]
    assert rep["epochs"][0]["ce"] == pytest.approx(sum(h["ce"] for h in rep["steps"][:6]) / 6)


def test_gradient_accumulation_steps_on_the_mean_of_its_micro_batches_gradients(pair, monkeypatch):
    """--grad-accum 2 with one window a micro-batch: the first step's gradients are the mean of the
    two windows' Eq. 10 gradients, lambda set on the first window (as one batch of both would have
    it for the cross-entropy; the expert term is each micro-batch's own)."""
    teacher, student, masks = full_mode_models(pair)
    reference = copy.deepcopy(student)
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = step_gradients(monkeypatch, student)
    cfg = distill.DistillConfig(batch_size=1, grad_accum=2, epochs=1)
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    order = torch.randperm(2, generator=torch.Generator().manual_seed(cfg.seed))
    terms = []
    for j in order.tolist():
        x = windows[j:j + 1]
        calls, inputs = {}, {}
        hooks = [layer.block_sparse_moe.register_forward_pre_hook(
            lambda mod, a, l=l: inputs.__setitem__(l, a[0].reshape(-1, a[0].shape[-1])))
            for l, layer in enumerate(reference.model.layers)]
        with torch.no_grad():
            teacher(x, observers={l: (lambda c, l=l: calls.setdefault(l, []).append(c)) for l in range(2)})
        logits = reference(x)
        terms.append((F.cross_entropy(logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1)),
                      expert_mse(calls, inputs, reference)))
        for h in hooks:
            h.remove()
    lam = (terms[0][0] / terms[0][1]).item()
    assert len(grads) == 1 and rep["lambda"] == pytest.approx(lam, rel=1e-5)
    (sum(ce + lam * l_exp for ce, l_exp in terms) / 2).backward()
    for n, p in reference.named_parameters():
        want = p.grad.masked_fill(masks[n], 0) if n in masks else p.grad
        assert_float32_close(grads[0][n], want, terms=300, what=n)  # the widest sum: 300 logits


def bf16_pair(tmp_path, text_file):
    """A teacher stored in bfloat16 (as Mixtral is) and its Wanda-pruned student, stored alike; one
    embedding weight is exactly zero (an ordinary weight, not a pruned one)."""
    m = random_model()
    for p in m.parameters():
        p.data = p.data.to(torch.bfloat16).float()  # values that bfloat16 holds exactly
    m.model.embed_tokens.weight.data[3, 5] = 0
    teacher = write_checkpoint(tmp_path / "t16", model=m, dtype=torch.bfloat16)
    student = str(tmp_path / "s16")
    prune.main(["--model", teacher, "--method", "wanda", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "16",
                "--out", student])
    return teacher, student


def test_distill_checkpoint_trains_float32_copies_on_the_train_split_and_writes_the_students_layout(
        tmp_path, text_file, monkeypatch):
    """What distill_checkpoint hands full mode's training (distill_full, replaced here by a stand-in
    that doubles every weight) and what it writes: both models loaded in float32 on
    the CPU by default, the teacher frozen, the masks of the pruned matrices, the windows of the
    corpus's train split (its defaults are the command line's: --mode full, --calib-data stdlib);
    the student's dtypes and a report naming the run; a lost mask is never written; an existing
    output is replaced only with overwrite."""
    teacher_dir, student_dir = bf16_pair(tmp_path, text_file)
    seen = {}

    def train(teacher, student, masks, windows, cfg, device, log, lose_a_mask=False):
        seen.update(teacher=teacher, student=student, masks=masks, windows=windows, device=device)
        with torch.no_grad():
            for p in student.parameters():
                p.mul_(2)  # exact in bfloat16, and zeros stay zero
            if lose_a_mask:
                p = dict(student.named_parameters())[next(iter(masks))]
                p.masked_fill_(masks[next(iter(masks))], 1.0)
        return student, {"lambda": 2.0}

    monkeypatch.setattr(distill, "distill_full", train)
    sources = []
    monkeypatch.setattr(data, "text_source", lambda spec, split: (sources.append((spec, split)), TEXT)[1])
    cfg = distill.DistillConfig(nsamples=4, seqlen=16, seed=7)
    out = str(tmp_path / "kd")
    lines = []
    rep = distill.distill_checkpoint(teacher_dir, student_dir, out, cfg, log=lines.append)
    assert lines == [f"{data.shown_path(student_dir)} distilled from {data.shown_path(teacher_dir)} -> "
                     f"{data.shown_path(out)}: full mode, loss eq10, 4 x 16 tokens of stdlib, {cfg.epochs} epochs",
                     f"wrote {out} ({rep['seconds']:.0f}s)"]
    p = distill.build_parser()
    assert p.get_default("mode") == "full" and p.get_default("calib_data") == "stdlib"
    t, s = seen["teacher"], seen["student"]
    assert all(q.dtype == torch.float32 and not q.requires_grad for q in t.parameters())
    assert all(q.dtype == torch.float32 and q.requires_grad for q in s.parameters())
    assert seen["device"] == torch.device("cpu")
    config = checkpoint.read_config(student_dir)
    assert sorted(seen["masks"]) == sorted(distill.pruned_matrices(student_dir, config))
    assert sources == [("stdlib", "train")]  # the corpus's train split (stood in for by TEXT here)
    ids = data.encode(data.load_tokenizer(teacher_dir), TEXT)
    assert torch.equal(seen["windows"], data.calibration_windows(ids, 4, 16, 7))
    written, before = checkpoint.CheckpointReader(out), checkpoint.CheckpointReader(student_dir)
    for name in before.weight_map:
        w = written.get(name)
        assert w.dtype == torch.bfloat16 == before.get(name).dtype, name
        assert torch.equal(w, dict(s.named_parameters())[name].detach().to(torch.bfloat16)), name
    assert {k: rep[k] for k in ("mode", "teacher", "student", "data", "tokens", "lambda")} == {
        "mode": "full", "teacher": data.shown_path(teacher_dir), "student": data.shown_path(student_dir),
        "data": "stdlib", "tokens": 64, "lambda": 2.0}
    assert rep["settings"] == dataclasses.asdict(cfg) and rep["world_size"] == 1 and 0 <= rep["seconds"] < 600
    assert {k: rep["args"][k] for k in ("mode", "calib_data", "device", "teacher", "student")} == {
        "mode": "full", "calib_data": "stdlib", "device": "cpu", "teacher": data.shown_path(teacher_dir),
        "student": data.shown_path(student_dir)}
    assert json.load(open(os.path.join(out, "distill_report.json"))) == json.loads(json.dumps(rep))

    with pytest.raises(outputs.OutputError, match="exists"):
        distill.distill_checkpoint(teacher_dir, student_dir, out, cfg)
    rep2 = distill.distill_checkpoint(teacher_dir, student_dir, out, dataclasses.replace(cfg, seed=8), overwrite=True)
    assert rep2["settings"]["seed"] == 8 and json.load(open(os.path.join(out, "distill_report.json")))["settings"]["seed"] == 8
    monkeypatch.setattr(distill, "distill_full", lambda *a: train(*a, lose_a_mask=True))
    with pytest.raises(AssertionError):
        distill.distill_checkpoint(teacher_dir, student_dir, str(tmp_path / "lost"), cfg)
    assert not os.path.exists(tmp_path / "lost")


@pytest.mark.parametrize("seqlen,loss,error", [(2, "eq10", None), (128, "ce", None), (16, "mse", None),
                                               (1, "eq10", "--seqlen 1 outside [2, max_position_embeddings 128]"),
                                               (129, "eq10", "--seqlen 129 outside"),
                                               (16, "kl", "--loss 'kl': eq10, ce or mse")])
def test_distill_checkpoint_takes_every_window_length_the_model_holds_and_each_loss(tmp_path, pair, monkeypatch,
                                                                                   seqlen, loss, error):
    teacher_dir, student_dir = pair
    monkeypatch.setattr(distill, "distill_full", lambda teacher, student, *a: (student, {}))
    monkeypatch.setattr(data, "text_source", lambda spec, split: TEXT)  # the corpus's encoding takes too long here
    cfg = distill.DistillConfig(nsamples=2, seqlen=seqlen, loss=loss)
    if error:
        with pytest.raises(data.DataError) as e:
            distill.distill_checkpoint(teacher_dir, student_dir, str(tmp_path / "kd"), cfg)
        assert str(e.value).startswith(error)
    else:
        assert distill.distill_checkpoint(teacher_dir, student_dir, str(tmp_path / "kd"), cfg)["tokens"] == 2 * seqlen


def test_a_recipe_of_former_names_and_repository_paths_drives_distill_main(tmp_path, monkeypatch):
    """distill.py --recipe: a report's former names (samples, data) are read as today's, and its
    teacher, student and calibration paths, relative to the repository, are found from anywhere."""
    report = tmp_path / "distill_report.json"
    report.write_text(json.dumps({"args": {"samples": 12, "data": "README.md", "epochs": 2, "mode": "per-expert",
                                           "teacher": "models/tiny-mixtral", "student": "models/tiny-mixtral"}}))
    calls = []
    monkeypatch.setattr(distill, "distill_checkpoint", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.chdir(tmp_path)  # where none of the recorded paths exists
    distill.main(["--recipe", str(report), "--epochs", "1", "--out", str(tmp_path / "kd")])
    (teacher, student, out, cfg, mode, text, device, overwrite), kw = calls[0]
    model = os.path.join(cli.REPO, "models/tiny-mixtral")
    assert (teacher, student, text, mode) == (model, model, os.path.join(cli.REPO, "README.md"), "per-expert")
    assert (cfg.nsamples, cfg.epochs, overwrite) == (12, 1, False)
    assert kw["recipe"]["overridden"] == {"epochs": 1}


@pytest.mark.parametrize("every,at", [(0, [1]), (1, [1, 4, 7]), (2, [1, 7])])
def test_with_gradient_accumulation_lambda_is_rebalanced_on_a_steps_first_micro_batch(pair, monkeypatch, every, at):
    """--rebalance-every N with --grad-accum 3: lambda is set from the first micro-batch of every
    N-th optimizer step (steps 0, 1, 2 start at micro-batches 1, 4, 7 of 9)."""
    teacher, student, masks = full_mode_models(pair)
    windows = torch.randint(0, 300, (9, 8), generator=torch.Generator().manual_seed(6))
    forwards, balanced = [], []
    student.register_forward_pre_hook(lambda m, a: forwards.append(1))
    kd_lambda = distill.kd_lambda
    monkeypatch.setattr(distill, "kd_lambda", lambda ce, l_exp: (balanced.append(len(forwards)), kd_lambda(ce, l_exp))[1])
    cfg = distill.DistillConfig(batch_size=1, grad_accum=3, epochs=1, rebalance_every=every, lr=1e-3)
    _, rep = distill.distill_full(teacher, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    assert balanced == at and rep["optimizer_steps"] == 3


def test_per_expert_mode_is_mse_alone_and_says_so(tmp_path, pair, text_file, capsys):
    """Per-expert mode trains on Eq. 10's expert term alone: its report records loss mse, and an
    explicit --loss eq10 or ce, which it would not compute, is refused in one line."""
    teacher, student = pair
    argv = ["--teacher", teacher, "--student", student, "--calib-data", text_file, "--mode", "per-expert",
            "--nsamples", "4", "--seqlen", "16", "--epochs", "1", "--device", "cpu"]
    rep = distill.main([*argv, "--out", str(tmp_path / "kd")])
    assert rep["settings"]["loss"] == rep["args"]["loss"] == "mse"
    for loss in ("eq10", "ce"):
        line = script_error(capsys, distill.main, [*argv, "--loss", loss, "--out", str(tmp_path / loss)])
        assert line.startswith("error: --mode per-expert trains each expert on Eq. 10's expert term alone")
        assert not (tmp_path / loss).exists()
    assert distill.main([*argv, "--loss", "mse", "--out", str(tmp_path / "mse")])["settings"]["loss"] == "mse"


def test_the_ce_ablation_runs_no_teacher_and_keeps_no_expert_inputs(pair):
    """--loss ce costs what it computes: the teacher is never called (None stands in) and no expert
    MSE is reported. The teacher's recorded calls keep only the tokens and outputs Eq. 10 needs."""
    _, student, masks = full_mode_models(pair)
    windows = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    cfg = distill.DistillConfig(batch_size=2, epochs=1, loss="ce")
    _, rep = distill.distill_full(None, student, masks, windows, cfg, torch.device("cpu"), lambda s: None)
    assert rep["lambda"] == 0.0 and [h["expert_mse"] for h in rep["steps"]] == [None]
    assert rep["epochs"][0]["expert_mse"] is None and rep["epochs"][0]["ce"] == rep["steps"][0]["ce"]
    teacher, _, _ = full_mode_models(pair)
    calls = distill.TeacherCalls(2)
    with torch.no_grad():
        teacher(windows, observers=calls.observers)
    kept = calls.calls[0][0]
    assert kept._fields == ("expert", "tokens", "y") and kept.y.shape == (len(kept.tokens), 64)
