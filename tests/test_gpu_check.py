"""bench/gpu_check.py on the CPU: its plan fits its budget, a step out of time ends with its whole
process group, every step's figures are saved as they come, and the dry run of the whole plan."""

import json
import subprocess
import sys

import pytest
import torch

from bench import gpu_check
from conftest import script_error


def gone(pgid: int) -> bool:
    return not gpu_check.group_alive(pgid)


@pytest.mark.parametrize("budget", [540, 120, 30])
def test_the_plan_fits_the_budget_in_the_order_of_what_it_tells(budget):
    limits = gpu_check.plan(budget)
    assert list(limits) == ["device_tests", "readme", "sparse24", "scale"]
    assert all(v >= 1 for v in limits.values())
    assert sum(limits.values()) + gpu_check.GRACE * len(limits) <= budget


def test_a_group_is_alive_while_a_process_of_it_runs():
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert gpu_check.group_alive(p.pid)
    finally:
        p.kill()
        p.wait()
    assert not gpu_check.group_alive(p.pid)


def test_a_step_out_of_time_ends_its_whole_process_group():
    """A command whose child outlives it (as bench.scale's prune.py or torchrun's workers would):
    at the limit both are stopped, and the step is recorded as a timeout with its output."""
    child = "import subprocess, time; subprocess.Popen(['sleep', '120']); print('started', flush=True); time.sleep(120)"
    r = gpu_check.step([[sys.executable, "-c", child], [sys.executable, "-c", "print('never')"]], 3, lambda m: None)
    assert r["exit"] == "timeout" and r["seconds"] < 3 + gpu_check.GRACE + 5 and "started" in r["tail"]
    assert len(r["process_groups"]) == 1 and gone(r["process_groups"][0])  # the second command never ran


def test_the_dry_run_saves_every_step_as_it_comes(tmp_path, monkeypatch):
    """The whole plan on the CPU with a 24 s budget: every step runs in its order or is stopped at
    its limit, nothing it started is left running, and the file is saved before the first step and
    after each one (a run stopped in the middle keeps what it measured)."""
    out = tmp_path / "gpu.json"
    saved, save = [], gpu_check.GrowingFile.save
    monkeypatch.setattr(gpu_check.GrowingFile, "save", lambda self, obj: (saved.append(json.dumps(obj)), save(self, obj)))
    res = gpu_check.main(["--device", "cpu", "--seconds", "24", "--out", str(out), "--skip", "tests"])
    assert [list(json.loads(s)["steps"]) for s in saved] == [[], ["readme"], ["readme", "sparse24"],
                                                             ["readme", "sparse24", "scale"]]
    assert json.load(open(out)) == res and res["plan"] == gpu_check.plan(24) and res["torch"] == torch.__version__
    for name, r in res["steps"].items():
        assert r["exit"] in (0, "timeout") and r["seconds"] <= r["limit"] + gpu_check.GRACE + 5, (name, r)
        assert all(gone(g) for g in r["process_groups"])
    if res["steps"]["sparse24"]["exit"] == 0:  # on the CPU the kernel benchmark says why it measures nothing
        assert "need a CUDA GPU" in res["steps"]["sparse24"]["tail"]


def test_it_refuses_no_gpu_an_old_torch_and_an_unknown_step_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu.json"
    assert script_error(capsys, gpu_check.main, ["--out", str(out)], alone=False).endswith(
        "argument --device: cuda: torch sees no CUDA device")  # argparse's usage line, then this one
    assert script_error(capsys, gpu_check.main, ["--out", str(out), "--device", "cpu", "--skip", "bogus"]) == (
        "error: --skip bogus: not a step (device_tests, readme, sparse24, scale)")
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu126")
    assert script_error(capsys, gpu_check.main, ["--out", str(out), "--device", "cpu"]) == (
        "error: torch 2.10.1+cu126 is older than 2.11, the oldest these checks run on")
    assert not out.exists()
