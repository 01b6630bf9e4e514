"""prune.py: the metric equivalences a reader checks against the paper, SparseGPT against a
naive OBS reference, and the end-to-end checkpoint contract."""

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import checkpoint
import mini_mixtral as mm
import prune
from conftest import random_model, script_error, write_checkpoint

FAST = settings(max_examples=25, deadline=None)


def stats_of(method, x, gate=None, batches=1):
    s = prune.InputStats(method)
    for xb, gb in zip(x.chunk(batches), gate.chunk(batches) if gate is not None else [None] * batches):
        s.add(xb, gb)
    return s


def mask_of(w, method, stats, sparsity=0.5, nm=None):
    pruned, _ = prune.prune_matrix(w, method, stats, sparsity, nm)
    return pruned == 0


shapes = st.tuples(st.integers(1, 12), st.sampled_from([8, 16, 24, 40]), st.integers(1, 30))  # rows, cols, tokens


@FAST
@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.05, 0.95))
def test_moe_pruner_with_unit_gates_is_wanda(shape, seed, sparsity):
    rows, cols, n = shape
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(rows, cols, generator=g), torch.randn(n, cols, generator=g)
    assert torch.equal(mask_of(w, "moe-pruner", stats_of("moe-pruner", x, torch.ones(n)), sparsity),
                       mask_of(w, "wanda", stats_of("wanda", x), sparsity))


@FAST
@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_scaling_an_experts_gates_leaves_its_mask_unchanged(shape, seed, c):
    rows, cols, n = shape
    g = torch.Generator().manual_seed(seed)
    w, x, gate = torch.randn(rows, cols, generator=g), torch.randn(n, cols, generator=g), torch.rand(n, generator=g)
    ref = mask_of(w, "moe-pruner", stats_of("moe-pruner", x, gate))
    assert torch.equal(ref, mask_of(w, "moe-pruner", stats_of("moe-pruner", x, gate * c)))
    assert torch.equal(mask_of(w, "moe-pruner", stats_of("moe-pruner", x, gate), nm=(2, 4)),
                       mask_of(w, "moe-pruner", stats_of("moe-pruner", x, gate * c), nm=(2, 4)))


def test_gates_change_the_mask():
    """The router hint matters: with unequal gates the MoE-Pruner mask differs from Wanda's."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 32, generator=g), torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g) * 4
    gate = torch.rand(64, generator=g) ** 3
    assert not torch.equal(mask_of(w, "moe-pruner", stats_of("moe-pruner", x, gate)),
                           mask_of(w, "wanda", stats_of("wanda", x)))


def test_unrouted_tokens_do_not_change_an_experts_scores():
    """Through the real MoE block: tokens appended to a batch that are not routed to expert e
    leave e's statistics bitwise equal, and gate 0 is the same as leaving a token out."""
    m = random_model()
    layer = m.model.layers[0]
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, logits = layer.block_sparse_moe(x)
    _, experts = mm.route(logits, 2)
    e = 0
    others = (experts != e).all(dim=1)  # tokens not routed to expert 0
    base, extra = x[:, :20], x[:, 20:][:, others[20:]]
    assert extra.shape[1] > 0

    def expert_stats(inp):
        st_ = {k: prune.InputStats("moe-pruner") for k in "xh"}

        def obs(call):
            if call.expert == e:
                st_["x"].add(call.x, call.gate)
                st_["h"].add(call.h, call.gate)
        with torch.no_grad():
            layer.block_sparse_moe(inp, observer=obs)
        return st_

    a, b = expert_stats(base), expert_stats(torch.cat([base, extra], dim=1))
    assert torch.equal(a["x"].value, b["x"].value) and torch.equal(a["h"].value, b["h"].value)
    # the dense-gate reading of Eq. 9 (Gate = 0 for unrouted tokens) gives the same norms
    xs = torch.randn(10, 8)
    gate = torch.tensor([0.7, 0, 0.3, 0, 0, 0.5, 0.6, 0, 0.9, 0.2])
    routed = gate > 0
    assert torch.allclose(prune.sq_norm(xs, gate), prune.sq_norm(xs[routed], gate[routed]), rtol=1e-14, atol=0)


