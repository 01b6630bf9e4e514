"""Fault injection: bad or adverse input to every script that writes or reads a checkpoint.

Each case asserts the exit status, that stderr ends in one `error:` line with no traceback (and
holds nothing else when the problem is caught before any work), and the exact state of the file
system afterwards: the inputs' bytes unchanged, --out absent or its old content intact, no
temporary folders. Concurrency and signals use real processes.
"""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import distill
import eval_ppl
import expert_prune
import prune
import run_paper
import sparse24
from bench import forward as bench_forward, sparse24_kernels
from conftest import random_model, script_error, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIB = ["--nsamples", "2", "--seqlen", "16"]


def tree_hash(path) -> str:
    """Every file name and byte below path (a file or a folder)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        h.update(open(path, "rb").read())
        return h.hexdigest()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for fn in sorted(files):
            h.update(os.path.relpath(os.path.join(root, fn), path).encode())
            h.update(open(os.path.join(root, fn), "rb").read())
    return h.hexdigest()


def debris(folder) -> list:
    """Temporary folders or files a writer left behind."""
    return [f for f in os.listdir(folder) if ".tmp-" in f]


@pytest.fixture
def world(tmp_path, ckpt, text_file):
    """A checkpoint, a calibration text and a pruned student, with their hashes to compare after."""
    student = str(tmp_path / "student")
    prune.main(["--model", ckpt, "--method", "wanda", "--calib-data", text_file, *CALIB, "--out", student])
    w = {"tmp": tmp_path, "ckpt": ckpt, "text": text_file, "student": student}
    w["hashes"] = {k: tree_hash(w[k]) for k in ("ckpt", "text", "student")}
    return w


def unchanged(w):
    for k, h in w["hashes"].items():
        assert tree_hash(w[k]) == h, f"{k} changed"
    assert not debris(w["tmp"]), debris(w["tmp"])


def prune_argv(w, out, *more):
    return ["--model", w["ckpt"], "--method", "wanda", "--calib-data", w["text"], *CALIB, "--device", "cpu",
            "--out", str(out), *more]


def distill_argv(w, out, *more, student=None):
    return ["--teacher", w["ckpt"], "--student", student or w["student"], "--calib-data", w["text"], "--samples", "4",
            "--seqlen", "16", "--epochs", "1", "--device", "cpu", "--out", str(out), *more]


# --- one-line errors caught before any work: (script, argv, message), nothing written ----------


def cases(w):
    t = w["tmp"]
    out = t / "out"
    (t / "tokens.txt").write_text("1 2 3\n")
    np.save(t / "ok.npy", np.ones((2, 16), dtype=np.int64))
    (t / "adir").mkdir(exist_ok=True)
    return [
        ("prune --nsamples 0", prune.main, prune_argv(w, out, "--nsamples", "0"), "must be at least 1"),
        ("prune --seqlen 1", prune.main, prune_argv(w, out, "--seqlen", "1"), "must be at least 2"),
        ("prune --batch-size 0", prune.main, prune_argv(w, out, "--batch-size", "0"), "must be at least 1"),
        ("prune --calib-data DIR", prune.main, prune_argv(w, out)[:4] + ["--calib-data", str(t / "adir"), "--out", str(out)],
         "is a directory, not a text file"),
        ("prune --calib-tokens TEXT", prune.main,
         ["--model", w["ckpt"], "--method", "wanda", "--calib-tokens", str(t / "tokens.txt"), "--out", str(out)],
         "not a .npy file"),
        ("prune --out INPUT", prune.main, prune_argv(w, w["ckpt"], "--overwrite"), "is the input"),
        ("prune --out CONTAINS INPUT", prune.main,
         ["--model", w["ckpt"], "--method", "wanda", "--calib-data", w["text"], *CALIB, "--out", str(t),
          "--overwrite"], "contains the input"),
        ("eval --max-windows -1", eval_ppl.main, ["--model", w["ckpt"], "--eval-data", w["text"], "--max-windows", "-1"],
         "must be at least 0"),
        ("eval --eval-windows x", eval_ppl.main, ["--model", w["ckpt"], "--eval-data", w["text"], "--eval-windows", "x"],
         "is not an integer"),
        ("eval --batch-size 0", eval_ppl.main, ["--model", w["ckpt"], "--eval-data", w["text"], "--batch-size", "0"],
         "must be at least 1"),
        ("eval --json in a missing folder", eval_ppl.main,
         ["--model", w["ckpt"], "--eval-data", str(t / "missing.txt"), "--json", str(t / "nowhere" / "r.json")],
         "does not exist"),
        ("eval --json naming a folder", eval_ppl.main,
         ["--model", w["ckpt"], "--eval-data", str(t / "missing.txt"), "--json", str(t)], "is a directory"),
        ("distill --samples 0", distill.main, distill_argv(w, out, "--samples", "0"), "must be at least 1"),
        ("distill --epochs 0", distill.main, distill_argv(w, out, "--epochs", "0"), "must be at least 1"),
        ("distill --seqlen 0", distill.main, distill_argv(w, out, "--seqlen", "0"), "must be at least 2"),
        ("distill --lr nan", distill.main, distill_argv(w, out, "--lr", "nan"), "must be a finite number > 0"),
        ("distill --lr -1", distill.main, distill_argv(w, out, "--lr", "-1"), "must be a finite number > 0"),
        ("distill --out TEACHER", distill.main, distill_argv(w, w["ckpt"], "--overwrite"), "is the input"),
        ("expert_prune --nsamples 0", expert_prune.main,
         ["--model", w["ckpt"], "--keep-experts", "3", "--calib-data", w["text"], "--nsamples", "0", "--out", str(out)],
         "must be at least 1"),
        ("expert_prune --out INPUT", expert_prune.main,
         ["--model", w["ckpt"], "--keep-experts", "3", "--calib-data", w["text"], *CALIB, "--out", w["ckpt"], "--overwrite"],
         "is the input"),
        ("sparse24 --prune-from INPUT --out INPUT", sparse24.main,
         ["--prune-from", w["ckpt"], "--out", w["ckpt"], "--overwrite"], "is the input"),
        # flags that had no type
        ("prune --seed -1", prune.main, prune_argv(w, out, "--seed", "-1"), "must be at least 0"),
        ("prune --device bogus", prune.main, prune_argv(w, out, "--device", "bogus"), "expected cpu, cuda or cuda:N"),
        ("expert_prune --device mps", expert_prune.main,
         ["--model", w["ckpt"], "--keep-experts", "3", "--device", "mps", "--out", str(out)], "expected cpu, cuda"),
        ("distill --seed -2", distill.main, distill_argv(w, out, "--seed", "-2"), "must be at least 0"),
        ("expert_prune --keep-experts 0", expert_prune.main,
         ["--model", w["ckpt"], "--keep-experts", "0", "--out", str(out)], "must be at least 1"),
        # --calib-tokens fixes the windows
        ("prune --calib-tokens with --nsamples", prune.main,
         ["--model", w["ckpt"], "--method", "wanda", "--calib-tokens", str(t / "ok.npy"), "--nsamples", "4",
          "--out", str(out)], "--nsamples would be ignored"),
        # an input of any kind is never an output
        ("prune --out TOKENS --calib-tokens TOKENS", prune.main,
         ["--model", w["ckpt"], "--method", "wanda", "--calib-tokens", str(t / "ok.npy"), "--out", str(t / "ok.npy"),
          "--overwrite"], "is the input"),
        ("prune --out TEXT", prune.main, prune_argv(w, w["text"], "--overwrite"), "is the input"),
        ("eval --json MODEL/config.json", eval_ppl.main,
         ["--model", w["ckpt"], "--eval-data", w["text"], "--json", os.path.join(w["ckpt"], "config.json"),
          "--overwrite"], "lies inside the input"),
        ("eval --json TEXT", eval_ppl.main,
         ["--model", w["ckpt"], "--eval-data", w["text"], "--json", w["text"], "--overwrite"], "is the input"),
        ("sparse24 --json STUDENT/prune_report.json", sparse24.main,
         ["--model", w["student"], "--json", os.path.join(w["student"], "prune_report.json"), "--overwrite"],
         "lies inside the input"),
        ("sparse24 --save OUT beside --out OUT, before pruning", sparse24.main,
         ["--prune-from", w["ckpt"], "--out", str(out), "--save", str(t / "." / "out")], "is the input"),
        ("distill --out TEXT", distill.main, distill_argv(w, w["text"], "--overwrite"), "is the input"),
        ("run_paper --out INSIDE MODEL", run_paper.main,
         ["--model", w["ckpt"], "--out", os.path.join(w["ckpt"], "results"), "--parts", "table"], "lies inside the input"),
        ("run_paper --sweep 1.5", run_paper.main, ["--model", w["ckpt"], "--sweep", "0.5,1.5", "--out", str(out)],
         "--sweep: 1.5 must be a sparsity in [0, 1)"),
        ("run_paper --sweep x", run_paper.main, ["--model", w["ckpt"], "--sweep", "0.5,x", "--out", str(out)],
         "--sweep: 'x' is not a number"),
        ("run_paper --calib-sweep 0", run_paper.main, ["--model", w["ckpt"], "--calib-sweep", "2,0", "--out", str(out)],
         "--calib-sweep: 0 must be at least 1"),
        ("run_paper --calib-tokens with --seed", run_paper.main,
         ["--model", w["ckpt"], "--calib-tokens", str(t / "ok.npy"), "--seed", "1", "--out", str(out)],
         "--seed would be ignored"),
        ("bench.forward --threads -1", bench_forward.main, ["--threads", "2,-1"], "--threads: -1 must be at least 0"),
        ("bench.sparse24_kernels --tokens a", sparse24_kernels.main, ["--tokens", "1,a"], "--tokens: 'a' is not an integer"),
        ("run_paper --seqlen past the context", run_paper.main,
         ["--model", w["ckpt"], "--calib-data", w["text"], "--seqlen", "4096", "--out", str(out)],
         "exceeds the model's max_position_embeddings"),
        ("run_paper --out TEXT FOLDER", run_paper.main,
         ["--model", w["ckpt"], "--calib-data", w["text"], "--out", w["text"], "--overwrite", "--parts", "table"],
         "is the input"),
    ]


def recipe(w, name: str, args) -> str:
    path = w["tmp"] / name
    path.write_text(json.dumps({"args": args}))
    return str(path)


def test_a_recipes_values_pass_the_command_lines_checks(world, capsys):
    """A value read from a report is checked like the flag that would give it: one error line naming it."""
    w, out = world, str(world["tmp"] / "out")
    base = {"model": w["ckpt"], "method": "wanda", "calib_data": w["text"], "nsamples": 4, "seqlen": 16}
    for bad, msg in [({"sparsity": "half"}, "--sparsity 'half'"), ({"batch_size": 0}, "--batch-size 0"),
                     ({"nm": 24}, "--nm 24"), ({"method": "best"}, "choose from"), ({"dense_forward": "yes"}, "not true"),
                     ({"seed": -1}, "--seed -1"), ({"sparsity": None}, "no value"), ({"nsamples": 4.5}, "--nsamples 4.5")]:
        line = script_error(capsys, prune.main, ["--recipe", recipe(w, "r.json", {**base, **bad}), "--out", out])
        assert msg in line, (bad, line)
    line = script_error(capsys, prune.main, ["--recipe", recipe(w, "null.json", None), "--out", out])
    assert "not a report with recorded arguments" in line
    line = script_error(capsys, distill.main, ["--recipe", recipe(w, "d.json", {"student": w["student"], "lr": -1}),
                                               "--out", out])
    assert "--lr -1" in line
    assert not os.path.exists(out)
    unchanged(w)


def test_a_recipe_with_tokens_given_beside_it_uses_them(world):
    w = world
    np.save(w["tmp"] / "tok.npy", np.random.default_rng(0).integers(0, 300, size=(2, 16)))
    rec = recipe(w, "r.json", {"model": w["ckpt"], "method": "wanda", "calib_data": w["text"], "nsamples": 4})
    rep = prune.main(["--recipe", rec, "--calib-tokens", str(w["tmp"] / "tok.npy"), "--out", str(w["tmp"] / "o")])
    assert rep["calibration"]["nsamples"] == 2 and rep["args"]["calib_data"] == "stdlib"


def test_bad_arguments_are_one_line_and_write_nothing(world, capsys):
    for name, main, argv, msg in cases(world):
        line = script_error(capsys, main, argv)
        assert msg in line, (name, line)
        assert not (world["tmp"] / "out").exists(), name
        unchanged(world)


def test_an_alias_of_the_input_is_the_input(world, capsys):
    """A symlink to the model folder, or the same folder spelled with '..', is the input."""
    link = world["tmp"] / "alias"
    os.symlink(world["ckpt"], link)
    spelled = os.path.join(world["ckpt"], "..", os.path.basename(world["ckpt"]))
    for out in (str(link), spelled):
        assert "is the input" in script_error(capsys, prune.main, prune_argv(world, out, "--overwrite"))
        assert "is the input" in script_error(
            capsys, distill.main, distill_argv(world, out, "--overwrite"))
        assert "is the input" in script_error(
            capsys, expert_prune.main, ["--model", world["ckpt"], "--keep-experts", "3", "--calib-data", world["text"], *CALIB,
                                        "--out", out, "--overwrite"])
    assert os.path.islink(link)
    unchanged(world)


def test_pretrain_refuses_its_init_checkpoint_as_output(world, capsys):
    import pretrain_tiny
    link = world["tmp"] / "alias"
    os.symlink(world["ckpt"], link)
    line = script_error(capsys, pretrain_tiny.main, ["--init-from", world["ckpt"], "--out", str(link), "--overwrite"])
    assert "is the input" in line
    unchanged(world)


# --- output safety ------------------------------------------------------------------------------


def test_without_overwrite_nothing_is_ever_replaced(world, monkeypatch, capsys):
    out = world["tmp"] / "out"
    prune.main(prune_argv(world, out))
    first = tree_hash(out)
    assert "exists" in script_error(capsys, prune.main, prune_argv(world, out))
    assert tree_hash(out) == first
    # a folder created at --out while a run is writing is left alone, even an empty one
    late = world["tmp"] / "late"
    orig = prune.prune_matrices

    def user_makes_the_folder(*a, **k):
        late.mkdir(exist_ok=True)
        return orig(*a, **k)
    monkeypatch.setattr(prune, "prune_matrices", user_makes_the_folder)
    line = script_error(capsys, prune.main, prune_argv(world, late), alone=False)
    assert "appeared while this run was writing" in line
    assert late.is_dir() and os.listdir(late) == []
    unchanged(world)


def test_overwrite_replaces_a_file_and_ignores_a_stale_old_folder(world):
    out = world["tmp"] / "out"
    out.write_text("a file, not a checkpoint")
    stale = world["tmp"] / "out.old"
    stale.mkdir()
    (stale / "mine.txt").write_text("kept")
    prune.main(prune_argv(world, out, "--overwrite"))
    assert checkpoint.CheckpointReader(str(out)).config.num_hidden_layers == 2
    assert (stale / "mine.txt").read_text() == "kept"
    prune.main(prune_argv(world, out, "--overwrite", "--sparsity", "0.3"))  # a checkpoint over a checkpoint
    assert json.load(open(out / "prune_report.json"))["sparsity_target"] == 0.3
    unchanged(world)


def test_parent_folders_made_for_out_go_when_the_run_fails(world, capsys):
    """A NaN in layer 1 is found after the writer made its folders: they are removed again."""
    bad = world["tmp"] / "nan"
    shutil.copytree(world["ckpt"], bad)
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    poison(bad, name, float("nan"))
    out = world["tmp"] / "a" / "b" / "out"
    line = script_error(capsys, prune.main, prune_argv({**world, "ckpt": str(bad)}, out), alone=False)
    assert name in line and "non-finite" in line
    assert not (world["tmp"] / "a").exists()
    unchanged(world)


def poison(ckpt, name, value=float("nan"), dtype=None):
    """Set one element of tensor `name` (or cast it to dtype) in a checkpoint's shard, in place."""
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))["weight_map"]
    shard = os.path.join(ckpt, index[name])
    tensors = load_file(shard)
    t = tensors[name].clone()
    if dtype is not None:
        t = t.to(dtype)
    else:
        t.view(-1)[3] = value
    tensors[name] = t
    save_file(tensors, shard, metadata={"format": "pt"})


