"""The documents quote the committed results, never numbers typed by hand: every table and marked
value in README.md and docs/ is what run_paper.py writes from results/, and every results folder's
README.md is what run_paper.py writes from its results.json."""

import glob
import json
import os
import re

import pytest

import data
import run_paper

FOLDERS = sorted(os.path.dirname(f) for f in glob.glob(os.path.join(data.REPO, "results", "**", "results.json"),
                                                         recursive=True))


@pytest.mark.parametrize("path", run_paper.documents(), ids=lambda p: data.shown_path(p))
def test_every_document_quotes_the_committed_results(path):
    text = open(path).read()
    assert run_paper.render_document(text) == text, f"run `python run_paper.py --docs` ({data.shown_path(path)})"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: data.shown_path(p))
def test_every_results_readme_is_written_from_its_results(folder):
    res = json.load(open(os.path.join(folder, "results.json")))
    text = open(os.path.join(folder, "README.md")).read()
    plotted = re.findall(r"^!\[[^]]*\]\(([^)]+)\)$", text, flags=re.M)
    assert all(os.path.isfile(os.path.join(folder, fn)) for fn in plotted)
    assert text == run_paper.readme(res, data.shown_path(folder), plotted), \
        f"run `python run_paper.py --replot --out {data.shown_path(folder)}`"


def test_no_result_evaluates_a_leading_slice():
    for folder in FOLDERS:
        res = json.load(open(os.path.join(folder, "results.json")))
        n, total = res["eval_windows"], res["eval_windows_in_text"]
        assert res["eval_window_indices"] == [i * total // n for i in range(n)], folder


def test_a_changed_number_or_table_is_put_back():
    folder = data.shown_path(FOLDERS[0])
    res = run_paper.read_results(FOLDERS[0], "test")
    dense = f"{res['dense_ppl']:.3f}"
    doc = (f"Dense: <!-- value {folder} dense -->1.000<!-- end -->.\n\n<!-- table {folder} table2 -->\n"
           f"| stale |\n<!-- end table -->\n")
    out = run_paper.render_document(doc)
    assert f"-->{dense}<!--" in out and "| stale |" not in out and f"| dense | {dense} |" in out
    assert run_paper.render_document(out) == out
    with pytest.raises(data.DataError, match="no value 'nonsense'"):
        run_paper.render_document(f"<!-- value {folder} nonsense -->1<!-- end -->")
    with pytest.raises(data.DataError, match="unknown table"):
        run_paper.render_document(f"<!-- table {folder} nonsense -->\n<!-- end table -->")
