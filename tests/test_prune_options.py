"""prune.py's options beyond the paper's defaults: the router-blind statistics and the baselines'
scope, per-matrix errors, re-runnable runs, SparseGPT's knobs and per-layer sparsity (OWL)."""

import inspect
import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import cli
import data
import mini_mixtral as mm
import outputs
import prune
from conftest import random_model, script_error, small_config, stand_in_clock, write_checkpoint
from layerwise import Positions, rerun_moe_half, run_layer

CALIB = ["--nsamples", "4", "--seqlen", "32"]


def run(ckpt, text_file, out, *more):
    return prune.main(["--model", ckpt, "--calib-data", text_file, *CALIB, "--out", str(out), *more])


def shards(path) -> dict:
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f.endswith(".safetensors")}


def layer_stats(layer, x, args):
    pos = Positions(*mm.rope_cos_sin(layer.config, x.shape[1]), None)
    dense = prune.collect_stats(layer, x, pos, args)
    stats, routed = dense.stats, dense.routed
    return stats, routed


def test_router_blind_statistics_are_wandas_over_all_tokens():
    m = random_model()
    layer = m.model.layers[0]
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    stats, routed = layer_stats(layer, x, prune.PruneArgs(method="wanda", stats_tokens="all"))
    with torch.no_grad():
        h = layer.post_attention_layernorm(layer.attend(x, *mm.rope_cos_sin(m.config, 12))).reshape(-1, 64)
    for e, expert in enumerate(layer.block_sparse_moe.experts):
        assert stats[f"expert.{e}.x"].tokens == 24
        torch.testing.assert_close(stats[f"expert.{e}.x"].value, prune.sq_norm(h), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats[f"expert.{e}.h"].value, prune.sq_norm(expert.hidden(h)), rtol=1e-6, atol=1e-9)
    assert sum(routed) == 24 * 2  # top-2: the routed counts are still reported


def test_with_every_token_routed_to_every_expert_routed_and_all_coincide():
    m = random_model(num_experts_per_tok=4)  # top-k = n: every expert sees every token
    layer = m.model.layers[1]
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(1))
    routed, _ = layer_stats(layer, x, prune.PruneArgs(method="wanda"))
    blind, _ = layer_stats(layer, x, prune.PruneArgs(method="wanda", stats_tokens="all"))
    for k in routed:
        if k.startswith("expert."):
            assert routed[k].tokens == blind[k].tokens == 20
            torch.testing.assert_close(routed[k].value, blind[k].value, rtol=1e-10, atol=1e-12)


def test_scope_experts_attention_router(tmp_path, ckpt, text_file):
    rep = run(ckpt, text_file, tmp_path / "all", "--method", "wanda", "--prune-attention", "--prune-router")
    names = rep["per_matrix_sparsity"]
    assert "model.layers.0.block_sparse_moe.gate.weight" in names and "model.layers.1.self_attn.o_proj.weight" in names
    assert all(v == 0.5 for v in names.values())
    assert not [n for n in rep["magnitude_fallback"] if ".experts." not in n]  # attention and router see every token
    rep = run(ckpt, text_file, tmp_path / "experts", "--method", "wanda")
    assert all(".experts." in k for k in rep["per_matrix_sparsity"])
    name = "model.layers.1.block_sparse_moe.gate.weight"
    src, full, experts = (checkpoint.CheckpointReader(str(d)).get(name) for d in (ckpt, tmp_path / "all", tmp_path / "experts"))
    assert torch.equal(experts, src) and (full == 0).float().mean() == 0.5  # the router pruned only when asked


def test_matrix_group_prunes_one_threshold_per_matrix():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    row, _ = prune.prune_matrix(w, "magnitude", None, 0.5, group="row")
    matrix, _ = prune.prune_matrix(w, "magnitude", None, 0.5, group="matrix")
    assert torch.equal(row == 0, torch.tensor([[True, False], [True, False]]))
    assert torch.equal(matrix == 0, torch.tensor([[True, True], [False, False]]))