# --- silent wrong results: refused or flagged ------------------------------------------------


def test_non_finite_weights_are_refused_by_prune_and_flagged_by_eval(world, capsys):
    bad = world["tmp"] / "inf"
    shutil.copytree(world["ckpt"], bad)
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    poison(bad, name, float("inf"))
    out = world["tmp"] / "out"
    line = script_error(capsys, prune.main, prune_argv({**world, "ckpt": str(bad)}, out), alone=False)
    assert name in line and "non-finite" in line and not out.exists()  # found as layer 0 is read
    capsys.readouterr()
    report = world["tmp"] / "eval.json"
    with pytest.raises(SystemExit) as e:
        eval_ppl.main(["--model", str(bad), world["ckpt"], "--eval-data", world["text"], "--seqlen", "16", "--max-windows",
                       "2", "--json", str(report)])
    captured = capsys.readouterr()
    err = captured.err.strip().split("\n")
    assert e.value.code == 1 and "warning:" in err[0] and "not finite" in err[0] and name in err[0]
    assert err[-1].startswith("error: the perplexity of") and str(bad) in err[-1]
    assert "| nan |" in captured.out or "| inf |" in captured.out  # the table is printed all the same
    written = json.loads(report.read_text())  # valid JSON: no NaN or Infinity in the file
    assert written[0]["ppl"].startswith("not finite") and isinstance(written[1]["ppl"], float)
    report.unlink()
    unchanged(world)


