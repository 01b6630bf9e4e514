"""torchrun with 2 to 4 processes on CPU (gloo) against one process: the same pruning masks, the
same distillation losses and checkpoints, expert-parallel distillation, micro-batches with fewer
windows than ranks, experts that no token reaches, and one-line failures. Every launch names
--device cpu: on a GPU host the default would be cuda (nccl, bf16 FSDP2)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import cli
import distributed
import prune
from conftest import assert_float32_close, random_model, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's default per process; the reference uses it too


def torchrun(script, argv, tmp_path, nproc=2, timeout=300):
    """script under torchrun (nproc ranks on this machine); a hang fails the test at `timeout` s."""
    logs = tmp_path / f"logs-{len(os.listdir(tmp_path))}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "--log-dir", str(logs), "--redirects", "3", os.path.join(REPO, script), *argv]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ONE_THREAD,
                         start_new_session=True)  # torchrun and its ranks in one process group
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        p.communicate()
        pytest.fail(f"{script} under torchrun with {nproc} ranks ran past {timeout} s (a hang?)")
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
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
                "--device", "cpu", "--out", student])
    return ck, student, text_file


def params(path):
    return dict(checkpoint.load_model(path).named_parameters())


def test_prune_on_two_ranks_makes_the_single_process_masks(tmp_path, setup):
    ck, _, text = setup
    argv = ["--model", ck, "--calib-data", text, "--nsamples", "6", "--seqlen", "16", "--batch-size", "2",
            "--device", "cpu"]
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
    argv = ["--model", ck, "--calib-tokens", str(tmp_path / "tokens.npy"), "--batch-size", "2", "--device", "cpu"]
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
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu"]
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
            "--epochs", "1", "--mode", "per-expert", "--device", "cpu"]
    single("distill.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("distill.py", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr
    one, two = params(str(tmp_path / "one")), params(str(tmp_path / "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_a_bad_input_fails_every_rank_with_one_line_and_writes_nothing(tmp_path, setup):
    teacher, student, text = setup
    out = tmp_path / "never"
    r, ranks = torchrun("distill.py", ["--teacher", teacher, "--student", str(tmp_path / "missing"), "--data", text,
                                       "--device", "cpu", "--out", str(out)], tmp_path)
    assert r.returncode != 0 and len(ranks) == 2
    for err in ranks:
        lines = err.strip().split("\n")
        assert len(lines) == 1 and lines[0].startswith("error: ") and "no such checkpoint directory" in lines[0]
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    r, ranks = torchrun("distill.py", ["--teacher", teacher, "--student", student, "--calib-data", text, "--batch-size", "3",
                                       "--device", "cpu", "--out", str(out)], tmp_path)  # full KD splits each batch over the ranks
    assert r.returncode != 0 and [err.strip() for err in ranks] == ["error: --batch-size 3 must be a multiple of the 2 "
                                                                    "processes"] * 2 and not out.exists()


def test_full_kd_with_fewer_windows_than_ranks_in_a_micro_batch_matches_one_process(tmp_path, setup):
    """4 ranks, micro-batches of 4 from 6 windows: the epoch's last micro-batch has 2 windows, so
    ranks 2 and 3 hold none. They join every collective on a stand-in window of weight 0, and the
    global means are weighted by windows: the losses, lambda and weights are one process's."""
    teacher, student, text = setup
    argv = ["--teacher", teacher, "--student", student, "--data", text, "--nsamples", "6", "--seqlen", "16",
            "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu"]
    single("distill.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("distill.py", [*argv, "--out", str(tmp_path / "four")], tmp_path, nproc=4, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.load(open(tmp_path / d / "distill_report.json")) for d in ("one", "four"))
    assert b["world_size"] == 4 and len(a["steps"]) == len(b["steps"]) == 2
    for x, y in zip(a["steps"], b["steps"]):  # float32 sums over ranks in another order: a few ulps
        assert y["ce"] == pytest.approx(x["ce"], rel=1e-5) and y["expert_mse"] == pytest.approx(x["expert_mse"], rel=1e-5)
    assert b["lambda"] == pytest.approx(a["lambda"], rel=1e-5)
    one, four, pruned = params(str(tmp_path / "one")), params(str(tmp_path / "four")), params(student)
    for k in one:
        assert_float32_close(four[k], one[k], terms=300, what=k)  # the widest sum: 300 logits
        if ".experts." in k:
            assert torch.equal(four[k] == 0, pruned[k] == 0)  # the zero pattern, bitwise


def test_per_expert_kd_on_three_ranks_over_eight_experts_with_an_idle_expert(tmp_path, text_file):
    """Expert parallel with 8 experts over 3 ranks (3, 3 and 2 experts each) and layer 0's expert 7
    reached by no token: every rank issues the same collectives in the same order (no hang: the
    test has a timeout), the idle expert is left as it was, and every weight is one process's."""
    model = random_model(num_local_experts=8)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token's first coordinate positive ...
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()  # ... as the router sees it (the normed embedding)
        layer.block_sparse_moe.gate.weight[7] = 0.0
        layer.block_sparse_moe.gate.weight[7, 0] = -100.0  # expert 7's logit is every token's lowest
    teacher = write_checkpoint(tmp_path / "ck", model=model)
    student = str(tmp_path / "student")
    prune.main(["--model", teacher, "--method", "wanda", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "16",
                "--device", "cpu", "--out", student])
    argv = ["--teacher", teacher, "--student", student, "--data", text_file, "--nsamples", "8", "--seqlen", "16",
            "--epochs", "1", "--mode", "per-expert", "--device", "cpu"]
    single("distill.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("distill.py", [*argv, "--out", str(tmp_path / "three")], tmp_path, nproc=3, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.load(open(tmp_path / "three" / "distill_report.json"))
    assert rep["world_size"] == 3 and [h["expert"] for h in rep["layers"][0]["experts"]] == list(range(7))  # the premise
    one, three, before = params(str(tmp_path / "one")), params(str(tmp_path / "three")), params(student)
    assert all(torch.equal(one[k], three[k]) for k in one)
    assert torch.equal(three["model.layers.0.block_sparse_moe.experts.7.w1.weight"],
                       before["model.layers.0.block_sparse_moe.experts.7.w1.weight"])


def test_a_local_rank_beyond_the_visible_gpus_is_one_line(monkeypatch, capsys):
    """torchrun --nproc_per_node 2 on a node where torch sees one GPU: rank 1 is refused, naming
    the count, before it joins a process group (torch's own set_device would raise an opaque error)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))
    with pytest.raises(cli.UserError, match=r"^LOCAL_RANK 1, but torch sees 1 CUDA device\(s\) on this node: start at "
                                            r"most 1 processes per node \(torchrun --nproc_per_node\) or use --device cpu$"):
        distributed.init("cuda")
    assert not distributed.active()


def test_the_fsdp2_mesh_follows_the_device_asked_for(tmp_path, monkeypatch):
    """shard_model builds FSDP2's mesh on --device's type (cpu here), not on the accelerator torch
    finds: one process group of one rank, the mesh's device type recorded."""
    meshes = []
    real = distributed.init_device_mesh
    monkeypatch.setattr(distributed, "init_device_mesh", lambda kind, shape: meshes.append((kind, shape)) or real(kind, shape))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = distributed.shard_model(random_model(), torch.device("cpu"))
        assert meshes == [("cpu", (1,))]
        assert all(distributed.sharded(p) and p.device_mesh.device_type == "cpu" for p in model.parameters())
    finally:
        torch.distributed.destroy_process_group()