@FAST
@given(shapes, st.integers(0, 2**31 - 1), st.sampled_from([0.25, 1.0, 4.0, 16.0]))
def test_wanda_with_equal_norms_is_per_row_magnitude(shape, seed, c):
    rows, cols, n = shape
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    s = prune.InputStats("wanda")
    s.value, s.tokens = torch.full((cols,), c, dtype=torch.float64), n
    assert torch.equal(mask_of(w, "wanda", s), mask_of(w, "magnitude", None))


@FAST
@given(st.integers(1, 10), st.integers(1, 20), st.floats(0.0, 0.99), st.integers(0, 2**31 - 1),
       st.sampled_from(["magnitude", "wanda", "moe-pruner"]))
def test_exact_per_row_sparsity_and_kept_weights_unchanged(rows, cols, sparsity, seed, method):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    x = torch.randn(7, cols, generator=g)
    pruned, _ = prune.prune_matrix(w, method, stats_of(method, x, torch.rand(7, generator=g)), sparsity)
    assert ((pruned == 0).sum(dim=1) == int(cols * sparsity)).all()
    kept = pruned != 0
    assert torch.equal(pruned[kept], w[kept])  # bitwise


@FAST
@given(st.integers(1, 12), st.integers(1, 24), st.floats(0.0, 0.99), st.integers(0, 2**31 - 1))
def test_unstructured_mask_is_a_stable_sort_even_with_ties(rows, cols, sparsity, seed):
    score = torch.randint(0, 4, (rows, cols), generator=torch.Generator().manual_seed(seed)).double()  # many ties
    k = int(cols * sparsity)
    ref = torch.zeros_like(score, dtype=torch.bool)
    ref.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    assert torch.equal(prune.unstructured_mask(score, sparsity), ref)


@FAST
@given(st.integers(1, 10), st.sampled_from([(2, 4), (4, 8), (1, 4)]), st.integers(1, 6), st.integers(0, 2**31 - 1),
       st.sampled_from(["magnitude", "wanda", "moe-pruner", "sparsegpt"]))
def test_nm_keeps_exactly_n_of_every_m(rows, nm, groups, seed, method):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(rows, groups * m, generator=g), torch.randn(50, groups * m, generator=g)
    pruned, _ = prune.prune_matrix(w, method, stats_of(method, x, torch.rand(50, generator=g)), 0.5, nm)
    kept = (pruned != 0).reshape(rows, groups, m).sum(dim=2)
    assert (kept == n).all()


def test_accumulating_over_batches_equals_all_at_once():
    g = torch.Generator().manual_seed(0)
    w, x, gate = torch.randn(32, 48, generator=g), torch.randn(500, 48, generator=g) * 3, torch.rand(500, generator=g)
    for method in ("wanda", "moe-pruner"):
        once, batched = stats_of(method, x, gate), stats_of(method, x, gate, batches=7)
        assert once.tokens == batched.tokens == 500
        assert torch.allclose(once.value, batched.value, rtol=1e-13, atol=0)
        assert torch.equal(mask_of(w, method, once), mask_of(w, method, batched))
    h1, h7 = stats_of("sparsegpt", x), stats_of("sparsegpt", x, batches=7)
    assert torch.allclose(h1.value, h7.value, rtol=1e-5, atol=1e-3)


# --- SparseGPT against a naive OBS reference ---------------------------------------------


def naive_obs(w, H, sparsity, percdamp=0.01):
    """Row by row, column by column, inverting the Hessian of the still-free columns each time:
    OBS with a fixed column order (what SparseGPT's Cholesky form computes), float64, one block."""
    W, H = w.double().clone(), H.double().clone()
    n = H.shape[0]
    H += percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    d2 = torch.stack([torch.linalg.inv(H[j:, j:])[0, 0] for j in range(n)])  # [H_F^-1]_00, F = {j..n-1}
    saliency = W ** 2 / d2[None, :]
    k = int(W.numel() * sparsity)
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask.view(-1)[torch.sort(saliency.flatten(), stable=True).indices[:k]] = True
    for r in range(W.shape[0]):
        for j in range(n):
            if mask[r, j]:
                Hinv = torch.linalg.inv(H[j:, j:])
                W[r, j:] -= W[r, j] / Hinv[0, 0] * Hinv[:, 0]
    return W