def test_a_perplexity_past_floats_range_is_infinite_not_an_overflow():
    class Confident(torch.nn.Module):  # puts all probability on token 0, so every other target costs ~1e4
        def forward(self, x):
            logits = torch.full((*x.shape, 8), -1e4)
            logits[..., 0] = 0.0
            return logits
    ppl = eval_ppl.perplexity(Confident(), torch.ones(2, 5, dtype=torch.long))
    assert ppl == math.inf


def test_integer_tensors_are_refused_at_open_from_the_headers(world, capsys):
    bad = world["tmp"] / "int8"
    shutil.copytree(world["ckpt"], bad)
    name = "model.layers.1.self_attn.q_proj.weight"
    poison(bad, name, dtype=torch.int8)
    line = script_error(capsys, prune.main, prune_argv({**world, "ckpt": str(bad)}, world["tmp"] / "out"))
    assert name in line and "I8" in line
    unchanged(world)


def test_distilling_an_unpruned_student_is_refused_not_nan(world, capsys):
    same = world["tmp"] / "same"
    shutil.copytree(world["ckpt"], same)
    out = world["tmp"] / "out"
    line = script_error(capsys, distill.main, distill_argv(world, out, student=str(same)), alone=False)
    assert "no pruned weights" in line
    assert not out.exists()
    unchanged(world)


