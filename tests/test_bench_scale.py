"""bench/scale.py's checkpoint writer and arithmetic, without writing 6 GB: the same code at a scaled config."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import checkpoint
import progress
from bench import scale as bench_scale
from conftest import small_config, write_checkpoint


def test_full_width_config_is_mixtral_8x7b():
    c = bench_scale.full_width_config(2)
    assert (c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.num_hidden_layers, c.rope_theta) == (
        4096, 14336, 8, 2, 32, 8, 32000, 2, 1e6)
    shapes = checkpoint.expected_shapes(c)
    assert shapes["model.layers.1.block_sparse_moe.experts.7.w2.weight"] == (4096, 14336)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    per_layer = 8 * 3 * 4096 * 14336 + 2 * 4096 * 4096 + 2 * 1024 * 4096 + 8 * 4096 + 2 * 4096
    assert bench_scale.checkpoint_bytes(c) == 2 * (2 * per_layer + 2 * 32000 * 4096 + 4096)


def test_writer_makes_an_official_layout_checkpoint_one_shard_per_layer(tmp_path):
    c = dataclasses.replace(small_config(num_hidden_layers=3, num_local_experts=8), torch_dtype="bfloat16")
    path = str(tmp_path / "ck")
    bench_scale.write_checkpoint(path, c, max_shard_bytes=10**9)
    reader = checkpoint.CheckpointReader(path)  # every key and shape checked against config.json
    assert reader.stored_dtype() == torch.bfloat16
    shards = {reader.weight_map[f"model.layers.{l}.block_sparse_moe.experts.7.w2.weight"] for l in range(3)}
    assert len(shards) == 3


def test_projection_arithmetic():
    run = {"report": {"layers": [{"stats_forward_s": 10.0, "next_forward_s": 20.0, "prune_s": 5.0}] * 2},
           "peak_rss": 10 * bench_scale.GiB, "stats_forward_bound_s": 4.0, "next_forward_bound_s": 6.0,
           "prune_bound_s": 1.0}
    c = bench_scale.full_width_config(2)
    p = bench_scale.projection(run, c, tokens=16 * 2048)
    assert p["token_scale"] == 8.0 and p["projected_s_per_layer"] == 30.0 * 8 + 5.0
    assert p["projected_hours"] == pytest.approx(245 * 32 / 3600)
    act = 3 * 4096 * 4
    assert p["projected_peak_gib"] == pytest.approx(10 + act * (128 * 2048 - 16 * 2048) / bench_scale.GiB)
    assert p["bound_hours"] == pytest.approx((10.0 * 8 + 1.0) * 32 / 3600) and p["bound_ratio"] == pytest.approx(245 / 81)


def test_a_layers_work_is_counted_from_its_shapes():
    """Mixtral-8x7B's layer on 2 x 1024 tokens, counted by hand: attention's four products and causal
    scores, top-2 of 8 experts' three products, SparseGPT's Hessians and solver, the scoring's bytes."""
    c = bench_scale.full_width_config(1)
    w = bench_scale.layer_work(c, 2, 1024)
    t, h, i = 2048, 4096, 14336
    assert w["attention"] == 2 * t * h * (h + 1024 + 1024 + h) + 2 * 2 * 1024 ** 2 * h
    assert w["experts"] == 2 * t * 3 * 2 * h * i and w["router"] == 2 * t * h * 8
    assert w["hessians"] == 8 * 2 * (t // 4) * (h * h + i * i)
    assert w["solver"] == pytest.approx(8 * (2 * (4 / 3 * h ** 3 + i * h ** 2 + i * 128 * h) + 4 / 3 * i ** 3 + h * i ** 2
                                             + h * 128 * i))
    assert w["weight_bytes"] == 8 * 3 * h * i * 8
    rates = {"float32": {"gemm_gflops": 100.0}, "bfloat16": {"gemm_gflops": 400.0}}
    b = bench_scale.phase_bounds("moe-pruner", "bfloat16", w, rates, bandwidth=20.0)
    assert b["prune_bound_s"] == pytest.approx(w["weight_bytes"] / 20e9)
    assert b["next_forward_bound_s"] == pytest.approx(w["experts"] / 400e9)
    assert b["stats_forward_bound_s"] == pytest.approx((w["attention"] + w["router"] + w["experts"]) / 400e9)
    s = bench_scale.phase_bounds("sparsegpt", "bfloat16", w, rates, bandwidth=20.0)
    assert s["stats_forward_bound_s"] == pytest.approx(b["stats_forward_bound_s"] + w["hessians"] / 100e9)
    assert s["prune_bound_s"] == pytest.approx(w["solver"] / 100e9)


def test_memory_bandwidth_is_bytes_moved_over_time(monkeypatch):
    monkeypatch.setattr(bench_scale, "timed", lambda fns, repeats, device="cpu": [0.5])
    assert bench_scale.memory_bandwidth(gib=0.25, repeats=1) == pytest.approx(2 * 0.25 * bench_scale.GiB / 0.5 / 1e9)


def test_rates_are_timed_at_the_routed_tokens_when_fast_enough_and_never_more():
    fast = bench_scale.gemm_and_expert_rates(96, 64, 128, torch.float32, repeats=1)
    assert fast["tokens"] == 96 and fast["gemm_gflops"] > 0 and fast["expert_gflops"] > 0
    slow = bench_scale.gemm_and_expert_rates(10**6, 64, 128, torch.float32, repeats=1, seconds=1e-9)
    assert slow["tokens"] == 64  # a dtype too slow to time: the smallest batch, not the routed million


def test_a_run_reports_its_layer_against_a_forward_that_measures_nothing(tmp_path):
    """run_prune's fresh process: prune.py, then layer 0 run once more measuring nothing; the ratio of
    layer 0's wall time to its work, and the table docs/benchmarks.md quotes."""
    ckpt = write_checkpoint(tmp_path / "ck")
    calib = str(tmp_path / "calib.npy")
    np.save(calib, np.random.default_rng(0).integers(0, 300, size=(4, 64)))
    run = bench_scale.run_prune(ckpt, str(tmp_path / "out"), "moe-pruner", "float32", calib, 2, "cpu")
    assert not os.path.exists(tmp_path / "out") and run["peak_rss"] > 0 and run["gpu_peak"] == 0
    l0 = run["report"]["layers"][0]
    assert run["layer0_wall_s"] == pytest.approx(l0["stats_forward_s"] + l0["prune_s"] + l0["next_forward_s"])
    assert run["layer0_ratio"] == pytest.approx(run["layer0_wall_s"] / run["layer0_work_s"]) and run["plain_forward_s"] > 0
    rates = {"float32": {"gemm_gflops": 50.0}, "bfloat16": {"gemm_gflops": 100.0}}
    run.update(bench_scale.phase_bounds("moe-pruner", "float32", bench_scale.layer_work(small_config(), 4, 64), rates, 10.0))
    run.update(dtype="float32", tokens=256, projection=bench_scale.projection(run, bench_scale.full_width_config(2), 256))
    results = {"machine": progress.machine(), "device": "cpu", "layers": 2, "checkpoint_gib": 0.1, "runs": {"r": run},
               "rates": {"float32": {"gemm_gflops": 50.0}}}
    table = bench_scale.markdown(results)
    assert "| moe-pruner | float32 | 256 |" in table and f"| {run['layer0_ratio']:.3f} |" in table


def test_the_json_is_saved_after_each_run(tmp_path, monkeypatch):
    """bench() at a small width: --json holds the rates before the first run and each run as soon as
    it ends, so a run stopped by a time limit (bench.gpu_check's) keeps what it measured."""
    monkeypatch.setattr(bench_scale, "full_width_config", lambda layers: dataclasses.replace(
        small_config(num_hidden_layers=layers), torch_dtype="bfloat16"))
    out = tmp_path / "scale.json"
    saved, save = [], bench_scale.GrowingFile.save
    monkeypatch.setattr(bench_scale.GrowingFile, "save", lambda self, obj: (saved.append(
        json.loads(json.dumps(obj))), save(self, obj)))
    res = bench_scale.bench(1, 2, 16, ["moe-pruner", "magnitude"], ["float32"], repeats=1, folder=str(tmp_path / "w"),
                            json_path=str(out))
    assert [list(s["runs"]) for s in saved] == [[], ["moe-pruner/float32"], ["moe-pruner/float32", "magnitude/float32"]]
    assert json.load(open(out)) == json.loads(json.dumps(res)) and "float32" in saved[0]["rates"]
