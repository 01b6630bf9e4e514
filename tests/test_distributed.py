"""torchrun with 2 processes on CPU (gloo) against one process: the same pruning masks, the same
distillation losses and checkpoints, expert-parallel distillation, and one-line failures."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import prune
from conftest import random_model, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the reference uses it too


def torchrun(script, argv, tmp_path, nproc=2):
    logs = tmp_path / f"logs-{len(os.listdir(tmp_path))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--log-dir", str(logs), "--redirects", "3", os.path.join(REPO, script), *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ONE_THREAD, timeout=300)
    ranks = sorted(p for p in logs.rglob("stderr.log"))
    return r, [p.read_text() for p in ranks]


def single(script, argv):
    r = subprocess.run([sys.executable, os.path.join(REPO, script), *argv], capture_output=True, text=True, cwd=REPO,
                       env=ONE_THREAD, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def setup(tmp_path, text_file):
    ck = write_checkpoint(tmp_path / "ck")
    student = str(tmp_path / "student")
    prune.main(["--model", ck, "--method", "wanda", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "16",
                "--out", student])
    return ck, student, text_file


def params(path):
    return dict(checkpoint.load_model(path).named_parameters())


def test_prune_on_two_ranks_makes_the_single_process_masks(tmp_path, setup):
    ck, _, text = setup
    argv = ["--model", ck, "--calib-data", text, "--nsamples", "6", "--seqlen", "16", "--batch-size", "2"]
    for method in ("moe-pruner", "sparsegpt"):
        single("prune.py", [*argv, "--method", method, "--out", str(tmp_path / f"one-{method}")])
        r, _ = torchrun("prune.py", [*argv, "--method", method, "--out", str(tmp_path / f"two-{method}")], tmp_path)
        assert r.returncode == 0, r.stderr
        one, two = params(str(tmp_path / f"one-{method}")), params(str(tmp_path / f"two-{method}"))
        differ = sum(int(((one[k] == 0) != (two[k] == 0)).sum()) for k in one if ".experts." in k)
        assert differ == 0  # float64 sums in another order could flip an exact near-tie; none here
        if method == "moe-pruner":
            assert all(torch.equal(one[k], two[k]) for k in one)
        rep = json.load(open(tmp_path / f"two-{method}" / "prune_report.json"))
        assert rep["world_size"] == 2 and rep["routed_tokens_per_expert"] == json.load(
            open(tmp_path / f"one-{method}" / "prune_report.json"))["routed_tokens_per_expert"]


def test_a_rank_whose_windows_reach_no_token_of_an_expert_still_joins_its_sums(tmp_path):
    """Layer 0's router sends token 7, and only token 7, to expert 3, and only rank 1's windows hold
    it: rank 0 adds zeros of the statistic's shape and dtype to every cross-rank sum (or the
    collective fails), and the masks are the single process's."""
    model = random_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = -1.0  # every token's first coordinate negative ...
        model.model.embed_tokens.weight[7, 0] = 1.0  # ... but token 7's
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # the router sees the normed embedding itself
        layer.block_sparse_moe.gate.weight.zero_()
        layer.block_sparse_moe.gate.weight[:, 0] = torch.tensor([-1.0, -2.0, -3.0, 50.0])  # top-2: {2, 1} or {3, 0}
    ck = write_checkpoint(tmp_path / "ck", model=model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(8, 300, (4, 16), generator=g)  # [windows, T]: rank 0 gets windows 0-1, rank 1 2-3
    tokens[2:, ::5] = 7
    np.save(tmp_path / "tokens.npy", tokens.numpy())
    argv = ["--model", ck, "--calib-tokens", str(tmp_path / "tokens.npy"), "--batch-size", "2"]
    for method in ("moe-pruner", "sparsegpt"):
        single("prune.py", [*argv, "--method", method, "--out", str(tmp_path / f"one-{method}")])
        r, _ = torchrun("prune.py", [*argv, "--method", method, "--out", str(tmp_path / f"two-{method}")], tmp_path)
        assert r.returncode == 0, r.stderr
        one, two = params(str(tmp_path / f"one-{method}")), params(str(tmp_path / f"two-{method}"))
        assert all(torch.equal(one[k] == 0, two[k] == 0) for k in one)
        routed = json.load(open(tmp_path / f"two-{method}" / "prune_report.json"))["routed_tokens_per_expert"]
        assert routed[0][3] == int((tokens == 7).sum()) > 0  # the premise: rank 1's tokens alone
        assert routed == json.load(open(tmp_path / f"one-{method}" / "prune_report.json"))["routed_tokens_per_expert"]


def test_full_kd_on_two_ranks_matches_one_process(tmp_path, setup):
    teacher, student, text = setup
    argv = ["--teacher", teacher, "--student", student, "--data", text, "--nsamples", "8", "--seqlen", "16",
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1"]
    single("distill.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("distill.py", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = (json.load(open(tmp_path / d / "distill_report.json")) for d in ("one", "two"))
    assert b["world_size"] == 2 and len(a["steps"]) == len(b["steps"]) == 4
    for x, y in zip(a["steps"], b["steps"]):
        assert y["ce"] == pytest.approx(x["ce"], rel=1e-5) and y["expert_mse"] == pytest.approx(x["expert_mse"], rel=1e-5)
    assert b["lambda"] == pytest.approx(a["lambda"], rel=1e-5)
    one, two, pruned = params(str(tmp_path / "one")), params(str(tmp_path / "two")), params(student)
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    for k in pruned:
        if ".experts." in k:
            assert torch.equal(two[k] == 0, pruned[k] == 0)  # the zero pattern, bitwise


def test_per_expert_kd_on_two_ranks_is_expert_parallel_and_equal(tmp_path, setup):
    teacher, student, text = setup
    argv = ["--teacher", teacher, "--student", student, "--data", text, "--nsamples", "8", "--seqlen", "16",
            "--epochs", "1", "--mode", "per-expert"]
    single("distill.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("distill.py", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr
    one, two = params(str(tmp_path / "one")), params(str(tmp_path / "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_bad_input_fails_every_rank_with_one_line_and_writes_nothing(tmp_path, setup):
    teacher, student, text = setup
    out = tmp_path / "never"
    r, ranks = torchrun("distill.py", ["--teacher", teacher, "--student", str(tmp_path / "missing"), "--data", text,
                                       "--out", str(out)], tmp_path)
    assert r.returncode != 0 and len(ranks) == 2
    for err in ranks:
        lines = err.strip().split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: ") and "no such checkpoint directory" in lines[0]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    r, ranks = torchrun("distill.py", ["--teacher", teacher, "--student", student, "--calib-data", text, "--batch-size", "3",
                                       "--out", str(out)], tmp_path)  # full KD splits each batch over the ranks
    assert r.returncode != 0 and [err.strip() for err in ranks] == ["error: --batch-size 3 must be a multiple of the 2 "
                                                                    "processes"] * 2 and not out.exists()