def test_per_matrix_error_is_zero_at_sparsity_zero_and_matches_a_direct_computation(tmp_path, ckpt, text_file):
    rep = run(ckpt, text_file, tmp_path / "zero", "--method", "wanda", "--sparsity", "0")
    assert rep["mean_matrix_error"] == 0.0 and all(v["output_error"] == 0.0 for v in rep["layers"])
    rep = run(ckpt, text_file, tmp_path / "half", "--method", "wanda", "--dense-forward", "--error-stride", "1")
    dense, pruned = checkpoint.load_model(ckpt), checkpoint.load_model(str(tmp_path / "half"))
    tokens = torch.from_numpy(np.load(tmp_path / "half" / prune.CALIBRATION_FILE)).long()
    # layer 0, expert 1's w1 on the inputs it sees: the routed tokens of the pruned layer 0 (same router
    # and attention as the dense layer, so the same tokens and inputs)
    cos, sin = mm.rope_cos_sin(dense.config, tokens.shape[1])
    seen = []
    layer = pruned.model.layers[0]
    with torch.no_grad():
        x = dense.model.embed_tokens(tokens)
        layer(x, cos, sin, observer=lambda c: seen.append(c.x) if c.expert == 1 else None)
    X = torch.cat(seen)
    name = "block_sparse_moe.experts.1.w1.weight"
    W = dense.model.layers[0].get_parameter(name)
    Wp = layer.get_parameter(name)
    direct = ((X @ W.T - X @ Wp.T).norm() / (X @ W.T).norm()).item()
    assert rep["per_matrix_error"]["model.layers.0." + name] == pytest.approx(direct, rel=1e-4)
    # the layer output error: the dense and the pruned layer 0 on the same inputs
    with torch.no_grad():
        y, yp = dense.model.layers[0](x, cos, sin)[0], layer(x, cos, sin)[0]
    assert rep["layers"][0]["output_error"] == pytest.approx(((yp - y).norm() / y.norm()).item(), rel=1e-4)


def test_per_matrix_errors_on_every_16th_row_agree_with_the_exact_ones(tmp_path, ckpt, text_file):
    """The default measures each matrix's error on every 16th input row (about 6% of the forwards'
    cost instead of twice the experts' products); the checkpoint and the layer output errors are
    the exact run's, the per-matrix errors agree with the exact ones within 10% each and 3% on average
    (here 4096 calibration tokens: about 128 sampled rows a matrix; the deviation shrinks as 1 / sqrt(rows))."""
    exact = run(ckpt, text_file, tmp_path / "exact", "--method", "moe-pruner", "--error-stride", "1", "--nsamples", "32",
                "--seqlen", "128")
    sampled = run(ckpt, text_file, tmp_path / "sampled", "--method", "moe-pruner", "--nsamples", "32", "--seqlen", "128")
    assert sampled["args"]["error_stride"] == 16
    assert [l["output_error"] for l in sampled["layers"]] == [l["output_error"] for l in exact["layers"]]
    assert shards(tmp_path / "exact") == shards(tmp_path / "sampled")
    e, s = exact["per_matrix_error"], sampled["per_matrix_error"]
    dev = [abs(s[k] - e[k]) / e[k] for k in e]
    assert max(dev) < 0.10 and sum(dev) / len(dev) < 0.03 and max(dev) > 0  # sampled, and close
    rows = torch.arange(40)[:, None].expand(40, 3)
    assert prune.sample_rows(rows, 16)[:, 0].tolist() == [8, 24] and prune.sample_rows(rows[:5], 16).shape[0] == 5


def test_sparsegpt_reports_its_solver_error_and_its_knobs_change_the_result(tmp_path, ckpt, text_file, capsys):
    base = run(ckpt, text_file, tmp_path / "base", "--method", "sparsegpt")
    assert set(base["per_matrix_solver_error"]) == set(base["per_matrix_sparsity"])
    assert all(0 < v < 1 for v in base["per_matrix_solver_error"].values())
    assert base["args"]["percdamp"] == 0.01 and base["args"]["blocksize"] == 128
    damped = run(ckpt, text_file, tmp_path / "damped", "--method", "sparsegpt", "--percdamp", "0.5")
    small = run(ckpt, text_file, tmp_path / "small", "--method", "sparsegpt", "--blocksize", "16")
    assert damped["args"]["percdamp"] == 0.5 and small["args"]["blocksize"] == 16
    assert shards(tmp_path / "base") != shards(tmp_path / "damped")
    assert shards(tmp_path / "base") != shards(tmp_path / "small")
    for bad, msg in ((["--percdamp", "0"], "finite number > 0"), (["--percdamp", "nan"], "finite number > 0"),
                     (["--blocksize", "0"], "at least 1"), (["--blocksize", "6", "--nm", "2:4"], "dividing the block")):
        line = script_error(capsys, prune.main, ["--model", ckpt, "--calib-data", text_file, *CALIB, "--method",
                                                 "sparsegpt", *bad, "--out", str(tmp_path / "bad")])
        assert msg in line


def test_a_recipe_repeats_a_run_bit_for_bit_and_records_overrides(tmp_path, ckpt, text_file):
    first = run(ckpt, text_file, tmp_path / "first", "--method", "moe-pruner", "--sparsity", "0.6", "--seed", "3")
    recipe = str(tmp_path / "first" / "prune_report.json")
    again = prune.main(["--recipe", recipe, "--out", str(tmp_path / "again")])
    assert shards(tmp_path / "first") == shards(tmp_path / "again")
    assert again["recipe"]["overridden"] == {} and again["sparsity_target"] == first["sparsity_target"]
    other = prune.main(["--recipe", recipe, "--sparsity", "0.3", "--out", str(tmp_path / "other")])
    assert other["recipe"]["overridden"] == {"sparsity": 0.3} and other["sparsity_target"] == 0.3
    assert other["args"]["method"] == "moe-pruner"