def test_sparsegpt_matches_naive_obs():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(24, 24, generator=g)
    x = torch.randn(200, 24, generator=g) @ mix  # correlated inputs, so the updates matter
    w = torch.randn(6, 24, generator=g)
    H = prune.hessian(x)
    ours = prune.sparsegpt_prune(w, H, 0.5)
    ref = naive_obs(w, H, 0.5)
    assert torch.equal(ours == 0, ref.abs() < 1e-12)
    assert torch.allclose(ours.double(), ref, atol=1e-4)
    # and it reconstructs the layer output better than masking alone
    err = lambda v: ((x @ v.T.float()) - (x @ w.T)).pow(2).sum()
    assert err(ours) < err(w.masked_fill(ours == 0, 0)) and err(ours) < err(prune.prune_matrix(w, "magnitude", None, 0.5)[0])


def test_sparsegpt_unstructured_count_per_block():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(300, 256, generator=g), torch.randn(8, 256, generator=g)
    out = prune.sparsegpt_prune(w, prune.hessian(x), 0.5)
    for b in range(2):  # blocks of 128 columns: exactly half of each block across all rows
        assert (out[:, b * 128:(b + 1) * 128] == 0).sum() == 8 * 128 // 2


# --- end to end ------------------------------------------------------------------------------


def run_prune(tmp_path, ckpt, text_file, name, *extra):
    out = str(tmp_path / name)
    prune.main(["--model", ckpt, "--calib-data", text_file, "--nsamples", "8", "--seqlen", "32", "--out", out,
                *extra])
    return out


def tensors(path):
    r = checkpoint.CheckpointReader(path)
    return {k: r.get(k) for k in r.weight_map}