def test_a_non_finite_loss_stops_distillation_and_writes_nothing(world, monkeypatch, capsys):
    first_batch_done = []  # lambda is set on the first batch; every expert term after it is infinite
    orig_term, orig_lambda = distill.expert_term, distill.kd_lambda

    def lambda_once(*a):
        first_batch_done.append(1)
        return orig_lambda(*a)

    def diverging(*a):
        return orig_term(*a) * (float("inf") if first_batch_done else 1.0)
    monkeypatch.setattr(distill, "kd_lambda", lambda_once)
    monkeypatch.setattr(distill, "expert_term", diverging)
    out = world["tmp"] / "out"
    line = script_error(capsys, distill.main, distill_argv(world, out, "--batch-size", "2"), alone=False)
    assert "non-finite loss at step 1" in line and not out.exists()
    unchanged(world)


def test_kd_lambda_is_refused_when_the_expert_loss_is_zero():
    with pytest.raises(Exception, match="undefined"):
        distill.kd_lambda(torch.tensor(2.0), torch.tensor(0.0))
    with pytest.raises(Exception, match="undefined"):
        distill.kd_lambda(torch.tensor(float("nan")), torch.tensor(1.0))
    assert distill.kd_lambda(torch.tensor(3.0), torch.tensor(1.5)) == 2.0


