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
    splits = {s: data.stdlib_paths(s) for s in data.SPLITS}
    allf = [f for s in splits.values() for f in s]
    assert len(allf) == len(set(allf)) == 1618 + 89 + 83  # CPython 3.11.7's .py files outside site-packages
    assert [len(splits[s]) for s in ("train", "calib", "eval")] == [1618, 89, 83]
    assert all(data.split_of(f) == s for s, files in splits.items() for f in files)  # the path's hash decides
    # the order of a sorted walk: a folder's files, then its subfolders
    assert splits["eval"][:5] == ["copyreg.py", "modulefinder.py", "token.py", "asyncio/protocols.py",
                                  "asyncio/subprocess.py"]
    assert all(f.endswith(".py") and "site-packages" not in f for f in allf)
    assert "distutils/util.py" in splits["eval"]  # a 3.11 file, absent from 3.12's stdlib: the snapshot, not this Python
    with pytest.raises(data.DataError, match="unknown split"):
        data.stdlib_paths("test")


def test_the_shipped_corpus_is_the_snapshot_and_refuses_a_modified_one(tmp_path, monkeypatch):
    import hashlib
    for split, digest in data.CORPUS_SHA256.items():
        with open(data.corpus_file(split), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest
    assert data.corpus_id() == "CPython 3.11.7 stdlib"
    text = data.stdlib_text("eval")
    assert len(text) == 1241196 and text == "\n\n".join(data.stdlib_texts("eval"))  # files joined by a blank line
    # a modified copy is refused with one line naming the file
    monkeypatch.setattr(data, "CORPUS_DIR", str(tmp_path))
    (tmp_path / "stdlib-eval.jsonl.xz").write_bytes(b"not the snapshot")
    with pytest.raises(data.DataError, match="not the shipped snapshot"):
        data.stdlib_text("eval")
    with pytest.raises(data.DataError, match="cannot read the shipped corpus"):
        data.stdlib_text("calib")


def test_write_corpus_rebuilds_a_split_from_a_stdlib_folder(tmp_path):
    root = tmp_path / "lib"
    for rel in ("a.py", "pkg/b.py", "pkg/c.txt", "site-packages/d.py", "x/y/z.py"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"# {rel}\r\nprint(1)\n".encode() + b"\xff")
    files = {f"f{i}.py" for i in range(40)}  # enough paths that every split gets some
    for rel in files:
        (root / rel).write_text(f"x = {rel!r}\n")
    digests = data.write_corpus(str(root), str(tmp_path / "corpus"))
    import lzma, json
    got = {}
    for split in data.SPLITS:
        packed = (tmp_path / "corpus" / f"stdlib-{split}.jsonl.xz").read_bytes()
        import hashlib
        assert hashlib.sha256(packed).hexdigest() == digests[split]
        for line in lzma.decompress(packed).decode().splitlines():
            r = json.loads(line)
            assert data.split_of(r["path"]) == split
            got[r["path"]] = r["text"]
    assert set(got) == files | {"a.py", "pkg/b.py", "x/y/z.py"}  # .py only, no site-packages
    assert got["pkg/b.py"] == "# pkg/b.py\nprint(1)\n\ufffd"  # universal newlines, undecodable bytes replaced
    with pytest.raises(data.DataError, match="no .py files"):
        data.write_corpus(str(tmp_path / "corpus"), str(tmp_path / "again"))


def test_sample_windows_spread_evenly_over_the_whole_text():
    w = torch.arange(753).reshape(753, 1)
    s, idx = data.sample_windows(w, 128)
    assert len(idx) == 128 and idx[0] == 0 and idx == sorted(set(idx)) and s[:, 0].tolist() == idx
    gaps = {b - a for a, b in zip(idx, idx[1:])}
    assert gaps <= {5, 6} and idx[-1] >= 753 - 6  # every part of the text, not its first files
    assert data.sample_windows(w, 0)[1] == data.sample_windows(w, 753)[1] == data.sample_windows(w, 999)[1] \
        == list(range(753))
    assert data.sample_windows(w, 3)[1] == [0, 251, 502]
    assert data.eval_window_count("stdlib") == data.eval_window_count("stdlib:calib") == data.EVAL_SAMPLE == 128
    assert data.eval_window_count("wiki.test.raw") == 0 and data.eval_window_count("stdlib", 0) == 0


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
    eval_ppl.main(["--model", path, "--eval-data", text_file, "--seqlen", "64", "--json", str(out)])
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
    res = eval_ppl.main(["--model", a, b, a, "--eval-data", text_file, "--seqlen", "32", "--max-windows", "5",
                         "--router-stats", "--json", str(out)])
    table = capsys.readouterr().out
    assert table.count("\n| ") == 3 and f"| {b} |" in table  # 3 rows below the header
    assert res[0]["ppl"] == res[2]["ppl"] != res[1]["ppl"]
    written = json.load(open(out))
    assert [r["windows"] for r in written] == [5, 5, 5]
    n = written[0]["windows_in_text"]
    assert n > 5 and written[0]["window_indices"] == [i * n // 5 for i in range(5)]  # spread over the text
    assert f"5 (of {n}) x 32" in table
    # a text file's default is every window (the literature's protocol); 0 asks for all as well
    every = eval_ppl.main(["--model", a, "--eval-data", text_file, "--seqlen", "32"])[0]
    assert every["windows"] == n and eval_ppl.main(["--model", a, "--eval-data", text_file, "--seqlen", "32",
                                                    "--eval-windows", "0"])[0]["ppl"] == every["ppl"]
    cv = res[0]["router"][0]
    assert sum(cv["top1_counts"]) == 5 * 32 and cv["load_cv"] == pytest.approx(
        eval_ppl.expert_load_cv(torch.tensor(cv["top1_counts"])))


def test_wikitext_directory_and_split(tmp_path, ckpt, capsys):
    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_text(TEXT[: len(TEXT) // 2])
    (d / "wiki.valid.raw").write_text(TEXT[len(TEXT) // 2:])
    test = eval_ppl.main(["--model", ckpt, "--eval-data", str(d), "--seqlen", "32"])[0]
    valid = eval_ppl.main(["--model", ckpt, "--eval-data", str(d), "--split", "validation", "--seqlen", "32"])[0]
    assert test["ppl"] != valid["ppl"]
    assert "no wiki.test.raw" in cli_error(capsys, ["--model", ckpt, "--eval-data", str(tmp_path)])


def test_a_named_stdlib_split_is_that_split(ckpt, capsys):
    assert data.text_source("stdlib:calib", "eval") == data.stdlib_text("calib") != data.text_source("stdlib", "eval")
    assert data.text_source("stdlib", "calib") == data.stdlib_text("calib")
    assert "unknown split 'valid'" in cli_error(capsys, ["--model", ckpt, "--data", "stdlib:valid"])


def test_every_model_is_checked_before_the_first_is_evaluated(tmp_path, text_file, capsys):
    good = write_checkpoint(tmp_path / "good")
    with pytest.raises(SystemExit) as e:
        eval_ppl.main(["--model", good, str(tmp_path / "missing"), "--eval-data", text_file, "--seqlen", "32"])
    captured = capsys.readouterr()
    assert e.value.code != 0 and "no such checkpoint directory" in captured.err
    assert "windows x 32 tokens" not in captured.err and captured.out == ""  # nothing was evaluated
