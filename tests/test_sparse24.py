"""sparse24.py on CPU: 2:4 validity, the compressed layout's exact round trip, storage, errors."""

import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint
import sparse24
from conftest import script_error, write_checkpoint
import prune


def random_24(rows, cols, dtype, seed, kept=2):
    """A random matrix keeping `kept` (<= 2) of every 4 consecutive inputs per row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    groups = torch.rand(rows, cols // 4, 4, generator=g)
    keep = groups.topk(kept, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True).reshape(rows, cols)
    return (w * mask).to(dtype)


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([32, 64, 96]), st.sampled_from([64, 128, 192]), st.sampled_from([torch.float16, torch.bfloat16]),
       st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 2]))
def test_compressed_round_trip_is_bitwise(rows, cols, dtype, seed, kept):
    w = random_24(rows, cols, dtype, seed, kept)
    sparse24.check_24("w", w)
    values, meta = sparse24.compress(w)
    assert values.shape == (rows, cols // 2) and values.dtype == dtype
    assert meta.shape == (rows, cols // 16) and meta.dtype == torch.int16
    assert torch.equal(sparse24.decompress(values, meta), w)
    # storage: half the values in 16 bits + 4 bits of metadata per group of 4 = 9/16 of dense
    assert (sparse24.nbytes(values) + sparse24.nbytes(meta)) / sparse24.nbytes(w) == 9 / 16


def test_checker_names_the_first_offending_group():
    w = random_24(32, 64, torch.float16, 0)
    w[5, 9] = w[5, 10] = w[5, 11] = 1.0  # a row of group 2 (inputs 8..11) keeps 3 or 4
    with pytest.raises(sparse24.SparsityError, match=r"^m: row 5, inputs 8..11 keep [34] of 4 \(not 2:4\)$"):
        sparse24.check_24("m", w)
    with pytest.raises(sparse24.SparsityError, match="not a multiple of 4"):
        sparse24.check_24("m", torch.zeros(4, 6))


@pytest.mark.parametrize("shape,dtype,why", [
    ((32, 48), torch.float16, "needs rows % 32 == 0 and cols % 64 == 0"),  # passes torch's check, then IndexError
    ((32, 16), torch.bfloat16, "needs rows % 32 == 0 and cols % 64 == 0"),
    ((8, 4096), torch.float16, "shape [8, 4096]"),  # Mixtral's router
    ((64, 128), torch.float32, "fp32 does not round-trip"),
])
def test_unsupported_shapes_and_dtypes_are_clear_errors(shape, dtype, why):
    w = torch.zeros(shape, dtype=dtype)
    assert why in sparse24.convertible(w)
    with pytest.raises(sparse24.SparsityError, match="cannot compress"):
        sparse24.compress(w)


def test_cuda_paths_fail_clearly_without_cuda(tmp_path, ckpt, capsys):
    with pytest.raises(sparse24.SparsityError, match="need a CUDA GPU"):
        sparse24.gpu_backend("auto")
    from bench import sparse24_kernels
    assert sparse24_kernels.main([]) == 0  # the benchmark says so in one line and exits 0
    assert script_error(capsys, sparse24.main, ["--model", ckpt, "--run"]) == (
        "error: semi-structured sparse kernels need a CUDA GPU (compute capability 8.0 or newer); none is available")


@pytest.mark.parametrize("capability, cusparselt, requested, chosen", [
    ((8, 0), True, "auto", "cusparselt"), ((8, 0), False, "auto", "cutlass"), ((8, 6), True, "cutlass", "cutlass"),
    ((8, 9), False, "cutlass", "cutlass"), ((8, 9), True, "cusparselt", "cusparselt"),
    ((9, 0), True, "auto", "cusparselt"), ((10, 0), True, "auto", "cusparselt"), ((12, 0), True, "auto", "cusparselt"),
    ((9, 0), True, "cutlass", "error: --backend cutlass: torch's CUTLASS semi-structured kernels run on compute "
                              "capability 8.x only and this GPU is 9.0"),
    ((10, 0), True, "cutlass", "error: --backend cutlass: torch's CUTLASS semi-structured kernels run on compute "
                               "capability 8.x only and this GPU is 10.0"),
    ((9, 0), False, "auto", "error: no 2:4 backend: torch's CUTLASS semi-structured kernels run on compute "
                            "capability 8.x only and this GPU is 9.0; this torch build has no cuSPARSELt"),
    ((12, 0), False, "cusparselt", "error: cuSPARSELt is not available in this torch build; use --backend auto or "
                                   "cutlass"),
    ((7, 5), True, "auto", "error: semi-structured sparse kernels need compute capability 8.0 or newer; this GPU is "
                           "7.5"),
])
def test_the_backend_follows_the_gpu(monkeypatch, tmp_path, ckpt, capsys, capability, cusparselt, requested, chosen):
    """gpu_backend, with torch's CUDA queries replaced: the backend --run, load_compressed and the
    kernel benchmark use, or the one line that says why none runs (before any work)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    if not chosen.startswith("error: "):
        assert sparse24.gpu_backend(requested) == chosen
        return
    with pytest.raises(sparse24.SparsityError):
        sparse24.gpu_backend(requested)
    json_out = tmp_path / "report.json"
    assert script_error(capsys, sparse24.main, ["--model", ckpt, "--run", "--backend", requested,
                                                "--json", str(json_out)]) == chosen
    assert not json_out.exists()
    with pytest.raises(sparse24.SparsityError, match="^" + chosen[len("error: "):].replace(".", r"\.") + "$"):
        sparse24.load_compressed(ckpt, "cuda", requested)  # refused before the checkpoint is read