def test_distill_checks_the_student_before_tokenising(world, capsys):
    """A misshapen or truncated student is named even when the training text does not exist."""
    for what, damage in (("shape", "shape"), ("truncated", "truncate")):
        bad = world["tmp"] / f"student-{what}"
        shutil.copytree(world["student"], bad)
        shard = sorted(f for f in os.listdir(bad) if f.endswith(".safetensors"))[0]
        if damage == "truncate":
            data = open(bad / shard, "rb").read()
            open(bad / shard, "wb").write(data[: len(data) // 2])
        else:
            tensors = load_file(bad / shard)
            k = next(iter(tensors))
            tensors[k] = torch.zeros(3, 3)
            save_file(tensors, bad / shard, metadata={"format": "pt"})
        argv = distill_argv(world, world["tmp"] / "out", student=str(bad))
        argv[argv.index("--calib-data") + 1] = str(world["tmp"] / "no-such-text.txt")
        line = script_error(capsys, distill.main, argv)
        assert str(bad) in line and ("shape" in line or "unreadable" in line), line
    unchanged(world)


def test_corrupt_tokenizer_is_one_line(world, capsys):
    bad = world["tmp"] / "tok"
    shutil.copytree(world["ckpt"], bad)
    (bad / "tokenizer.json").write_text("{ not json")
    line = script_error(capsys, prune.main, prune_argv({**world, "ckpt": str(bad)}, world["tmp"] / "out"))
    assert "tokenizer.json" in line and "not a valid tokenizer" in line
    unchanged(world)


def test_a_full_disk_is_one_line_and_leaves_nothing(world, monkeypatch, capsys):
    """safetensors reports ENOSPC as an error of its own; simulated here, for real below."""
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", full)
    out = world["tmp"] / "sub" / "out"
    line = script_error(capsys, prune.main, prune_argv(world, out), alone=False)
    assert "No space left on device" in line and not (world["tmp"] / "sub").exists()
    unchanged(world)


# --- real processes: signals, concurrency, a real full disk, permissions -----------------------


def run_script(script, argv, **kw):
    return subprocess.Popen([sys.executable, os.path.join(REPO, script), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, **kw)


def slow_prune(w, out, *more):
    """A run long enough to be caught in the act (a few seconds)."""
    return ["--model", w["ckpt"], "--method", "sparsegpt", "--calib-data", w["text"], "--nsamples", "48",
            "--seqlen", "64", "--batch-size", "1", "--device", "cpu", "--out", str(out), *more]


def wait_for_temp(folder, proc, timeout=60):
    t0 = time.time()
    while not debris(folder):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.05)


def test_sigterm_cleans_up_like_sigint(world):
    out = world["tmp"] / "out"
    p = run_script("prune.py", slow_prune(world, out))
    wait_for_temp(world["tmp"], p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert err.strip().split("\n")[-1].startswith("error: terminated") and "Traceback" not in err
    assert not out.exists()
    unchanged(world)


def test_after_sigkill_the_next_run_removes_the_dead_runs_temp_folder(world):
    out = world["tmp"] / "out"
    p = run_script("prune.py", slow_prune(world, out))
    wait_for_temp(world["tmp"], p)
    p.kill()
    p.communicate()
    left = debris(world["tmp"])
    assert left and str(p.pid) in left[0]  # SIGKILL cannot be handled: the folder stays ...
    prune.main(prune_argv(world, out))  # ... until the next run to the same --out
    assert checkpoint.CheckpointReader(str(out)).config.num_hidden_layers == 2
    unchanged(world)


def test_two_concurrent_runs_to_one_out_exactly_one_wins(world):
    out = world["tmp"] / "out"
    procs = [run_script("prune.py", prune_argv(world, out)) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in results)
    assert codes[0] == 0 and codes[1] != 0, results
    loser = next(r for r in results if r[2] != 0)
    assert loser[1].strip().split("\n")[-1].startswith("error: ") and "Traceback" not in loser[1]
    assert checkpoint.CheckpointReader(str(out)).config.num_hidden_layers == 2
    unchanged(world)


def unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (user and mount namespaces) for a small tmpfs")
def test_a_really_full_disk(world):
    """prune into a 96 kB tmpfs: safetensors fails with ENOSPC; one line, nothing left."""
    disk = world["tmp"] / "disk"
    disk.mkdir()
    cmd = (f"mount -t tmpfs -o size=96k tmpfs {disk} && {sys.executable} {REPO}/prune.py "
           + " ".join(prune_argv(world, disk / "out")) + f"; s=$?; ls -A {disk}; exit $s")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().split("\n")[-1]
    assert last.startswith("error: cannot write") and "No space left" in last and "Traceback" not in r.stderr
    assert r.stdout.strip() == ""  # the tmpfs is empty again: no temp folder, no output
    unchanged(world)


@pytest.mark.skipif(not unshare_works(), reason="needs unshare -rm (user and mount namespaces) for a read-only tmpfs")
def test_an_unwritable_folder_is_one_line(world):
    ro = world["tmp"] / "ro"
    ro.mkdir()
    cmd = (f"mount -t tmpfs -o ro tmpfs {ro} && {sys.executable} {REPO}/prune.py "
           + " ".join(prune_argv(world, ro / "sub" / "out")))
    r = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: cannot create") and "\n" not in r.stderr.strip()
    unchanged(world)


def nobody_can_run_python() -> bool:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return False
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                        f"import sys; sys.path.insert(0, {REPO!r}); import torch, checkpoint"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not nobody_can_run_python(),
                    reason="needs root, setpriv, and this Python and the repository readable by user nobody")
def test_permission_denied_as_a_non_root_user(world):
    locked = world["tmp"] / "locked"
    locked.mkdir(mode=0o555)
    os.chmod(world["tmp"], 0o777)
    as_nobody = lambda argv: subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                             sys.executable, os.path.join(REPO, "prune.py"), *argv],
                                            capture_output=True, text=True, cwd=REPO)
    # pytest's temporary folders are private (drwx------): let nobody through them for this test only
    opened = [p for p in world["tmp"].parents if not os.stat(p).st_mode & 0o001]
    modes = {p: os.stat(p).st_mode for p in opened}
    try:
        for p in opened:
            os.chmod(p, modes[p] | 0o001)
        r = as_nobody(prune_argv(world, locked / "out"))
        assert r.returncode == 1 and "no permission to write" in r.stderr and "\n" not in r.stderr.strip()
        assert os.listdir(locked) == []
        # a checkpoint nobody may read is reported as such, not as missing
        os.chmod(world["tmp"], 0o700)
        r = as_nobody(prune_argv(world, locked / "never-written"))
        assert r.returncode == 1 and "permission denied" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
        assert os.listdir(locked) == []
    finally:
        os.chmod(world["tmp"], 0o777)
        for p in opened:
            os.chmod(p, modes[p])


