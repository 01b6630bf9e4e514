"""data.py (corpus, sources, windows) and eval_ppl.py (the literature's perplexity protocol)."""

import gzip
import json
import math

import numpy as np
import pytest
import torch

import data
import eval_ppl
from conftest import TEXT, random_model, script_error, small_tokenizer, write_checkpoint


def test_stdlib_splits_are_disjoint_deterministic_and_complete():
    splits = {s: data.stdlib_files(s) for s in data.SPLITS}
    allf = [f for s in splits.values() for f in s]
    assert len(allf) == len(set(allf)) > 100
    assert data.stdlib_files("eval") == splits["eval"]
    assert 0.8 < len(splits["train"]) / len(allf) < 0.97  # ~90% by hash of the path
    assert all(f.endswith(".py") and "site-packages" not in f for f in allf)
    with pytest.raises(data.DataError, match="unknown split"):
        data.stdlib_files("test")


def test_calibration_windows_are_seeded_slices():
    ids = np.arange(1000, dtype=np.int32)
    a = data.calibration_windows(ids, 16, 32, seed=0)
    assert a.shape == (16, 32) and a.dtype == torch.int64
    assert torch.equal(a, data.calibration_windows(ids, 16, 32, seed=0))
    assert not torch.equal(a, data.calibration_windows(ids, 16, 32, seed=1))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 31, dtype=torch.int64))  # contiguous text
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.calibration_windows(ids[:32], 4, 32, seed=0)


def test_eval_windows_drop_the_tail():
    w = data.eval_windows(np.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(data.DataError, match="fewer than one window"):
        data.eval_windows(np.arange(2), 3)


def test_token_file_is_used_verbatim_and_checked(tmp_path):
    a = np.random.default_rng(0).integers(0, 300, size=(4, 16))
    np.save(tmp_path / "ok.npy", a)
    assert torch.equal(data.load_token_file(str(tmp_path / "ok.npy"), 300), torch.from_numpy(a))
    np.save(tmp_path / "big.npy", a + 300)
    with pytest.raises(data.DataError, match=r"must lie in \[0, 300\)"):
        data.load_token_file(str(tmp_path / "big.npy"), 300)
    np.save(tmp_path / "flat.npy", a.reshape(-1))
    with pytest.raises(data.DataError, match="expected an int array"):
        data.load_token_file(str(tmp_path / "flat.npy"), 300)
    np.save(tmp_path / "float.npy", a.astype(np.float32))
    with pytest.raises(data.DataError, match="integer token ids"):
        data.load_token_file(str(tmp_path / "float.npy"), 300)


def test_read_text_formats(tmp_path):
    with gzip.open(tmp_path / "c4-validation.00000-of-00008.json.gz", "wt") as f:
        f.write(json.dumps({"text": "first doc", "url": "u"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    assert data.read_text(str(tmp_path / "c4-validation.00000-of-00008.json.gz")) == "first doc\n\nsecond"
    (tmp_path / "wiki.test.raw").write_text(" \n = Title = \n \n Body text .\n")
    # HF wikitext rows: '', ' = Title = \n', '', ' Body text .\n', joined with "\n\n"
    assert data.read_text(str(tmp_path / "wiki.test.raw")) == "\n\n = Title = \n\n\n\n\n Body text .\n"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:1: not a JSON line"):
        data.read_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(data.DataError, match="no such file"):
        data.read_text(str(tmp_path / "missing.txt"))


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    """Hand-checkable: a zero lm_head gives equal logits, so every token has probability 1/V."""
    m = random_model()
    torch.nn.init.zeros_(m.lm_head.weight)
    w = torch.randint(0, 300, (3, 17))
    assert eval_ppl.perplexity(m, w, batch_size=2) == pytest.approx(300.0, rel=1e-6)


def test_perplexity_is_exp_mean_nll_over_all_windows():
    m = random_model()
    w = torch.randint(0, 300, (5, 12))
    with torch.no_grad():
        logp = torch.log_softmax(m(w).double(), -1)
    nll = -logp[:, :-1].gather(-1, w[:, 1:, None]).mean()
    assert eval_ppl.perplexity(m, w, batch_size=2) == pytest.approx(math.exp(nll.item()), rel=1e-6)


def test_eval_ppl_matches_transformers(tmp_path, text_file):
    transformers = pytest.importorskip("transformers")
    path = write_checkpoint(tmp_path / "ck", sliding_window=20)
    out = tmp_path / "r.json"
    eval_ppl.main(["--model", path, "--data", text_file, "--seqlen", "64", "--json", str(out)])
    r = json.load(open(out))
    ids = small_tokenizer(300).encode(TEXT).ids
    windows = torch.tensor(ids[: len(ids) // 64 * 64]).view(-1, 64)
    assert r["windows"] == len(windows) and r["tokens"] == windows.numel()
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [hf(w[None], labels=w[None]).loss.item() for w in windows]  # mean NLL per window
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)


def cli_error(capsys, argv):
    return script_error(capsys, eval_ppl.main, argv)


def test_eval_ppl_bad_input(tmp_path, ckpt, text_file, capsys):
    assert "no such file" in cli_error(capsys, ["--model", ckpt, "--data", str(tmp_path / "none.txt")])
    assert "max_position_embeddings 128" in cli_error(
        capsys, ["--model", ckpt, "--data", text_file, "--seqlen", "256"])
    (tmp_path / "short.txt").write_text("x = 1\n")
    assert "fewer than one window" in cli_error(capsys, ["--model", ckpt, "--data", str(tmp_path / "short.txt")])
    assert "no config.json" in cli_error(capsys, ["--model", str(tmp_path), "--data", text_file])


def test_several_models_share_windows_and_make_one_table(tmp_path, text_file, capsys):
    a = write_checkpoint(tmp_path / "a")
    b = write_checkpoint(tmp_path / "b", random_model(seed=1))
    out = tmp_path / "r.json"
    res = eval_ppl.main(["--model", a, b, a, "--data", text_file, "--seqlen", "32", "--max-windows", "5",
                         "--router-stats", "--json", str(out)])
    table = capsys.readouterr().out
    assert table.count("\n| ") == 3 and f"| {b} |" in table  # 3 rows below the header
    assert res[0]["ppl"] == res[2]["ppl"] != res[1]["ppl"]
    assert [r["windows"] for r in json.load(open(out))] == [5, 5, 5]
    cv = res[0]["router"][0]
    assert sum(cv["top1_counts"]) == 5 * 32 and cv["load_cv"] == pytest.approx(
        eval_ppl.expert_load_cv(torch.tensor(cv["top1_counts"])))


def test_wikitext_directory_and_split(tmp_path, ckpt, capsys):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_text(TEXT[: len(TEXT) // 2])
    (d / "wiki.valid.raw").write_text(TEXT[len(TEXT) // 2:])
    test = eval_ppl.main(["--model", ckpt, "--data", str(d), "--seqlen", "32"])[0]
    valid = eval_ppl.main(["--model", ckpt, "--data", str(d), "--split", "validation", "--seqlen", "32"])[0]
    assert test["ppl"] != valid["ppl"]
    assert "no wiki.test.raw" in cli_error(capsys, ["--model", ckpt, "--data", str(tmp_path)])


def test_a_named_stdlib_split_is_that_split(ckpt, capsys):
    assert data.text_source("stdlib:calib", "eval") == data.stdlib_text("calib") != data.text_source("stdlib", "eval")
    assert data.text_source("stdlib", "calib") == data.stdlib_text("calib")
    assert "unknown split 'valid'" in cli_error(capsys, ["--model", ckpt, "--data", "stdlib:valid"])