@pytest.mark.parametrize("stored", [torch.float32, torch.float16, torch.bfloat16])
def test_a_compressed_checkpoint_runs_its_forward_whatever_its_stored_dtype(tmp_path, text_file, stored):
    """load_compressed computes in the compressed matrices' dtype throughout (a float32-stored
    checkpoint compresses to float16, its other tensors follow): the forward runs and its logits
    are the dense 2:4 model's in that dtype, bitwise (the same matrices, the same kernels)."""
    ck = write_checkpoint(tmp_path / "ck", intermediate_size=128, dtype=stored)
    pruned, packed = str(tmp_path / "w24"), str(tmp_path / "packed")
    prune.main(["--model", ck, "--method", "wanda", "--nm", "2:4", "--out", pruned, "--calib-data", text_file,
                "--nsamples", "2", "--seqlen", "16", "--device", "cpu"])
    rep = sparse24.save_compressed(pruned, packed)
    compute = torch.bfloat16 if stored == torch.bfloat16 else torch.float16
    assert rep["model"]["dtype"] == str(compute).replace("torch.", "") and rep["model"]["converted_matrices"] == 24
    model = sparse24.load_compressed(packed)
    assert {p.dtype for p in model.parameters()} == {compute}
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, dense = model(tokens), checkpoint.load_model(pruned, compute)(tokens)
    assert logits.dtype == compute and torch.isfinite(logits).all() and torch.equal(logits, dense)


def test_cli_on_a_pruned_checkpoint(tmp_path, text_file, capsys):
    ck = write_checkpoint(tmp_path / "ck", intermediate_size=128)  # w2 [64, 128]: every expert matrix converts
    out = tmp_path / "w24"
    rep = sparse24.main(["--prune-from", ck, "--method", "wanda", "--out", str(out)])
    m = rep["model"]
    assert m["converted_matrices"] == 2 * 4 * 3 and not m["kept_dense"]
    assert all(v["ratio"] == 9 / 16 for v in rep["matrices"].values())
    expert_bytes = sum(v["dense_bytes"] for v in rep["matrices"].values())
    assert m["dense_bytes"] - m["semi_structured_bytes"] == expert_bytes * 7 / 16
    prune.main(["--model", ck, "--method", "magnitude", "--out", str(tmp_path / "u"), "--calib-data", text_file,
                "--nsamples", "2", "--seqlen", "16"])
    line = script_error(capsys, sparse24.main, ["--model", str(tmp_path / "u")])  # unstructured: refused, naming the matrix
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight: row 0" in line


def test_compressed_checkpoint_is_smaller_and_loads_back_bitwise(tmp_path, text_file, capsys):
    ck = write_checkpoint(tmp_path / "ck", intermediate_size=128, dtype=torch.float16)
    pruned = str(tmp_path / "w24")
    prune.main(["--model", ck, "--method", "wanda", "--nm", "2:4", "--out", pruned, "--calib-data", text_file,
                "--nsamples", "2", "--seqlen", "16"])
    packed = str(tmp_path / "packed")
    rep = sparse24.main(["--model", pruned, "--save", packed])
    assert rep["model"]["converted_matrices"] == 24
    on_disk = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    dense_expert_bytes = sum(v["dense_bytes"] for v in rep["matrices"].values())
    saved = on_disk(pruned) - on_disk(packed)  # what compression saved on disk
    assert saved >= 0.40 * dense_expert_bytes  # the expert matrices take <= 60% of their dense bytes
    reader_cfg = json.load(open(os.path.join(packed, "config.json")))["sparse_format"]
    assert reader_cfg["format"] == "2:4-cutlass" and len(reader_cfg["compressed"]) == 24
    a, b = checkpoint.load_model(pruned), sparse24.load_compressed(packed)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(checkpoint.CheckpointError, match="stores its 2:4 matrices compressed"):
        checkpoint.load_model(packed)
    line = script_error(capsys, sparse24.main, ["--model", pruned, "--save", packed])  # never replaced silently
    assert "exists" in line


