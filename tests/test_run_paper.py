"""run_paper.py on a small random checkpoint: the experiment's bookkeeping, not its numbers."""

import json
import os
import tempfile

import numpy as np

import run_paper


def test_run_paper_small(tmp_path, ckpt, text_file, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # so we can see the work folder go
    out = tmp_path / "res"
    run_paper.main(["--model", ckpt, "--calib-data", text_file, "--eval-data", text_file, "--seqlen", "32",
                    "--nsamples", "8", "--sweep", "0.25,0.5", "--calib-sweep", "2,8", "--eval-windows", "3",
                    "--out", str(out)])
    res = json.load(open(out / "results.json"))
    runs = res["runs"]
    assert len([r for r in runs if r["part"] == "table"]) == 12  # 4 methods x (50%, 2:4, 4:8)
    assert len([r for r in runs if r["part"] == "sparsity"]) == 8
    assert len([r for r in runs if r["part"] == "calibration"]) == 6
    # the 50% / n=8 run is shared by the three parts, not re-run
    shared = [r for r in runs if r["method"] == "wanda" and r["sparsity"] == 0.5 and r["nm"] is None and r["nsamples"] == 8]
    assert len(shared) == 3 and len({r["ppl"] for r in shared}) == 1
    assert all(r["expert_sparsity"] == r["sparsity"] for r in runs if r["nm"] is None)
    assert np.load(out / "calib_tokens.npy").shape == (8, 32)
    assert "| moe-pruner |" in (out / "README.md").read_text()
    assert not [d for d in os.listdir(tmp_path) if d.startswith("run_paper-")]  # pruned checkpoints deleted