def test_layer_sparsity_list_and_owl(tmp_path, ckpt, text_file, capsys):
    rep = run(ckpt, text_file, tmp_path / "list", "--method", "wanda", "--layer-sparsity", "0.3,0.7")
    # floor(s * inputs) per row: w1/w3 have 64 inputs, w2 96
    expect = [(2 * 96 * int(s * 64) + 64 * int(s * 96)) / (3 * 96 * 64) for s in (0.3, 0.7)]
    assert [v["expert_sparsity"] for v in rep["layers"]] == pytest.approx(expect, abs=1e-12)
    rep = run(ckpt, text_file, tmp_path / "owl", "--method", "wanda", "--layer-sparsity", "owl", "--owl-lambda", "0.1",
              "--owl-m", "3")
    s, d = rep["layer_sparsity"], rep["owl_outlier_ratios"]
    assert sum(s) / len(s) == pytest.approx(0.5, abs=1e-12)
    assert (s[0] < s[1]) == (d[0] > d[1])  # more outliers, less pruned
    assert max(abs(v - 0.5) for v in s) == pytest.approx(0.1)
    for bad, msg in ((["--layer-sparsity", "0.5"], "need 2 values"), (["--layer-sparsity", "x,y"], "comma list"),
                     (["--layer-sparsity", "owl", "--owl-lambda", "0.6"], "--owl-lambda"),
                     # 0.5 + 2 x 0.26 >= 1: a layer could be asked for 100%, refused before any work
                     (["--layer-sparsity", "owl", "--owl-lambda", "0.26"], "+- 2 x lambda")):
        assert msg in script_error(capsys, prune.main, ["--model", ckpt, "--calib-data", text_file, *CALIB, "--method",
                                                        "wanda", *bad, "--out", str(tmp_path / "bad")])


def test_owl_sparsities_arithmetic():
    s = prune.owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.6, 0.08)
    assert sum(s) / 4 == pytest.approx(0.6, abs=1e-12)
    assert sorted(range(4), key=lambda i: s[i]) == [3, 1, 2, 0]  # the outlier ratios' order, reversed
    assert max(s) - min(s) == pytest.approx(0.16)
    assert prune.owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    # one outlying layer of four moves by 2 lam (L - 1) / L = 0.12, beyond +- lam, within +- 2 lam
    one = prune.owl_sparsities([0.09, 0.01, 0.01, 0.01], 0.7, 0.08)
    assert one[0] == pytest.approx(0.58) and max(abs(v - 0.7) for v in one) > 0.08
    assert prune.outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 10.0])], 2.0) == 0.25  # mean 3.25: only 10 > 6.5