@pytest.mark.parametrize("change,msg", [
    (lambda c: c.update(num_key_value_heads=0), "num_key_value_heads 0 is not a positive integer"),
    (lambda c: c.update(hidden_size=64.0), "hidden_size 64.0 is not a positive integer"),
    (lambda c: c.update(rms_norm_eps=-1), "rms_norm_eps -1 is not a positive number"),
    (lambda c: c.update(tie_word_embeddings="no"), "tie_word_embeddings 'no' is not true or false"),
    ("list", "not a JSON object but a list"),
    ("weight_map", "not a safetensors index"),
])
def test_a_config_or_index_that_lies_is_one_line_in_every_reader(tmp_path, capsys, change, msg):
    """Values read from config.json and the index pass checks as flags do: one error line naming the
    value, from every script that reads the checkpoint, and nothing written."""
    ckpt = write_checkpoint(tmp_path / "ck")
    if change == "weight_map":
        path = os.path.join(ckpt, "model.safetensors.index.json")
        index = json.load(open(path))
        index["weight_map"] = list(index["weight_map"])
        json.dump(index, open(path, "w"))
    else:
        path = os.path.join(ckpt, "config.json")
        config = json.load(open(path))
        if change == "list":
            config = [config]
        else:
            change(config)
        json.dump(config, open(path, "w"))
    out = str(tmp_path / "out")
    for main, argv in [(prune.main, ["--model", ckpt, "--method", "wanda", "--out", out]),
                       (eval_ppl.main, ["--model", ckpt]),
                       (expert_prune.main, ["--model", ckpt, "--keep-experts", "3", "--out", out]),
                       (distill.main, ["--teacher", ckpt, "--student", ckpt, "--out", out])]:
        assert msg in script_error(capsys, main, argv), main.__module__
    assert not os.path.exists(out)