def test_compressed_bfloat16_tied_checkpoint_round_trips_with_its_report_and_files(tmp_path, text_file):
    """save_compressed as a function: a bfloat16 checkpoint with tied embeddings comes back bitwise
    (the tied head shares the embedding), config.json names the layout, its dtype and every
    compressed matrix, the report and the input's other files are written beside it, and the
    output is checked like every output (never the input, replaced only with overwrite)."""
    ck = write_checkpoint(tmp_path / "ck", intermediate_size=128, dtype=torch.bfloat16, tie_word_embeddings=True)
    pruned = str(tmp_path / "w24")
    prune.main(["--model", ck, "--method", "wanda", "--nm", "2:4", "--out", pruned, "--calib-data", text_file,
                "--nsamples", "2", "--seqlen", "16"])
    packed = str(tmp_path / "packed")
    rep = sparse24.save_compressed(pruned, packed)
    fmt = json.load(open(os.path.join(packed, "config.json")))["sparse_format"]
    assert fmt == {"format": "2:4-cutlass", "dtype": "bfloat16",
                   "compressed": sorted(k for k in rep["matrices"] if ".experts." in k)}
    assert json.load(open(os.path.join(packed, "sparse24_report.json"))) == rep
    assert os.path.isfile(os.path.join(packed, "tokenizer.json"))
    a, b = checkpoint.load_model(pruned), sparse24.load_compressed(packed)
    assert b.lm_head.weight is b.model.embed_tokens.weight
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(Exception, match="exists"):
        sparse24.save_compressed(pruned, packed)
    open(os.path.join(packed, "stale.txt"), "w").close()
    assert sparse24.save_compressed(pruned, packed, overwrite=True) == rep  # replaced when asked, as a whole
    assert not os.path.exists(os.path.join(packed, "stale.txt"))
    with pytest.raises(Exception, match="input"):
        sparse24.save_compressed(pruned, pruned, overwrite=True)
    half = sparse24.save_compressed(pruned, str(tmp_path / "f16"), dtype=torch.float16)  # stored in the dtype asked for
    assert json.load(open(tmp_path / "f16" / "config.json"))["sparse_format"]["dtype"] == half["model"]["dtype"] == "float16"
    assert checkpoint.load_model(pruned) is not None


def test_a_checkpoint_not_compressed_or_in_another_layout_is_named(tmp_path, ckpt):
    with pytest.raises(sparse24.SparsityError) as e:
        sparse24.load_compressed(ckpt)
    assert str(e.value) == f"{ckpt} has no sparse_format in config.json: not a compressed checkpoint"
    config = checkpoint.read_config(ckpt)
    config.extra["sparse_format"] = {"format": "2:4-cusparselt", "compressed": []}
    with pytest.raises(sparse24.SparsityError) as e:
        sparse24.compressed_layout(config)
    assert str(e.value) == "sparse_format '2:4-cusparselt' is not '2:4-cutlass'"


