"""run_paper.py on a small random checkpoint: the experiment's bookkeeping, not its numbers."""

import json
import os
import shlex
from dataclasses import asdict

import numpy as np
import pytest
import torch

import anatomy
import distill
import eval_ppl
import report
import run_paper
from conftest import write_checkpoint


def test_run_paper_small(tmp_path, ckpt, text_file):
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
    # the sample is spread over the text; Table 2's 50% and 2:4 rows, and dense, are also on every window
    n = res["eval_windows_in_text"]
    assert res["eval_windows"] == 3 < n and res["eval_window_indices"] == [i * n // 3 for i in range(3)]
    assert all(("ppl_all" in r) == (r["nm"] in (None, "2:4")) for r in runs if r["part"] == "table")
    every = eval_ppl.main(["--model", ckpt, "--eval-data", text_file, "--seqlen", "32", "--eval-windows", "0"])[0]
    assert every["windows"] == n and res["dense_ppl_all"] == pytest.approx(every["ppl"], rel=1e-12)
    assert np.load(out / "calibration_tokens.npy").shape == (8, 32)
    assert "| moe-pruner |" in (out / "README.md").read_text()
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]  # the staging folder and its checkpoints gone
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Results\n\nWritten by `python run_paper.py --model")
    (out / "README.md").unlink()
    run_paper.main(["--replot", "--out", str(out)])  # the same tables again, from results.json alone
    assert (out / "README.md").read_text() == readme
    (out / "README.md").unlink()
    report.main(["--out", str(out)])  # report.py's spelling of it
    assert (out / "README.md").read_text() == readme
    assert report.results_folders(str(tmp_path)) == []  # a results folder lies under ROOT/results
    (tmp_path / "results").mkdir()
    (out).rename(tmp_path / "results" / "res")
    assert report.results_folders(str(tmp_path)) == [str(tmp_path / "results" / "res")]


def test_calibration_windows_from_a_file_are_the_drawn_ones_and_leave_no_copy(tmp_path, ckpt, text_file, capsys):
    """--calib-tokens runs on the windows of a file: the same runs as on the draw it holds, no copy in
    --out (one already there is removed with --overwrite, refused without), results.json naming the file
    and its SHA-256 as a drawing run names its own."""
    common = ["--model", ckpt, "--calib-data", text_file, "--eval-data", text_file, "--eval-windows", "2",
              "--parts", "sparsity", "--sweep", "0.5"]
    drawn = run_paper.main([*common, "--seqlen", "32", "--nsamples", "6", "--seed", "3", "--out", str(tmp_path / "a")])
    own = tmp_path / "a" / "calibration_tokens.npy"
    assert np.load(own).shape == (6, 32)
    assert drawn["calib_tokens"] == str(own) and drawn["calib_sha256"] == run_paper.data.file_sha256(str(own))
    out = tmp_path / "b"
    out.mkdir()
    np.save(out / "calibration_tokens.npy", np.zeros((2, 32), dtype=np.int64))  # other windows, already there
    with pytest.raises(SystemExit):
        run_paper.main([*common, "--calib-tokens", str(own), "--out", str(out)])
    assert "calibration_tokens.npy exists" in capsys.readouterr().err
    read = run_paper.main([*common, "--calib-tokens", str(own), "--out", str(out), "--overwrite"])
    assert "calibration_tokens.npy" not in os.listdir(out) and json.load(open(out / "results.json")) == read
    assert (read["calib_tokens"], read["calib_sha256"], read["nsamples"], read["seqlen"]) == \
        (str(own), drawn["calib_sha256"], 6, 32)
    assert [r["ppl"] for r in read["runs"]] == [r["ppl"] for r in drawn["runs"]]  # the same windows, the same runs
    for flag in ("--nsamples", "--seqlen", "--seed"):  # the file fixes them
        with pytest.raises(SystemExit) as e:
            run_paper.main([*common, "--calib-tokens", str(own), flag, "8", "--out", str(tmp_path / "c")])
        assert e.value.code == 2 and "--calib-tokens fixes the windows" in capsys.readouterr().err
    np.save(tmp_path / "long.npy", np.zeros((2, 4096), dtype=np.int64))
    with pytest.raises(SystemExit):
        run_paper.main([*common, "--calib-tokens", str(tmp_path / "long.npy"), "--out", str(tmp_path / "c")])
    assert "--calib-tokens: windows of 4096 exceeds the model's max_position_embeddings" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_results_hold_one_calibration_file_per_draw():
    """Every folder of results/ names its windows (results.json's calib_tokens and calib_sha256) or holds
    them, or else its command's draw, drawn again, is results/calibration_tokens.npy; and no two files
    hold the same windows."""
    copies = {}
    for folder in report.results_folders():
        own = os.path.join(folder, "calibration_tokens.npy")
        if os.path.isfile(own):
            copies.setdefault(run_paper.data.file_sha256(own), []).append(own)
    assert all(len(files) == 1 for files in copies.values()), copies
    shared = os.path.join(run_paper.data.REPO, "results", "calibration_tokens.npy")
    draws = {}
    for folder in report.results_folders():
        res = json.load(open(os.path.join(folder, "results.json")))
        if "calib_sha256" in res:
            named = os.path.join(run_paper.data.REPO, res["calib_tokens"])
            assert run_paper.data.file_sha256(named) == res["calib_sha256"], folder
        elif not os.path.isfile(os.path.join(folder, "calibration_tokens.npy")):
            a = run_paper.build_parser().parse_args(shlex.split(res["command"])[2:])  # after "python run_paper.py"
            key = (res["model"], a.calib_data, a.nsamples, res["seqlen"], a.seed)
            if key not in draws:
                tok = run_paper.data.load_tokenizer(os.path.join(run_paper.data.REPO, res["model"]))
                ids = run_paper.data.encode(tok, run_paper.data.text_source(a.calib_data, "calib"))
                draws[key] = run_paper.data.calibration_windows(ids, a.nsamples, res["seqlen"], a.seed).numpy()
            assert np.array_equal(draws[key], np.load(shared)), folder


def test_gate_anatomy_is_flat_for_top1_routing_and_not_for_top2(tmp_path):
    """With top-1 routing every gate is 1, so r_j = 1 for every column: MoE-Pruner is Wanda."""
    for k, flat in ((1, True), (2, False)):
        ck = write_checkpoint(tmp_path / f"k{k}", num_experts_per_tok=k)
        tokens = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        rows = anatomy.gate_anatomy(ck, tokens)
        assert len(rows) == 2
        for r in rows:
            if flat:
                assert r["gate_mean"] == 1.0 and r["r_spread_x"] < 1e-6 and r["r_spread_h"] < 1e-6
                assert r["topk_mass"] < 1.0
            else:
                assert 0.5 - 1e-6 <= r["gate_mean"] < 1.0 and r["r_spread_x"] > 1e-3


def test_anatomy_summary_pairs_draws():
    runs = [{"setting": s, "name": n, "draw": d, "ppl": p} for s in ("50%", "2:4", "70%")
            for n, d, p in (("magnitude", 0, 9.0), ("router-blind wanda", 0, 8.0), ("router-blind wanda", 1, 8.2),
                            ("wanda", 0, 7.0), ("wanda", 1, 7.4), ("moe-pruner", 0, 6.9), ("moe-pruner", 1, 7.5),
                            ("sparsegpt", 0, 6.0))]
    summary = report.anatomy_summary({"runs": runs})
    diff = next(r for r in summary if r["setting"] == "2:4" and r["name"] == "moe-pruner - wanda")
    assert abs(diff["mean"] - 0.0) < 1e-12 and diff["wins"] == 1 and diff["draws"] == 2
    wanda = next(r for r in summary if r["setting"] == "50%" and r["name"] == "wanda")
    assert abs(wanda["mean"] - 7.2) < 1e-12 and abs(wanda["sd"] - 0.2828427) < 1e-6


def test_compare_puts_two_runs_side_by_side(tmp_path, capsys):
    def results(model, shift, with_70):
        runs = [{"part": "table", "method": m, "sparsity": 0.5, "nm": nm, "ppl": p + shift}
                for m, p in (("magnitude", 9.0), ("wanda", 8.0), ("sparsegpt", 7.0), ("moe-pruner", 7.9))
                for nm in (None, "2:4")]
        if with_70:
            runs += [{"part": "sparsity", "method": m, "sparsity": 0.7, "nm": None, "ppl": 20.0} for m in report.METHODS]
        return {"model": model, "dense_ppl": 6.0 + shift, "runs": runs}
    for name, res in (("a", results("A", 0.0, True)), ("b", results("B", 0.5, False))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    run_paper.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    table = capsys.readouterr().out
    report.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert capsys.readouterr().out == table  # report.py's spelling of it
    assert table.startswith("Each cell: A / B.")
    assert "| method | 50% | 2:4 |\n" in table  # 70% is in one run only: left out
    assert "| wanda | 8.000 / 8.500 | 8.000 / 8.500 |" in table
    assert "| moe-pruner - wanda | -0.100 / -0.100 | -0.100 / -0.100 |" in table
    assert "The router's hint" not in table  # neither run has the anatomy
    runs = [{"setting": s, "name": n, "draw": d, "ppl": p} for s in ("50%", "2:4", "70%")
            for n, d, p in (("magnitude", 0, 9.0), ("router-blind wanda", 0, 8.0), ("router-blind wanda", 1, 8.2),
                            ("wanda", 0, 7.0), ("wanda", 1, 7.4), ("moe-pruner", 0, 6.9), ("moe-pruner", 1, 7.3),
                            ("sparsegpt", 0, 6.0))]
    gates = [{"layer": 0, "gate_std": 0.1, "topk_mass": 0.4, "r_spread_x": 0.01, "r_spread_h": 0.04}]
    masks = [{"layer": 0, "matrix": m, "mask_difference": 0.005} for m in ("w1", "w3", "w2")]
    for name in "ab":
        res = json.loads((tmp_path / name / "results.json").read_text())
        scope = [{"name": n, "scope": sc, "ppl": p} for n in ("router-blind wanda", "wanda", "moe-pruner", "sparsegpt")
                 for sc, p in (("experts", 7.0), ("+attention", 7.5), ("+attention+router", 8.0))]
        res["anatomy"] = {"runs": runs, "gates": gates, "mask_difference": masks, "draws": 2, "scope": scope}
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    run_paper.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])
    table = capsys.readouterr().out
    assert "| moe-pruner - wanda | -0.100 +- 0.000 (wins 2/2) / -0.100 +- 0.000 (wins 2/2) |" in table
    assert "| wanda | 7.000 / 7.000 | 7.500 / 7.500 |" in table  # the scope table
    assert "| wanda | 7.200 +- 0.283 / 7.200 +- 0.283 |" in table
    assert "| 0 | 0.100 / 0.100 | 0.400 / 0.400 | 0.0100 / 0.0100 | 0.0400 / 0.0400 | 0.50%, 0.50%, 0.50% / 0.50%, 0.50%, 0.50% |" in table
    with pytest.raises(SystemExit):
        run_paper.main(["--compare", str(tmp_path / "a"), str(tmp_path / "none")])
    assert "--compare: no" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [("{", "is not readable JSON"), ("[]", "not a run_paper.py results file"),
                                              ("{}", "not a run_paper.py results file (no 'model')")])
def test_a_corrupt_results_file_is_one_line(tmp_path, capsys, content, message):
    (tmp_path / "results.json").write_text(content)
    for script, flags in ((run_paper, ["--compare", str(tmp_path)]), (run_paper, ["--replot", "--out", str(tmp_path)]),
                          (report, ["--compare", str(tmp_path)]), (report, ["--out", str(tmp_path)])):
        with pytest.raises(SystemExit) as e:
            script.main(flags)
        err = capsys.readouterr().err.strip()
        assert e.value.code != 0 and err.startswith("error: ") and message in err and "\n" not in err
    assert (tmp_path / "results.json").read_text() == content and os.listdir(tmp_path) == ["results.json"]


def test_a_folder_holding_any_file_a_run_writes_is_refused_before_work(tmp_path, capsys):
    ck = write_checkpoint(tmp_path / "ck")
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("the user's own notes")
    with pytest.raises(SystemExit) as e:
        run_paper.main(["--model", ck, "--out", str(out), "--parts", "table"])
    err = capsys.readouterr().err.strip()
    assert e.value.code != 0 and "README.md exists" in err and "\n" not in err
    assert os.listdir(out) == ["README.md"] and (out / "README.md").read_text() == "the user's own notes"


def test_a_failed_run_leaves_the_out_folder_as_it_was(tmp_path, ckpt, text_file, monkeypatch):
    """Everything is made in OUT.tmp-PID-XXXX and copied into --out only at the end: a run that fails
    halfway leaves no --out, no calibration file and no staging folder."""
    def fail(s):
        raise run_paper.data.DataError("halfway")
    monkeypatch.setattr(run_paper, "table_2", fail)
    out = tmp_path / "res"
    with pytest.raises(SystemExit):
        run_paper.main(["--model", ckpt, "--calib-data", text_file, "--eval-data", text_file, "--seqlen", "32",
                        "--nsamples", "4", "--eval-windows", "2", "--parts", "table", "--out", str(out)])
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "text.txt"]


def test_the_distillation_table_and_facts_read_what_distill_records():
    """The distill part's rows carry distill.py's report settings (DistillConfig's fields): the
    table and the documents' numbers are made from exactly those."""
    settings = asdict(distill.DistillConfig())
    row = lambda loss, ppl: {"method": "moe-pruner", "sparsity": "50%", "mode": "full", "loss": loss, "dense_ppl": 8.0,
                             "pruned_ppl": 9.0, "distilled_ppl": ppl, "gap_recovered": (9.0 - ppl) / 1.0,
                             "seconds": 600.0, "lambda": 6.5 if loss == "eq10" else None, "settings": settings}
    res = {"distill": [row("eq10", 8.4), row("ce", 8.7)]}
    table = report.distill_table(res)
    assert table.startswith(f"Distillation: {settings['nsamples']} windows x {settings['seqlen']} tokens, ")
    assert "| moe-pruner | 50% | full | eq10 | 8.000 | 9.000 | 8.400 | 60.0% | 600 |" in table
    facts = report.facts({"total_minutes": 1, "dense_ppl": 8.0, "eval_windows": 128, **res})
    assert facts["kd:moe-pruner:50%:full:eq10"] == "8.400" and facts["kd-gap:moe-pruner:50%:full:ce"] == "30.0%"
    assert facts["kd-lambda:moe-pruner:50%:full:eq10"] == "6.50" and facts["kd-gap-range"] == "60%-60%"


def test_a_marker_reads_any_json_file_by_path_and_format():
    """<!-- value FILE PATH|FORMAT -->: a model's report.json or a benchmark's file, dotted into
    objects and lists, a list formatted item by item, *F scaling a number first."""
    obj = {"tokens": {"train": 8412990}, "router": [{"cv": 0.41234, "counts": [3, 14]}], "ppl": 16.0667}
    assert report.path_value(obj, "tokens.train|*1e-6:.1f") == "8.4"
    assert report.path_value(obj, "router.0.cv|.2f") == "0.41"
    assert report.path_value(obj, "router.0.counts|d") == "3, 14"
    assert report.path_value(obj, "ppl|.2f") == "16.07"
    with pytest.raises(run_paper.data.DataError, match="no 'router.1.cv' in the file"):
        report.path_value(obj, "router.1.cv|.2f")


def test_a_help_marker_holds_the_scripts_help_whatever_the_terminal(tmp_path, monkeypatch):
    (tmp_path / "doc.md").write_text("<!-- help eval_ppl.py -->\nstale\n<!-- end help -->\n")
    monkeypatch.setenv("COLUMNS", "40")
    text = report.render_document((tmp_path / "doc.md").read_text(), root=str(tmp_path))
    assert "stale" not in text and text.startswith("<!-- help eval_ppl.py -->\n```text\nusage: eval_ppl.py [-h]")
    assert "  --eval-windows, --max-windows EVAL_WINDOWS\n" in text  # 100 columns, not the terminal's 40
    assert os.environ["COLUMNS"] == "40"
