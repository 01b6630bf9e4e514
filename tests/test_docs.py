"""The documents quote the committed results, never numbers typed by hand: every table and marked
value in README.md and docs/ is what report.py writes from results/, and every results folder's
README.md is what report.py writes from its results.json."""

import glob
import json
import os
import re

import pytest

import data
import report
import run_paper

FOLDERS = sorted(os.path.dirname(f) for f in glob.glob(os.path.join(data.REPO, "results", "**", "results.json"),
                                                         recursive=True))


@pytest.mark.parametrize("path", report.documents(), ids=lambda p: data.shown_path(p))
def test_every_document_quotes_the_committed_results(path):
    text = open(path).read()
    assert report.render_document(text) == text, f"run `python report.py` ({data.shown_path(path)})"


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: data.shown_path(p))
def test_every_results_readme_is_written_from_its_results(folder):
    res = json.load(open(os.path.join(folder, "results.json")))
    text = open(os.path.join(folder, "README.md")).read()
    plotted = re.findall(r"^!\[[^]]*\]\(([^)]+)\)$", text, flags=re.M)
    assert all(os.path.isfile(os.path.join(folder, fn)) for fn in plotted)
    assert text == report.readme(res, data.shown_path(folder), plotted), \
        f"run `python report.py --out {data.shown_path(folder)}`"


def test_no_result_evaluates_a_leading_slice():
    for folder in FOLDERS:
        res = json.load(open(os.path.join(folder, "results.json")))
        n, total = res["eval_windows"], res["eval_windows_in_text"]
        assert res["eval_window_indices"] == [i * total // n for i in range(n)], folder


def test_a_changed_number_or_table_is_put_back():
    folder = data.shown_path(FOLDERS[0])
    res = report.read_results(FOLDERS[0], "test")
    dense = f"{res['dense_ppl']:.3f}"
    doc = (f"Dense: <!-- value {folder} dense -->1.000<!-- end -->.\n\n<!-- table {folder} table2 -->\n"
           f"| stale |\n<!-- end table -->\n")
    out = report.render_document(doc)
    assert f"-->{dense}<!--" in out and "| stale |" not in out and f"| dense | {dense} |" in out
    assert report.render_document(out) == out
    with pytest.raises(data.DataError, match="no value 'nonsense'"):
        report.render_document(f"<!-- value {folder} nonsense -->1<!-- end -->")
    with pytest.raises(data.DataError, match="unknown table"):
        report.render_document(f"<!-- table {folder} nonsense -->\n<!-- end table -->")


# Numbers that prose may write as they are: each a definition, a setting, the paper's or another
# publication's figure, a version, or arithmetic on the model's shapes, never a measured result.
ALLOWED = {
    "3.84", "4.68", "4.97", "4.99", "5.88", "6.98", "+22%", "99%",  # MoE-Pruner's Table 2 and its KD claim
    "59.57", "57.51", "1.2", "1.08x", "0.91x", "1.5-1.7x", "~1.1-1.3x",  # NAEE's and others' published figures
    "0.01", "0.02", "0.04", "0.08", "0.5", "0.6", "1.0", "0.25", "0.9", "0.95", "2e-5", "1e4", "1e-4", "1e-5",
    "1e-13",  # settings, thresholds and tolerances as the text defines them
    "1%", "2%", "5%", "90%", "10%", "10x", "5x", "25%", "30%", "50%", "70%", "80%", "15%", "20%", "35%",
    "60%",  # sparsities, splits, shares and thresholds the text sets
    "56.25%", "56%", "44%", "0.0015%", "6%", "28x", "25-50x", "6.6 GiB", "58.7M",  # arithmetic on shapes, formats
    "4.4e9",  # C(64, 56), the subsets NAEE would try on 64 experts
    "1 GiB",  # the size of the copy that measures memory bandwidth
    "3.10", "3.11.7", "3.13", "2.11", "5.23", "0.19",  # versions of Python, torch, transformers, compressed-tensors
    "26M", "24M", "14M", "2M", "~2.4M", "0.01-0.02", "70-80%", "3%",  # training budgets, ranges and test bounds set
    "80 GB", "4.7 MB", "51,214 MB",  # an H100's memory, the shipped corpus's size, NAEE's published Mixtral sizes
    "8.0", "8.6", "8.9", "9.0", "10.0", "12.0",  # GPU compute capabilities
}
NUMBER = re.compile(r"(?<![\w.])[-+~]?(?:\d+(?:\.\d+)?-)?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?(?:%|x|M\b|B\b|(?:\s(?:GB|MB|GiB|kB)))?"
                    r"(?![\w.]*\d)")


def prose_numbers(text: str) -> list:
    """The result-like numbers of a document's prose: with a fraction, a % or an x, or a size in
    M, B, GB, MB, GiB (not a plain integer: counts and settings), outside markers, tables from
    results, code, link targets, arXiv numbers and section numbers."""
    for pattern in (r"```.*?```", r"<!-- table .*?<!-- end table -->", r"<!-- value .*?-->.*?<!-- end -->",
                    r"<!-- help .*?<!-- end help -->", r"<!--.*?-->", r"`[^`]*`", r"\]\([^)]*\)",
                    r"arXiv\s+\[?\d{4}\.\d{4,5}", r"Section \d\.\d", r"Eq\. \d+(?:-\d+)?"):
        text = re.sub(pattern, " ", text, flags=re.S)
    found = []
    for m in NUMBER.finditer(text):
        tok = m.group(0).replace("\n", " ").strip().rstrip(",")
        if re.search(r"\.\d|%|x$|M$|B$|B\s*$| GB| MB| GiB| kB", tok) and tok not in ALLOWED and tok.lstrip("~") not in ALLOWED:
            found.append(tok)
    return found


@pytest.mark.parametrize("path", [p for p in report.documents() if not p.endswith("command-line.md")],
                         ids=lambda p: data.shown_path(p))
def test_no_result_number_sits_outside_a_marker(path):
    """Every number a result gives is copied in by a marker (a run changes it); prose writes only
    definitions, settings and published figures (ALLOWED)."""
    assert prose_numbers(open(path).read()) == []