def test_the_storage_report_and_summary_name_every_matrix_and_every_byte(tmp_path, text_file, capsys):
    """sparse24.py's report on a 2:4 checkpoint whose w2 and k/v cannot be converted (shapes): each
    expert and, with --include-attention, attention matrix is listed, converted at 9/16 of its
    dense bytes or kept dense with the reason; the totals, the --json file and the printed
    summary agree with them; --save and --json are replaced only with --overwrite."""
    ck = write_checkpoint(tmp_path / "ck")  # float32; w2 is [64, 96]
    pruned = str(tmp_path / "p24")
    prune.main(["--model", ck, "--method", "wanda", "--nm", "2:4", "--prune-attention", "--out", pruned,
                "--calib-data", text_file, "--nsamples", "2", "--seqlen", "16"])
    capsys.readouterr()
    js, packed = str(tmp_path / "r.json"), str(tmp_path / "packed")
    argv = ["--model", pruned, "--include-attention", "--dtype", "bfloat16", "--json", js, "--save", packed]
    rep = sparse24.main(argv)
    out = capsys.readouterr().out.splitlines()
    reader = checkpoint.CheckpointReader(pruned)
    size = lambda n: reader.get(n).numel() * 2  # bytes in bfloat16
    assert set(rep["matrices"]) == {n for n in reader.weight_map if ".experts." in n or ".self_attn." in n}
    kept = {}
    for n, m in rep["matrices"].items():
        why = sparse24.convertible(reader.get(n, torch.bfloat16))  # w2 and k/v: shapes the kernels refuse
        if why:
            kept[n] = why
            assert m == {"dense_bytes": size(n), "kept_dense": why, "ratio": 1.0}
        else:
            assert m == {"dense_bytes": size(n), "values_bytes": size(n) // 2, "meta_bytes": size(n) // 16, "ratio": 9 / 16}
    assert any(".w2." in n for n in kept) and any(".w1." in n for n in rep["matrices"] if n not in kept)
    dense = sum(size(n) for n in reader.weight_map)
    semi = dense - sum(size(n) * 7 // 16 for n in rep["matrices"] if n not in kept)
    assert rep["model"] == {"dtype": "bfloat16", "stored_dtype": "float32", "dense_bytes": dense,
                            "semi_structured_bytes": semi, "ratio": semi / dense,
                            "converted_matrices": len(rep["matrices"]) - len(kept), "kept_dense": kept}
    assert json.load(open(js)) == rep
    first = next(n for n in rep["matrices"] if n not in kept)
    assert out == [f"wrote {packed}: {len(rep['matrices']) - len(kept)} matrices stored compressed",
                   f"{pruned}: every pruned matrix is 2:4; {len(rep['matrices']) - len(kept)} matrices compressed and "
                   f"round-tripped bitwise in bfloat16 (rounded from the stored float32)",
                   f"storage: {semi / 2**20:.2f} MiB semi-structured vs {dense / 2**20:.2f} MiB dense "
                   f"({semi / dense:.2%} of dense)",
                   f"per converted matrix: values {size(first) // 2} B + metadata {size(first) // 16} B = 56.25% of "
                   f"{size(first)} B dense"] + [f"kept dense: {k}: {why}" for k, why in kept.items()]
    fmt = json.load(open(os.path.join(packed, "config.json")))["sparse_format"]
    assert fmt["compressed"] == sorted(n for n in rep["matrices"] if n not in kept)  # the kept-dense stay as they were
    a, b = checkpoint.load_model(pruned).state_dict(), sparse24.load_compressed(packed).state_dict()
    stored = checkpoint.CheckpointReader(packed, layout=sparse24.compressed_layout(checkpoint.read_config(packed)))
    for n, p in a.items():  # loaded: every tensor in bfloat16, the compressed ones bitwise; on disk the others as stored
        assert b[n].dtype == torch.bfloat16 and torch.equal(b[n], p.to(torch.bfloat16)), n
        if n not in fmt["compressed"]:
            assert torch.equal(stored.get(n), p), n
    assert "exists" in script_error(capsys, sparse24.main, argv)
    assert sparse24.main([*argv, "--overwrite"]) == rep  # both replaced when asked
    assert script_error(capsys, sparse24.main, ["--prune-from", ck]) == "error: --prune-from needs --out"


def test_prune_from_prunes_the_method_and_scope_asked_and_a_checkpoint_with_nothing_convertible_is_reported(
        tmp_path, capsys):
    ck = write_checkpoint(tmp_path / "ck", intermediate_size=128, dtype=torch.bfloat16)
    out = str(tmp_path / "w24")
    rep = sparse24.main(["--prune-from", ck, "--method", "wanda", "--include-attention", "--out", out])
    pruned = json.load(open(os.path.join(out, "prune_report.json")))
    assert pruned["args"]["method"] == "wanda" and pruned["args"]["prune_attention"] and pruned["args"]["nm"] == "2:4"
    assert any(".self_attn.q_proj" in n and "values_bytes" in m for n, m in rep["matrices"].items())
    capsys.readouterr()
    again = sparse24.main(["--model", out, "--include-attention"])  # the report alone, no --save
    assert again == rep and f"{out}: every pruned matrix is 2:4; {rep['model']['converted_matrices']} matrices " \
        f"compressed and round-tripped bitwise in bfloat16\n" in capsys.readouterr().out  # stored in bfloat16: no rounding
    none = write_checkpoint(tmp_path / "none", intermediate_size=48)  # w1, w3 [48, 64] and w2 [64, 48]: no kernel takes them
    pruned48 = str(tmp_path / "p48")
    prune.main(["--model", none, "--method", "magnitude", "--nm", "2:4", "--out", pruned48])
    rep48 = sparse24.main(["--model", pruned48])
    assert rep48["model"]["converted_matrices"] == 0 and len(rep48["model"]["kept_dense"]) == 2 * 4 * 3
    assert "per converted matrix" not in capsys.readouterr().out