@pytest.mark.parametrize("method", ["moe-pruner", "wanda", "magnitude"])
def test_only_experts_change_and_kept_weights_are_bitwise(tmp_path, ckpt, text_file, method):
    out = run_prune(tmp_path, ckpt, text_file, method, "--method", method, "--sparsity", "0.5")
    before, after = tensors(ckpt), tensors(out)
    assert before.keys() == after.keys()
    for k, v in before.items():
        if ".experts." in k:
            assert ((after[k] == 0).sum(dim=1) == v.shape[1] // 2).all(), k
            assert torch.equal(after[k], v.masked_fill(after[k] == 0, 0)), k
        else:
            assert torch.equal(after[k], v), k  # router, attention, norms, embeddings untouched
    report = json.load(open(os.path.join(out, "prune_report.json")))
    assert report["expert_sparsity"] == 0.5 and report["calibration"]["tokens"] == 8 * 32
    assert 0 < report["overall_sparsity"] < report["decoder_linear_sparsity"] < 0.5
    assert len(report["layers"]) == 2 and all("stats_forward_s" in l for l in report["layers"])
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_sparsity_zero_is_bitwise_identity(tmp_path, ckpt, text_file):
    out = run_prune(tmp_path, ckpt, text_file, "zero", "--method", "moe-pruner", "--sparsity", "0")
    before, after = tensors(ckpt), tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_seed_same_masks_other_seed_other_calibration(tmp_path, ckpt, text_file):
    a = tensors(run_prune(tmp_path, ckpt, text_file, "a", "--method", "moe-pruner", "--seed", "5"))
    b = tensors(run_prune(tmp_path, ckpt, text_file, "b", "--method", "moe-pruner", "--seed", "5"))
    c = tensors(run_prune(tmp_path, ckpt, text_file, "c", "--method", "moe-pruner", "--seed", "6"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_calib_tokens_file_is_used_verbatim(tmp_path, ckpt, text_file):
    toks = np.random.default_rng(0).integers(0, 300, size=(4, 16))
    np.save(tmp_path / "c.npy", toks)
    out = str(tmp_path / "o")
    prune.main(["--model", ckpt, "--calib-tokens", str(tmp_path / "c.npy"), "--method", "wanda", "--out", out])
    assert json.load(open(os.path.join(out, "prune_report.json")))["calibration"] == {"nsamples": 4, "seqlen": 16,
                                                                                    "tokens": 64}


def test_pruned_checkpoint_loads_in_transformers(tmp_path, ckpt, text_file):
    transformers = pytest.importorskip("transformers")
    out = run_prune(tmp_path, ckpt, text_file, "o", "--method", "sparsegpt", "--nm", "2:4", "--prune-attention")
    idx = torch.randint(0, 300, (1, 20))
    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(idx).logits - checkpoint.load_model(out)(idx)).abs().max() < 1e-4
    after = tensors(out)
    assert (after["model.layers.0.self_attn.o_proj.weight"] == 0).float().mean() == 0.5
    assert torch.equal(after["model.layers.0.block_sparse_moe.gate.weight"],
                       tensors(ckpt)["model.layers.0.block_sparse_moe.gate.weight"])


def test_dense_forward_changes_only_later_layers(tmp_path, ckpt, text_file):
    a = tensors(run_prune(tmp_path, ckpt, text_file, "a", "--method", "wanda"))
    b = tensors(run_prune(tmp_path, ckpt, text_file, "b", "--method", "wanda", "--dense-forward"))
    layer = lambda t, l: [k for k in t if k.startswith(f"model.layers.{l}.")]
    assert all(torch.equal(a[k], b[k]) for k in layer(a, 0))
    assert any(not torch.equal(a[k], b[k]) for k in layer(a, 1))


def test_expert_without_calibration_tokens_falls_back_to_magnitude(tmp_path):
    ck = write_checkpoint(tmp_path / "ck", num_local_experts=8)
    np.save(tmp_path / "c.npy", np.array([[5, 17]]))  # 2 tokens x top-2: at most 4 of 8 experts see any
    out = str(tmp_path / "o")
    prune.main(["--model", ck, "--calib-tokens", str(tmp_path / "c.npy"), "--method", "moe-pruner", "--out", out])
    report = json.load(open(os.path.join(out, "prune_report.json")))
    e = report["routed_tokens_per_expert"][0].index(0)
    name = f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
    assert name in report["magnitude_fallback"]
    assert torch.equal(tensors(out)[name] == 0, mask_of(tensors(ck)[name], "magnitude", None))


# --- bad input -------------------------------------------------------------------------------


def prune_error(capsys, tmp_path, argv):
    out = tmp_path / "bad-out"
    msg = script_error(capsys, prune.main, [*argv, "--out", str(out)])
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith("bad-out")]
    return msg


def test_bad_input_is_a_one_line_error_and_writes_nothing(tmp_path, ckpt, text_file, capsys):
    base = ["--model", ckpt, "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32"]
    assert "outside [0, 1)" in prune_error(capsys, tmp_path, [*base, "--method", "wanda", "--sparsity", "1.0"])
    assert "outside [0, 1)" in prune_error(capsys, tmp_path, [*base, "--method", "wanda", "--sparsity", "-0.1"])
    assert "need 0 < N < M" in prune_error(capsys, tmp_path, [*base, "--method", "wanda", "--nm", "4:2"])
    assert "M=5 does not divide the 64 inputs" in prune_error(capsys, tmp_path, [*base, "--method", "wanda", "--nm", "2:5"])
    assert "invalid choice: 'obs'" in prune_error(capsys, tmp_path, [*base, "--method", "obs"])
    (tmp_path / "short.txt").write_text("x = 1\n")
    assert "fewer than one window" in prune_error(
        capsys, tmp_path, ["--model", ckpt, "--calib-data", str(tmp_path / "short.txt"), "--method", "wanda"])
    np.save(tmp_path / "big.npy", np.full((2, 8), 300))
    assert "must lie in [0, 300)" in prune_error(
        capsys, tmp_path, ["--model", ckpt, "--calib-tokens", str(tmp_path / "big.npy"), "--method", "wanda"])
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    json.dump({**cfg, "model_type": "llama"}, open(os.path.join(ckpt, "config.json"), "w"))
    assert "not one of 'mixtral', 'olmoe', 'qwen3_moe'" in prune_error(capsys, tmp_path, [*base, "--method", "wanda"])


def test_out_is_never_overwritten_nor_half_written(tmp_path, ckpt, text_file, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    base = ["--model", ckpt, "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32", "--method", "wanda"]
    assert "exists" in script_error(capsys, prune.main, [*base, "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) % 2 == 0:
            raise KeyboardInterrupt  # the user hits ^C in layer 1
        return orig(*a, **k)
    orig = prune.prune_matrices
    monkeypatch.setattr(prune, "prune_matrices", interrupted)
    assert "interrupted" in script_error(capsys, prune.main, [*base, "--out", str(tmp_path / "new")], alone=False)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "out", "text.txt"])
    assert "interrupted" in script_error(capsys, prune.main, [*base, "--out", str(out), "--overwrite"], alone=False)
    assert (out / "keep.txt").read_text() == "mine"  # an interrupted overwrite leaves the old folder