def test_bfloat16_compute_path_runs_and_agrees_with_float32_when_well_conditioned(tmp_path, ckpt, text_file):
    """bf16 changes the activations' rounding, not the statistics' precision (float64) nor the
    weights (float32): on a small model the masks agree with float32 almost everywhere."""
    run(ckpt, text_file, tmp_path / "f32", "--method", "wanda")
    rep = run(ckpt, text_file, tmp_path / "bf16", "--method", "wanda", "--dtype", "bfloat16")
    assert rep["args"]["dtype"] == "bfloat16"
    a, b = checkpoint.load_model(str(tmp_path / "f32")), checkpoint.load_model(str(tmp_path / "bf16"))
    agree = [((p == 0) == (q == 0)).float().mean().item() for (n, p), q in zip(a.named_parameters(), b.parameters())
             if ".experts." in n]
    assert min(agree) > 0.97 and sum(agree) / len(agree) > 0.99
    stats, _ = layer_stats(a.model.layers[0], torch.randn(1, 8, 64), prune.PruneArgs(method="wanda", dtype="bfloat16"))
    assert all(s.value.dtype == torch.float64 for s in stats.values() if s.value is not None)
    json.dumps(rep)  # the report is plain JSON


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_second_pass_from_the_kept_halves_is_the_whole_layer_bitwise(dtype):
    """When only experts change, the second pass runs the MoE half alone on the first pass's
    attention-half outputs and router logits: bitwise the whole layer's output, in either compute dtype."""
    layer = random_model().model.layers[0]
    cfg = layer.config
    x = torch.randn(6, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    pos = Positions(*mm.rope_cos_sin(cfg, 16), None)
    halves = []
    first = run_layer(layer, x, pos, 4, dtype=dtype, halves=halves)
    assert torch.equal(first, run_layer(layer, x, pos, 4, dtype=dtype)) and len(halves) == 2
    with torch.no_grad():
        for e in layer.block_sparse_moe.experts:
            e.w2.weight.mul_(torch.rand_like(e.w2.weight) > 0.5)  # prune the experts only
    again = rerun_moe_half(layer, halves, x.dtype, dtype=dtype)
    assert torch.equal(again, run_layer(layer, x, pos, 4, dtype=dtype)) and not torch.equal(again, first)


def test_moe_pruner_gates_every_expert_matrix_input_w2_included():
    """Eq. 9 for all three matrices: w1/w3's statistic is ||x * Gate||^2 over the routed tokens and
    w2's is ||h * Gate||^2, h = silu(w1 x) * (w3 x), with the same gates (not w2's inputs ungated)."""
    m = random_model()
    layer = m.model.layers[0]
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    calls = []
    pos = Positions(*mm.rope_cos_sin(m.config, 12), None)
    run_layer(layer, x, pos, 2, observer=calls.append)
    stats, _ = layer_stats(layer, x, prune.PruneArgs(method="moe-pruner"))
    for e in range(len(layer.block_sparse_moe.experts)):
        mine = [c for c in calls if c.expert == e]
        xs, hs = torch.cat([c.x for c in mine]).double(), torch.cat([c.h for c in mine]).double()
        g = torch.cat([c.gate for c in mine]).double()[:, None]
        assert 0 < g.min() and g.max() < 1  # top-2: a gate is a share, so gating changes the norms
        torch.testing.assert_close(stats[f"expert.{e}.x"].value, ((xs * g) ** 2).sum(0), rtol=1e-12, atol=0)
        torch.testing.assert_close(stats[f"expert.{e}.h"].value, ((hs * g) ** 2).sum(0), rtol=1e-12, atol=0)


def test_layer_one_is_pruned_on_the_pruned_layer_zeros_outputs(tmp_path, ckpt, text_file):
    """The default protocol (Wanda's and SparseGPT's reference code): layer 1's statistics come from
    the pruned layer 0's outputs, so its mask is the one those inputs give; --dense-forward gives
    another (Algorithm 1 read literally: the dense layer 0's outputs)."""
    run(ckpt, text_file, tmp_path / "p", "--method", "wanda")
    run(ckpt, text_file, tmp_path / "d", "--method", "wanda", "--dense-forward")
    dense, pruned = checkpoint.load_model(ckpt), checkpoint.load_model(str(tmp_path / "p"))
    tokens = torch.from_numpy(np.load(tmp_path / "p" / prune.CALIBRATION_FILE)).long()
    pos = Positions(*mm.rope_cos_sin(dense.config, tokens.shape[1]), None)
    with torch.no_grad():
        x1 = run_layer(pruned.model.layers[0], dense.model.embed_tokens(tokens), pos, 8)
    layer1 = dense.model.layers[1]
    stats = prune.collect_stats(layer1, x1, pos, prune.PruneArgs(method="wanda")).stats
    prune.prune_matrices(layer1, stats, prune.PruneArgs(method="wanda"), 0.5, None)
    other = checkpoint.load_model(str(tmp_path / "d"))
    name = "block_sparse_moe.experts.0.w1.weight"
    expected = layer1.get_parameter(name) == 0
    assert torch.equal(pruned.model.layers[1].get_parameter(name) == 0, expected)
    assert not torch.equal(other.model.layers[1].get_parameter(name) == 0, expected)


def test_the_error_measurement_helpers_by_hand():
    """sample_rows keeps every row of a call too short for one sample (up to stride // 2 rows),
    norm_ratio is sqrt(err2 / ref2) and 0 for a zero reference, and dense_copy keeps a weight that
    bfloat16 holds exactly in bfloat16 (half the memory) and any other as a float32 copy."""
    rows = torch.arange(40)[:, None].expand(40, 3)
    assert prune.sample_rows(rows[:8], 16).shape[0] == 8 and prune.sample_rows(rows[:9], 16)[:, 0].tolist() == [8]
    assert prune.norm_ratio(0.25, 0.5) == math.sqrt(0.5) and prune.norm_ratio(0.3, 0.0) == 0.0
    exact = torch.randn(4, 8).to(torch.bfloat16).float()
    half = prune.dense_copy(exact)
    assert half.dtype == torch.bfloat16 and torch.equal(half.float(), exact)
    other = exact + 1e-4
    copy = prune.dense_copy(other)
    assert copy.dtype == torch.float32 and torch.equal(copy, other) and copy.data_ptr() != other.data_ptr()


def test_the_second_pass_starts_from_the_kept_halves_only_when_attention_and_router_stay_dense_in_float32():
    """The shortcut of the second pass (next_forward from the first pass's attention halves) holds
    only while the attention half is the dense one and the kept activations are exact."""
    assert prune.only_experts_change(prune.PruneArgs())
    for changed in ({"prune_attention": True}, {"prune_router": True}, {"act_dtype": "bfloat16"}):
        assert not prune.only_experts_change(prune.PruneArgs(**changed)), changed


def test_the_activations_are_kept_in_act_dtype_from_the_embedding_on(tmp_path, ckpt, text_file, monkeypatch):
    seen, prune_layers = [], prune.prune_layers
    monkeypatch.setattr(prune, "prune_layers", lambda layers, x, *a: (seen.append(x.dtype), prune_layers(layers, x, *a))[1])
    args = prune.PruneArgs(method="wanda", act_dtype="bfloat16", calib_data=text_file, nsamples=2, seqlen=16)
    prune.prune_checkpoint(ckpt, str(tmp_path / "o"), args, log=lambda line: None)
    assert seen == [torch.bfloat16]


def test_measured_errors_are_norm_ratios_of_float64_sums():
    """measured_errors: each matrix's ratio from its own pair of sums and the layer's from its
    outputs, every sum in float64 (float32 sums would move the digits the report records)."""
    dense_out = torch.tensor([[3.0, 4.0]])
    pruned_out = torch.tensor([[3.0, 3.0]])
    got = prune.measured_errors({"a": [0.1, 0.3], "b": [2.0, 8.0]}, dense_out, pruned_out)
    assert got == {"layer_error": math.sqrt(1 / 25), "matrix_error": {"a": math.sqrt(0.1 / 0.3), "b": 0.5}}


@pytest.mark.parametrize("changed,nm,config,message", [
    ({"method": "obs"}, None, {}, "unknown method 'obs'; choose from moe-pruner, wanda, sparsegpt, magnitude"),
    ({"sparsity": 1.0}, None, {}, "--sparsity 1.0 outside [0, 1)"),
    ({}, (2, 3), {}, "--nm 2:3: M=3 does not divide the 64 inputs of expert w1/w3"),
    ({}, (1, 4), {"intermediate_size": 90}, "--nm 1:4: M=4 does not divide the 90 inputs of expert w2"),
    ({"prune_attention": True}, (2, 32), {"head_dim": 6}, "--nm 2:32: M=32 does not divide the 48 inputs of o_proj"),
    ({"method": "sparsegpt", "blocksize": 6}, (2, 4), {}, "--nm with sparsegpt needs M dividing the block size 6"),
    ({"layer_sparsity": "owl"}, (2, 4), {}, "--layer-sparsity applies to unstructured sparsity; N:M fixes every layer's"),
    ({"stats_tokens": "some"}, None, {}, "--stats-tokens 'some': choose routed or all"),
    ({"stats_tokens": "all"}, None, {}, "--stats-tokens all: MoE-Pruner's gate is 0 for the tokens not routed to an "
                                        "expert, so its statistics are the routed ones; the router-blind reading is "
                                        "--method wanda"),
    ({"group": "column"}, None, {}, "--group 'column': row or matrix (sparsegpt chooses its mask per block of columns)"),
    ({"group": "matrix", "method": "sparsegpt"}, None, {}, "--group 'matrix': row or matrix (sparsegpt chooses its "
                                                          "mask per block of columns)"),
    ({"percdamp": float("nan")}, None, {}, "--blocksize 128 must be >= 1 and --percdamp nan finite and > 0"),
    ({"percdamp": float("inf")}, None, {}, "--blocksize 128 must be >= 1 and --percdamp inf finite and > 0"),
    ({"percdamp": 0.0}, None, {}, "--blocksize 128 must be >= 1 and --percdamp 0.0 finite and > 0"),
    ({"blocksize": 0}, None, {}, "--blocksize 0 must be >= 1 and --percdamp 0.01 finite and > 0"),
    ({"layer_sparsity": "0.5,x"}, None, {}, "--layer-sparsity '0.5,x': a comma list of numbers, or owl"),
    ({"layer_sparsity": "0.5"}, None, {}, "--layer-sparsity: need 2 values in [0, 1), got '0.5'"),
    ({"layer_sparsity": "owl", "owl_lambda": 0.3}, None, {}, "--owl-lambda 0.3 must keep every layer in [0, 1): OWL's "
                                                             "layers lie within --sparsity 0.5 +- 2 x lambda; and "
                                                             "--owl-m 5.0 must be > 0"),
    ({"layer_sparsity": "0.5,1.0"}, None, {}, "--layer-sparsity: need 2 values in [0, 1), got '0.5,1.0'"),
    *[({"layer_sparsity": "owl", "sparsity": s, "owl_lambda": lam, "owl_m": m}, None, {},
       f"--owl-lambda {lam} must keep every layer in [0, 1): OWL's layers lie within --sparsity {s} +- 2 x lambda; "
       f"and --owl-m {m} must be > 0")
      for s, lam, m in [(0.6, 0.25, 5.0), (0.5, 0.25, 5.0), (0.5, -0.1, 5.0), (0.5, 0.08, 0.0)]],
    ({"dtype": "float16"}, None, {}, "--dtype 'float16': float32 or bfloat16"),
])
def test_every_refused_setting_gets_its_own_line(changed, nm, config, message):
    """check_args: each setting refused before any work, with the one line that names it."""
    with pytest.raises(data.DataError) as e:
        prune.check_args(prune.PruneArgs(**changed), small_config(**config), nm)
    assert str(e.value) == message
    prune.check_args(prune.PruneArgs(), small_config(**config), None)  # the defaults pass on the same model


@pytest.mark.parametrize("changed,nm", [({"group": "matrix", "method": "wanda"}, None), ({"blocksize": 1}, None),
                                        ({"percdamp": 1e-9, "method": "sparsegpt"}, None), ({"sparsity": 0.0}, None),
                                        ({"method": "sparsegpt", "blocksize": 4}, (2, 4)),
                                        ({"layer_sparsity": "0,0.99"}, None), ({"dtype": "bfloat16"}, None),
                                        ({"layer_sparsity": "owl", "owl_lambda": 0.0}, None),
                                        ({"layer_sparsity": "owl", "sparsity": 0.4, "owl_lambda": 0.2}, None),
                                        ({"layer_sparsity": "owl", "owl_m": 0.5}, None)])
def test_the_edges_of_every_accepted_setting_pass(changed, nm):
    prune.check_args(prune.PruneArgs(**changed), small_config(), nm)


def test_a_matrix_whose_target_is_zero_is_left_as_it_is_and_prune_matrix_defaults_as_the_command_line():
    """Sparsity 0 without N:M returns w untouched and no fallback, even for a matrix no calibration
    token reached; prune_matrix's defaults are PruneArgs's (the command line's)."""
    w = torch.randn(4, 8)
    for method in cli.METHODS:
        out, fell_back = prune.prune_matrix(w, method, prune.InputStats(method, 8), 0.0)
        assert torch.equal(out, w) and not fell_back, method
    defaults = {k: v.default for k, v in inspect.signature(prune.prune_matrix).parameters.items()
                if v.default is not inspect.Parameter.empty and k not in ("losses", "out")}  # outputs
    a = prune.PruneArgs()
    assert defaults == {"nm": None, "group": a.group, "blocksize": a.blocksize, "percdamp": a.percdamp}


def test_nm_fixes_the_reported_target_and_prune_checkpoint_logs_each_layer(tmp_path, ckpt, text_file):
    """--nm 1:4 prunes 3 of every 4 weights: the report's target and every layer's are 0.75 whatever
    --sparsity says. prune_checkpoint logs the run, each layer and the summary; it replaces an
    existing output only when asked."""
    lines = []
    args = prune.PruneArgs(method="wanda", nm="1:4", calib_data=text_file, nsamples=4, seqlen=32)
    out = str(tmp_path / "o")
    rep = prune.prune_checkpoint(ckpt, out, args, log=lines.append)
    assert rep["sparsity_target"] == 0.75 and rep["layer_sparsity"] == [0.75, 0.75]
    assert all(v == 0.75 for v in rep["per_matrix_sparsity"].values()) and rep["owl_outlier_ratios"] is None
    assert [layer["layer"] for layer in rep["layers"]] == [0, 1]
    assert (rep["model"], rep["method"], rep["nm"]) == (data.shown_path(ckpt), "wanda", "1:4")
    assert (rep["args"]["model"], rep["args"]["out"], rep["args"]["overwrite"]) == (data.shown_path(ckpt),
                                                                                   data.shown_path(out), False)
    errors = rep["per_matrix_error"]
    assert rep["mean_matrix_error"] == pytest.approx(sum(errors.values()) / len(errors), rel=1e-12) and len(errors) == 24
    for l, layer in enumerate(rep["layers"]):  # each layer's mean of its matrices' errors
        errors = [v for k, v in rep["per_matrix_error"].items() if k.startswith(f"model.layers.{l}.")]
        assert layer["mean_matrix_error"] == pytest.approx(sum(errors) / len(errors), rel=1e-12) and len(errors) == 4 * 3
    assert lines[0].endswith(": wanda, sparsity 0.750 (1:4), 4 x 32 calibration tokens")
    assert [l.split(":")[0] for l in lines[1:3]] == ["layer 0", "layer 1"] and len(lines) == 4
    assert lines[3].startswith(f"expert sparsity {rep['expert_sparsity']:.4f}, ")
    with pytest.raises(outputs.OutputError, match="exists"):
        prune.prune_checkpoint(ckpt, out, args)


def test_prune_checkpoint_logs_the_run_each_layer_with_the_time_left_and_the_summary(tmp_path, text_file, monkeypatch):
    """Every progress line, word for word where it is not a measured figure. The clock reads 100 s
    when the run starts and 1100 s from then on, so a layer's time left is (1100 - 100) / (l + 1) x
    the layers after it."""
    stand_in_clock(monkeypatch, prune)
    lines = []
    model = write_checkpoint(tmp_path / "three", num_hidden_layers=3)
    out = str(tmp_path / "o")
    args = prune.PruneArgs(method="wanda", layer_sparsity="0.4,0.5,0.6", calib_data=text_file, nsamples=4, seqlen=32)
    rep = prune.prune_checkpoint(model, out, args, log=lines.append)
    assert lines[0] == f"{data.shown_path(model)} -> {data.shown_path(out)}: wanda, sparsity 0.500, 4 x 32 calibration tokens"
    assert lines[1] == "layer sparsities 0.4000, 0.5000, 0.6000"
    for l, left in ((0, "; ~2000s for the 2 layer(s) left"), (1, "; ~500s for the 1 layer(s) left"), (2, "")):
        layer = rep["layers"][l]
        assert lines[2 + l].startswith(f"layer {l}: stats ") and lines[2 + l].endswith(
            f", expert sparsity {layer['expert_sparsity']:.4f}, matrix error {layer['mean_matrix_error']:.4f} (mean), "
            f"layer output error {layer['output_error']:.4f}{left}")
    assert rep["seconds"] == 1000.0 and rep["world_size"] == 1 and lines[5] == (
        f"expert sparsity {rep['expert_sparsity']:.4f}, all decoder linear layers {rep['decoder_linear_sparsity']:.4f}, "
        f"whole model {rep['overall_sparsity']:.4f}, mean matrix error {rep['mean_matrix_error']:.4f} (1000.0s)")
    assert len(lines) == 6


@pytest.mark.parametrize("spec,want", [("1:4", (1, 4)), ("3:4", (3, 4)), (None, None), ("0:4", "--nm 0:4: need 0 < N < M"),
                                       ("4:4", "--nm 4:4: need 0 < N < M"), ("2-4", "--nm '2-4': expected N:M, e.g. 2:4")])
def test_parse_nm_reads_n_of_m_and_refuses_every_other_spelling(spec, want):
    if isinstance(want, str):
        with pytest.raises(data.DataError) as e:
            prune.parse_nm(spec)
        assert str(e.value) == want
    else:
        assert prune.parse_nm(spec) == want


def test_prune_matrix_keeps_the_dtype_and_magnitude_never_falls_back():
    """prune_matrix returns w's dtype (SparseGPT's solver runs in float32), and magnitude, which
    needs no calibration token, is never reported as a fallback."""
    w = torch.randn(4, 8).to(torch.bfloat16)
    stats = prune.InputStats("sparsegpt", 8)
    stats.add(torch.randn(32, 8))
    out, fell_back = prune.prune_matrix(w, "sparsegpt", stats, 0.5)
    assert out.dtype == torch.bfloat16 and not fell_back and (out == 0).sum() == 16
    out, fell_back = prune.prune_matrix(w, "magnitude", None, 0.5)
    assert out.dtype == torch.bfloat16 and not fell_back


def test_prune_matrix_defaults_are_the_solvers_reference_settings():
    """Called without blocksize and percdamp, SparseGPT runs with 128 and 0.01 (256 columns: two
    blocks)."""
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    stats = prune.InputStats("sparsegpt", 256)
    stats.add(torch.randn(512, 256, generator=torch.Generator().manual_seed(1)))
    default, _ = prune.prune_matrix(w, "sparsegpt", stats, 0.5)
    assert torch.equal(default, prune.prune_matrix(w, "sparsegpt", stats, 0.5, None, "row", 128, 0.01)[0])
    assert not torch.equal(default, prune.prune_matrix(w, "sparsegpt", stats, 0.5, None, "row", 64, 0.01)[0])


def test_a_recipe_of_repository_paths_drives_prune_main_from_anywhere(tmp_path, monkeypatch):
    report = tmp_path / "prune_report.json"
    report.write_text(json.dumps({"args": {"model": "models/tiny-mixtral", "calib_data": "README.md",
                                           "method": "wanda", "sparsity": 0.25}}))
    calls = []
    monkeypatch.setattr(prune, "prune_checkpoint", lambda *a, **k: calls.append((a, k)) or {})
    monkeypatch.chdir(tmp_path)  # where none of the recorded paths exists
    prune.main(["--recipe", str(report), "--out", str(tmp_path / "o")])
    (model, out, args), _ = calls[0][0][:3], calls[0][1]
    assert model == os.path.join(cli.REPO, "models/tiny-mixtral")
    assert (args.calib_data, args.method, args.sparsity) == (os.path.join(cli.REPO, "README.md"), "wanda", 0.25)



def test_the_command_line_defaults_are_the_library_defaults():
    """prune.py without flags runs what PruneArgs() runs (OWL's lambda 0.08 and M 5, SparseGPT's block 128 and
    damping 0.01, ...); only --method has no default there, and --device resolves 'auto' by the machine."""
    parsed = vars(prune.build_parser().parse_args(["--out", "o"]))
    library = {k: v for k, v in vars(prune.PruneArgs()).items() if k not in ("method", "device")}
    assert {k: parsed[k] for k in library} == library
    assert parsed["method"] is None


def test_method_is_required_without_a_recipe(capsys):
    assert script_error(capsys, prune.main, ["--out", "o"]) == "error: --method is required (or --recipe)"


def recipe_run_args(tmp_path, monkeypatch, recorded: dict, flags: list, saved: bool) -> prune.PruneArgs:
    """prune.main's PruneArgs for --recipe run/prune_report.json (recording `recorded`, with the run's
    calibration windows beside it when `saved`) and `flags`, run from a folder holding neither."""
    (tmp_path / "run").mkdir()
    report = tmp_path / "run" / "prune_report.json"
    report.write_text(json.dumps({"args": recorded}))
    if saved:
        np.save(tmp_path / "run" / prune.CALIBRATION_FILE, np.zeros((2, 8), dtype=np.int64))
    calls = []
    monkeypatch.setattr(prune, "prune_checkpoint", lambda *a, **k: calls.append(a) or {})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    prune.main(["--recipe", os.path.join("..", "run", "prune_report.json"), "--out", str(tmp_path / "o"), *flags])
    return calls[0][2]


@pytest.mark.parametrize("flags", [[], ["--sparsity", "0.6"], ["--nsamples", "4"], ["--seqlen", "32"], ["--seed", "3"],
                                   ["--calib-data", "TEXT"], ["--calib-tokens", "TOKENS"]])
def test_a_recipe_repeats_its_calibration_windows_unless_a_calibration_flag_is_given(tmp_path, monkeypatch, flags):
    """The calibration_tokens.npy beside a recipe, found from any cwd, replaces the recorded text and draw;
    any of --calib-data, --calib-tokens, --nsamples, --seqlen or --seed given with it means a new draw."""
    (tmp_path / "t.txt").write_text("text")
    np.save(tmp_path / "t.npy", np.ones((2, 8), dtype=np.int64))
    flags = [{"TEXT": str(tmp_path / "t.txt"), "TOKENS": str(tmp_path / "t.npy")}.get(f, f) for f in flags]
    args = recipe_run_args(tmp_path, monkeypatch, {"model": "models/tiny-mixtral", "calib_data": "README.md",
                                                   "method": "wanda", "sparsity": 0.25}, flags, saved=True)
    saved = os.path.join("..", "run", prune.CALIBRATION_FILE)
    expected = {(): (saved, "stdlib"), ("--sparsity",): (saved, "stdlib"),
                ("--calib-data",): (None, str(tmp_path / "t.txt")), ("--calib-tokens",): (str(tmp_path / "t.npy"), "stdlib")}
    assert (args.calib_tokens, args.calib_data) == expected.get(tuple(flags[:1]), (None, os.path.join(cli.REPO, "README.md")))
    assert args.sparsity == (0.6 if flags[:1] == ["--sparsity"] else 0.25)


def test_a_recipe_without_saved_windows_reads_its_recorded_token_file_from_the_repository(tmp_path, monkeypatch):
    args = recipe_run_args(tmp_path, monkeypatch, {"method": "moe-pruner", "calib_data": "stdlib",
                                                   "calib_tokens": "results/calibration_tokens.npy"}, [], saved=False)
    assert (args.calib_tokens, args.calib_data) == (os.path.join(cli.REPO, "results/calibration_tokens.npy"), "stdlib")


def test_round_updates_feeds_the_next_layer_what_the_checkpoint_holds(tmp_path, text_file, monkeypatch):
    """SparseGPT on a float16 checkpoint: with --round-updates the forward that makes layer l+1's
    inputs runs layer l's updated weights as the checkpoint stores them (the reference's model
    computes in float16); without it, their float32 values, which float16 cannot hold. Layer 0's
    weights are written the same either way; layer 1's differ, its inputs having changed."""
    ck = write_checkpoint(tmp_path / "ck", dtype=torch.float16)
    seen = {}
    forward = prune.pruned_forward

    def capture(layer, *a, **k):
        seen.setdefault(key[0], []).append({n: p.detach().clone() for n, p in layer.named_parameters() if ".experts." in n})
        return forward(layer, *a, **k)
    monkeypatch.setattr(prune, "pruned_forward", capture)
    out = {}
    for key in (["float32"], ["rounded"]):
        out[key[0]] = str(tmp_path / key[0])
        prune.main(["--model", ck, "--method", "sparsegpt", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32",
                    "--device", "cpu", "--out", out[key[0]], *(["--round-updates"] if key[0] == "rounded" else [])])
    for kind in ("float32", "rounded"):
        stored = checkpoint.CheckpointReader(out[kind])
        layer0 = seen[kind][0]
        held = all(torch.equal(w, stored.get("model.layers.0." + n).float()) for n, w in layer0.items())
        assert held == (kind == "rounded"), kind
    a, b = checkpoint.CheckpointReader(out["float32"]), checkpoint.CheckpointReader(out["rounded"])
    name = "model.layers.{}.block_sparse_moe.experts.0.w1.weight"
    assert torch.equal(a.get(name.format(0)), b.get(name.format(0))) and not torch.equal(a.get(name.format(1)),
                                                                                         b.get(name.format(1)))
    assert json.load(open(os.path.join(out["rounded"], "prune_report.json")))["args"]["round_updates"] is True