def test_sparse24_refuses_weights_that_overflow_the_half_dtype(tmp_path, capsys):
    """A float32 2:4 checkpoint whose weights exceed float16's range is not 'round-tripped bitwise in
    float16': one error line naming the matrix, and bfloat16 works."""
    model = random_model()
    with torch.no_grad():
        for layer in model.model.layers:
            for e in layer.block_sparse_moe.experts:
                for lin in (e.w1, e.w2, e.w3):
                    lin.weight.copy_(lin.weight.masked_fill(prune.nm_mask(lin.weight.abs().double(), 2, 4), 0))  # 2:4
        model.model.layers[0].block_sparse_moe.experts[0].w1.weight[0, 0:4] = torch.tensor([1e6, 0.0, 0.0, 1.0])
    ckpt = write_checkpoint(tmp_path / "ck", model=model)
    line = script_error(capsys, sparse24.main, ["--model", ckpt])
    assert "experts.0.w1.weight" in line and "overflow torch.float16" in line
    report = sparse24.main(["--model", ckpt, "--dtype", "bfloat16"])
    assert report["model"]["stored_dtype"] == "float32" and report["model"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("variant", [{"dynamic_skip_beta": [0.5, 0.5]},
                                     {"condensed_layers": {"1": {"experts": [0, 2], "weights": [0.6, 0.4]}}}])
def test_an_expert_level_variant_is_honoured_or_refused_by_every_script(tmp_path, capsys, variant):
    """NAEE's skipping and CD-MoE's condensed layers run other MoE blocks than Mixtral's: evaluation
    runs them (variants.load_model); every script that would run a plain Mixtral refuses them."""
    ckpt = write_checkpoint(tmp_path / "ck")
    path = os.path.join(ckpt, "config.json")
    json.dump({**json.load(open(path)), **variant}, open(path, "w"))
    out = str(tmp_path / "out")
    for main, argv in [(prune.main, ["--model", ckpt, "--method", "wanda", "--out", out]),
                       (expert_prune.main, ["--model", ckpt, "--keep-experts", "3", "--out", out]),
                       (distill.main, ["--teacher", ckpt, "--student", ckpt, "--out", out]),
                       (sparse24.main, ["--model", ckpt])]:
        assert "is an expert-level variant" in script_error(capsys, main, argv), main.__module__
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    assert eval_ppl.main(["--model", ckpt, "--eval-data", str(text), "--seqlen", "32", "--eval-windows", "2"])[0]["ppl"] > 1
    assert not os.path.exists(out)


@pytest.mark.parametrize("variant,msg", [({"dynamic_skip_beta": [0.5]}, "dynamic_skip_beta must list 2 numbers"),
                                         ({"condensed_layers": {"0": {"experts": [99], "weights": [1.0]}}},
                                          "condensed_layers['0']"),
                                         ({"condensed_layers": {"7": {"experts": [0], "weights": [1.0]}}},
                                          "condensed_layers['7']"),
                                         ({"condensed_layers": [1]}, "condensed_layers['?']")])
def test_a_variant_setting_that_does_not_fit_is_one_line(tmp_path, capsys, variant, msg):
    """The variants' settings are read (and checked) by expert_prune.py, which eval_ppl.py loads them with."""
    ckpt = write_checkpoint(tmp_path / "ck")
    path = os.path.join(ckpt, "config.json")
    json.dump({**json.load(open(path)), **variant}, open(path, "w"))
    assert msg in script_error(capsys, eval_ppl.main, ["--model", ckpt])
    assert "is an expert-level variant" in script_error(capsys, prune.main, ["--model", ckpt, "--method", "wanda",
                                                                              "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("text", ["{not json", "{}", '{"per_matrix_sparsity": {"model.layers.9.x": 0.5}}',
                                  '{"per_matrix_sparsity": {"model.layers.0.block_sparse_moe.experts.0.w1.weight": "half"}}'])
def test_a_students_report_that_lies_is_one_line(world, capsys, text):
    """distill.py reads which matrices keep their zeros from the student's prune_report.json: a corrupt
    or foreign one is an error naming the file, not a traceback, and nothing is written."""
    report = os.path.join(world["student"], "prune_report.json")
    original = open(report).read()
    try:
        open(report, "w").write(text)
        line = script_error(capsys, distill.main, distill_argv(world, world["tmp"] / "out"))
        assert "prune_report.json: not a prune report of this student" in line
        assert not (world["tmp"] / "out").exists()
    finally:
        open(report, "w").write(original)
    unchanged(world)


def test_run_papers_staging_folder_of_a_killed_run_is_removed_by_the_next(world):
    """SIGKILL cannot be handled: a killed run_paper.py leaves OUT.tmp-PID-XXXX; the next run writing
    to OUT removes it (its process no longer exists) and leaves a live run's alone."""
    t = world["tmp"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = t / f"res.tmp-{dead.pid}-abc", t / f"res.tmp-{os.getpid()}-xyz"
    stale.mkdir()
    live.mkdir()
    run_paper.main(["--model", world["ckpt"], "--calib-data", world["text"], "--eval-data", world["text"], "--seqlen", "32",
                    "--nsamples", "4", "--eval-windows", "2", "--parts", "table", "--out", str(t / "res")])
    assert not stale.exists() and live.exists() and (t / "res" / "results.json").is_file()
    live.rmdir()


def test_a_recipes_saved_windows_of_another_shape_are_refused(world, capsys):
    """A recipe whose calibration_tokens.npy is not the [nsamples, seqlen] its report records (a file
    replaced, or another run's) would run on other windows and write a report that says otherwise:
    one line, nothing written. The same file of the right shape is the recorded run."""
    first = world["tmp"] / "first"
    prune.main(prune_argv(world, first))
    report, saved = first / "prune_report.json", first / prune.CALIBRATION_FILE
    assert np.load(saved).shape == (2, 16)  # the premise: CALIB's windows
    np.save(saved, np.load(saved)[:1])  # one window of the two
    line = script_error(capsys, prune.main, ["--recipe", str(report), "--out", str(world["tmp"] / "again")])
    assert line == (f"error: {saved} holds 1 x 16 tokens, but {report} records 2 x 16: not the windows of that run; "
                    f"pass --calib-tokens or --calib-data to choose")
    saved.write_bytes(b"not an array")
    assert "not a saved array of calibration windows" in script_error(
        capsys, prune.main, ["--recipe", str(report), "--out", str(world["tmp"] / "again")])
    assert not (world["tmp"] / "again").exists()


def test_sparsegpt_on_a_hessian_that_damping_cannot_rescue_is_one_line(world, capsys):
    """1 x 8 calibration tokens give 64-input matrices a Hessian of rank 8 at most; damped by 1e-12
    of its mean diagonal, its Cholesky factorisation fails: one line naming the matrix and the way
    out, nothing written. The reference's damping factorises it."""
    out = world["tmp"] / "sg"
    argv = ["--model", world["ckpt"], "--method", "sparsegpt", "--calib-data", world["text"], "--nsamples", "1",
            "--seqlen", "8", "--device", "cpu", "--out", str(out)]
    line = script_error(capsys, prune.main, [*argv, "--percdamp", "1e-12"], alone=False)
    assert "SparseGPT's Hessian is not positive definite after damping by --percdamp 1e-12" in line
    assert "raise --percdamp (the reference's 0.01)" in line and "Traceback" not in line
    assert not out.exists()
    assert prune.main(argv)["expert_sparsity"] > 0.4  # percdamp 0.01
    unchanged(world)


def test_run_papers_out_naming_a_file_is_refused_before_any_work(world, capsys):
    out = world["tmp"] / "results.txt"
    out.write_text("mine")
    line = script_error(capsys, run_paper.main, ["--model", world["ckpt"], "--calib-data", world["text"], "--eval-data",
                                                 world["text"], "--seqlen", "32", "--nsamples", "2", "--parts", "table",
                                                 "--out", str(out)])
    assert line == f"error: --out {out} is a file, not a folder: name a folder for results.json and its README"
    assert out.read_text() == "mine" and not [f for f in os.listdir(world["tmp"]) if ".tmp-" in f]


@pytest.mark.parametrize("items, says", [
    ('{"context": "a\\n", "choices": ["x", "y"], "label": 0}\n{not json\n', "line 2: not JSON"),
    ('{"context": "a\\n", "label": 0}\n', "line 1: an item needs a context string, two or more distinct choices"),
    ('{"context": "a\\n", "choices": [], "label": 0}\n', "line 1: an item needs"),
    ('{"context": "a\\n", "choices": ["x", "y"], "label": 2}\n', "line 1: an item needs"),
    ('["context", "choices"]\n', "line 1: an item needs"),
    ("", "no items"),
])
def test_zeroshot_refuses_a_malformed_task_file_in_one_line(world, capsys, monkeypatch, items, says):
    import zeroshot
    path = world["tmp"] / "items.jsonl"
    path.write_text(items)
    monkeypatch.setattr(zeroshot, "ITEMS", str(path))
    line = script_error(capsys, zeroshot.main, ["--model", world["ckpt"], "--device", "cpu"])
    assert line.startswith("error: ") and says in line, line
