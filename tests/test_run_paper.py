"""run_paper.py on a small random checkpoint: the experiment's bookkeeping, not its numbers."""

import json
import os
import tempfile

import numpy as np
import torch

import run_paper
from conftest import write_checkpoint


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
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Results\n\nWritten by `python run_paper.py --model")
    (out / "README.md").unlink()
    run_paper.main(["--replot", "--out", str(out)])  # the same tables again, from results.json alone
    assert (out / "README.md").read_text() == readme


def test_gate_anatomy_is_flat_for_top1_routing_and_not_for_top2(tmp_path):
    """With top-1 routing every gate is 1, so r_j = 1 for every column: MoE-Pruner is Wanda."""
    for k, flat in ((1, True), (2, False)):
        ck = write_checkpoint(tmp_path / f"k{k}", num_experts_per_tok=k)
        tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        rows = run_paper.gate_anatomy(ck, tokens)
        assert len(rows) == 2
        for r in rows:
            if flat:
                assert r["gate_mean"] == 1.0 and r["r_spread_x"] < 1e-6 and r["r_spread_h"] < 1e-6
                assert r["topk_mass"] < 1.0
            else:
                assert 0.5 <= r["gate_mean"] < 1.0 and r["r_spread_x"] > 1e-3


def test_anatomy_summary_pairs_draws():
    runs = [{"setting": s, "name": n, "draw": d, "ppl": p} for s in ("50%", "2:4", "70%")
            for n, d, p in (("magnitude", 0, 9.0), ("router-blind wanda", 0, 8.0), ("router-blind wanda", 1, 8.2),
                            ("wanda", 0, 7.0), ("wanda", 1, 7.4), ("moe-pruner", 0, 6.9), ("moe-pruner", 1, 7.5),
                            ("sparsegpt", 0, 6.0))]
    summary = run_paper.anatomy_summary({"runs": runs})
    diff = next(r for r in summary if r["setting"] == "2:4" and r["name"] == "moe-pruner - wanda")
    assert abs(diff["mean"] - 0.0) < 1e-12 and diff["wins"] == 1 and diff["draws"] == 2
    wanda = next(r for r in summary if r["setting"] == "50%" and r["name"] == "wanda")
    assert abs(wanda["mean"] - 7.2) < 1e-12 and abs(wanda["sd"] - 0.2828427) < 1e-6
