"""expert_prune.py: NAEE expert pruning and dynamic skipping, CD-MoE condensing."""

import copy
import itertools
import json
import os
import re

import numpy as np
import pytest
import torch

import expert_prune as ep
import checkpoint
import cli
import data
import mini_mixtral as mm
import variants
from conftest import TEXT, random_model, script_error, small_config, write_checkpoint
from layerwise import Positions
from outputs import OutputError
from test_devices import MetaMeetsReal


def layer_inputs(seed=0):
    m = random_model(num_local_experts=6)
    x = torch.randn(3, 10, 64, generator=torch.Generator().manual_seed(seed))
    cos, sin = mm.rope_cos_sin(m.config, 10)
    return m, m.model.layers[0], x, cos, sin


def sliced(layer, keep):
    """A copy of the layer with only the kept experts."""
    small = copy.deepcopy(layer)
    ep.slice_experts(small.block_sparse_moe, keep)
    return small


def test_enumeration_matches_brute_force_on_whole_layers():
    m, layer, x, cos, sin = layer_inputs()
    subsets = list(itertools.combinations(range(6), 3))
    errors = ep.subset_errors(layer, x, Positions(cos, sin, None), subsets, batch_size=2)
    assert len(subsets) == 20  # C(6, 3)
    with torch.no_grad():
        ref = layer(x, cos, sin)[0]
        brute = []
        for s in itertools.combinations(range(6), 3):  # the whole smaller layer, run for real
            out = sliced(layer, list(s))(x, cos, sin)[0]
            # one norm per batch of 2 windows (the reference's enumerate(): one per cached forward), summed
            brute.append(sum((out[b:b + 2] - ref[b:b + 2]).double().pow(2).sum().sqrt() for b in range(0, len(x), 2)))
    assert int(torch.stack(brute).argmin()) == int(errors.argmin())
    assert torch.allclose(torch.stack(brute).double(), errors, rtol=1e-3, atol=1e-5)


def test_layerwise_protocol_chooses_each_layer_on_the_dense_models_activations(tmp_path, ckpt, text_file):
    """The reference's layerwise_pruning: layer l's subset is the brute-force argmin of
    sum over windows ||Z - Z_s||_F, with X and Z the dense model's, whatever was dropped before."""
    out = str(tmp_path / "r2")
    rep = ep.main(["--model", ckpt, "--keep-experts", "2", "--calib-data", text_file, "--nsamples", "3", "--seqlen", "16",
                   "--out", out, "--batch-size", "2"])
    assert rep["protocol"] == "layerwise"
    dense = checkpoint.load_model(ckpt)
    tokens = data.calibration_tokens(ckpt, 300, 128, text_file, None, 3, 16, 0)  # the windows expert_prune drew
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, a, l=l: inputs.__setitem__(l, a[0]))
             for l, layer in enumerate(dense.model.layers)]
    with torch.no_grad():
        dense(tokens)
    for h in hooks:
        h.remove()
    cos, sin = mm.rope_cos_sin(dense.config, 16)
    for l, layer in enumerate(dense.model.layers):
        x = inputs[l]
        with torch.no_grad():
            ref = layer(x, cos, sin)[0]
            errs = {s: sum((sliced(layer, list(s))(x, cos, sin)[0][w] - ref[w]).double().pow(2).sum().sqrt()
                           for w in range(len(x))) for s in itertools.combinations(range(4), 2)}
        assert list(min(errs, key=errs.get)) == rep["kept_experts"][l]


def test_rerouting_after_dropping_equals_minus_inf_logits():
    m, layer, x, cos, sin = layer_inputs(1)
    keep = [0, 2, 5]
    small = sliced(layer, keep).block_sparse_moe
    block = layer.block_sparse_moe
    h = torch.randn(1, 12, 64)
    with torch.no_grad():
        logits = block.gate(h[0])
        logits[:, [1, 3, 4]] = float("-inf")
        w, idx = mm.route(logits, 2)
        ref = sum(w[:, j:j + 1] * torch.stack([block.experts[e](h[0][t:t + 1])[0] for t, e in enumerate(idx[:, j].tolist())])
                  for j in range(2))
        assert torch.allclose(small(h)[0][0], ref, atol=1e-6)


def test_naee_checkpoint_is_a_smaller_mixtral_that_transformers_loads(tmp_path, ckpt, text_file):
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "r3")
    rep = ep.main(["--model", ckpt, "--keep-experts", "3", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32",
                   "--out", out])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_local_experts"] == 3 and len(rep["kept_experts"]) == 2
    r = checkpoint.CheckpointReader(out)
    src = checkpoint.CheckpointReader(ckpt)
    for l, keep in enumerate(rep["kept_experts"]):
        assert torch.equal(r.get(f"model.layers.{l}.block_sparse_moe.gate.weight"),
                           src.get(f"model.layers.{l}.block_sparse_moe.gate.weight")[keep])
        for new_e, old_e in enumerate(keep):
            assert torch.equal(r.get(f"model.layers.{l}.block_sparse_moe.experts.{new_e}.w2.weight"),
                               src.get(f"model.layers.{l}.block_sparse_moe.experts.{old_e}.w2.weight"))
    idx = torch.randint(0, 300, (1, 20))
    hf = transformers.MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(idx).logits - checkpoint.load_model(out)(idx)).abs().max() < 1e-4


def test_skipping_beta_zero_changes_nothing_and_beta_one_keeps_the_top_expert():
    m = random_model()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref, logits = m(x, return_router_logits=True)
        m0 = mm.Mixtral(small_config(extra={"dynamic_skip_beta": [0.0, 0.0]})).eval()
        m0.load_state_dict(m.state_dict())
        variants.install_variants(m0)
        assert torch.equal(m0(x), ref)
        m1 = mm.Mixtral(small_config(extra={"dynamic_skip_beta": [1.0, 1.0]})).eval()
        m1.load_state_dict(m.state_dict())
        variants.install_variants(m1)
        top1 = mm.Mixtral(small_config(num_experts_per_tok=1)).eval()  # top-1 routing: weight 1 on the top expert
        top1.load_state_dict(m.state_dict())
        assert torch.allclose(m1(x), top1(x), atol=1e-5)
        assert ep.skip_fraction(m1, x) == pytest.approx(0.5)  # every second expert call removed
        assert ep.skip_fraction(m0, x) == 0.0


def test_skip_betas_are_medians_and_honoured_after_loading(tmp_path, ckpt, text_file):
    out = str(tmp_path / "skip")
    rep = ep.main(["--model", ckpt, "--skip", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32",
                   "--out", out])
    model = variants.load_model(out)
    assert isinstance(model.model.layers[0].block_sparse_moe, variants.SkippingMoeBlock)
    assert variants.skip_betas(model.config) == rep["skip_beta"] and all(0 < b <= 1 for b in rep["skip_beta"])
    toks = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    assert 0.2 < ep.skip_fraction(model, toks) / 0.5 < 1.8  # median: about half the tokens skip (of 2 calls)


def test_condensed_layer_runs_fixed_experts_without_router():
    m = random_model()
    c = {"0": {"experts": [1, 3], "weights": [0.3, 0.2]}}
    cm = mm.Mixtral(small_config(extra={"condensed_layers": c})).eval()
    cm.load_state_dict(m.state_dict())
    variants.install_variants(cm)
    assert set(cm.state_dict()) == set(m.state_dict())  # the checkpoint keys stay the official ones
    block = cm.model.layers[0].block_sparse_moe
    h = torch.randn(1, 7, 64)
    with torch.no_grad():
        out, logits = block(h)
        assert logits is None
        assert torch.allclose(out[0], 0.3 * block.experts[1](h[0]) + 0.2 * block.experts[3](h[0]), atol=1e-6)
    assert ep.js_divergence(h, h) == pytest.approx(0, abs=1e-12)
    assert ep.js_divergence(h, 2 * h) == pytest.approx(ep.js_divergence(2 * h, h))
    budget = ep.expert_budget(cm.config)
    per = 3 * 64 * 96
    assert budget == {"stored_expert_params": (4 + 2) * per, "expert_macs_per_token": (2 + 2) * per,
                      "nonzero_expert_macs_per_token": (2 + 2) * per}


def test_cd_moe_end_to_end(tmp_path, ckpt, text_file):
    out = str(tmp_path / "cd")
    rep = ep.main(["--model", ckpt, "--condense-layers", "1", "--condense-experts", "2", "--calib-data", text_file,
                   "--nsamples", "4", "--seqlen", "32", "--out", out])
    (layer, entry), = rep["condensed_layers"].items()
    assert len(entry["experts"]) == 2 and all(0 < w < 1 for w in entry["weights"])
    assert variants.condensed_layers(variants.load_model(out).config) == rep["condensed_layers"]
    assert isinstance(variants.load_model(out).model.layers[int(layer)].block_sparse_moe, variants.CondensedMoeBlock)
    with pytest.raises(checkpoint.CheckpointError, match="expert-level variant"):  # never run as a plain Mixtral
        checkpoint.load_model(out)
    again = ep.main(["--model", ckpt, "--condense-layers", "2", "--condense-experts", "1", "--calib-data", text_file,
                     "--nsamples", "4", "--seqlen", "32", "--out", out, "--overwrite"])  # replaced only when asked
    assert len(again["condensed_layers"]) == 2 and variants.condensed_layers(variants.load_model(out).config) == again["condensed_layers"]


@pytest.mark.parametrize("argv,msg", [(["--keep-experts", "0"], "must be at least 1"), (["--keep-experts", "5"], "must lie in [num_experts_per_tok 2, num_local_experts 4]"),
                                      (["--keep-experts", "1"], "must lie in"),
                                      ([], "error: nothing to do: give --keep-experts, --skip or --condense-layers"),
                                      (["--keep-experts", "3", "--condense-layers", "1"],
                                       "error: CD-MoE (--condense-layers) and NAEE (--keep-experts, --skip) are separate runs")])
def test_bad_r_is_a_clear_error(tmp_path, ckpt, text_file, argv, msg, capsys):
    line = script_error(capsys, ep.main, ["--model", ckpt, *argv, "--calib-data", text_file, "--nsamples", "4",
                                          "--seqlen", "32", "--out", str(tmp_path / "o")])
    assert (line == msg) if msg.startswith("error: ") else (msg in line)
    assert not (tmp_path / "o").exists()


def test_cd_moe_weight_is_the_mean_gate_over_routed_tokens():
    # 3 tokens, top-2 of 4 experts: expert 0 routed with gates 0.6 and 0.7, expert 2 with 0.4 and 0.3 and 0.5,
    # expert 1 with 0.5, expert 3 never
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    e = torch.tensor([[0, 2], [0, 2], [1, 2]])
    got = ep.routed_gate_means(w, e, 4)
    assert torch.allclose(got, torch.tensor([0.65, 0.5, 0.4, 0.0], dtype=torch.float64))


def test_reap_keeps_the_experts_a_hand_computation_keeps(tmp_path, ckpt, text_file):
    m = checkpoint.load_model(ckpt)
    layer = m.model.layers[0]
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(5))
    cos, sin = mm.rope_cos_sin(m.config, 16)
    sal = ep.reap_saliency(layer, x, Positions(cos, sin, None), batch_size=1)
    # by hand: route every token, and for each expert average its router probability (softmax over
    # all experts, not the renormalised top-2 gate) * ||expert(x)|| over its tokens
    with torch.no_grad():
        h = layer.post_attention_layernorm(layer.attend(x, cos, sin)).reshape(-1, 64)
        logits = layer.block_sparse_moe.gate(h)
        w, idx = mm.route(logits, 2)
        p = torch.softmax(logits, dim=-1)
        hand = []
        for e in range(4):
            vals = [p[t, e].item() * layer.block_sparse_moe.experts[e](h[t]).norm().item()
                    for t in range(len(h)) for k in range(2) if idx[t, k] == e]
            hand.append(sum(vals) / len(vals) if vals else 0.0)
    assert torch.allclose(sal, torch.tensor(hand, dtype=torch.float64), rtol=1e-5)
    out = str(tmp_path / "reap")
    rep = ep.main(["--model", ckpt, "--keep-experts", "2", "--select", "reap", "--calib-data", text_file, "--nsamples", "2",
                   "--seqlen", "16", "--out", out])
    assert rep["method"] == "reap"
    for l, entry in enumerate(rep["layers"]):
        s = torch.tensor(entry["saliency"])
        assert entry["keep"] == sorted(torch.topk(s, 2).indices.tolist())
    assert checkpoint.CheckpointReader(out).config.num_local_experts == 2


def test_an_expert_prune_recipe_repeats_the_run(tmp_path, ckpt, text_file):
    first = str(tmp_path / "first")
    ep.main(["--model", ckpt, "--keep-experts", "3", "--calib-data", text_file, "--nsamples", "3", "--seqlen", "16", "--out", first])
    rep = ep.main(["--recipe", os.path.join(first, "expert_prune_report.json"), "--out", str(tmp_path / "again")])
    assert rep["recipe"]["overridden"] == {}
    a, b = checkpoint.load_model(first), checkpoint.load_model(str(tmp_path / "again"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_bfloat16_compute_runs_end_to_end_and_computes_in_bfloat16(tmp_path, ckpt, text_file):
    """--dtype bfloat16: the forwards run under autocast (the subset errors move off the float32
    ones, a little), the experts are sliced as in float32 and the weights are written exactly."""
    common = ["--model", ckpt, "--keep-experts", "3", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32"]
    f32 = ep.main([*common, "--out", str(tmp_path / "f32")])
    b16 = ep.main([*common, "--out", str(tmp_path / "b16"), "--dtype", "bfloat16"])
    assert b16["args"]["dtype"] == "bfloat16"
    for a, b in zip(f32["layers"], b16["layers"]):
        assert a["error"] != b["error"] and b["error"] == pytest.approx(a["error"], rel=0.05)
    src = checkpoint.CheckpointReader(ckpt)
    out = checkpoint.CheckpointReader(str(tmp_path / "b16"))
    for l, keep in enumerate(b16["kept_experts"]):
        assert torch.equal(out.get(f"model.layers.{l}.block_sparse_moe.experts.0.w1.weight"),
                           src.get(f"model.layers.{l}.block_sparse_moe.experts.{keep[0]}.w1.weight"))
    cd = ep.main([*common[:2], "--condense-layers", "1", "--calib-data", text_file, "--nsamples", "4", "--seqlen", "32",
                  "--out", str(tmp_path / "cd"), "--dtype", "bfloat16"])
    assert len(cd["condensed_layers"]) == 1


def test_progressive_protocol_targets_the_dense_models_block_outputs():
    """The reference's progressive_pruning caches Z once from the dense model: with inputs from a
    pruned stream, the target is the unpruned block on the *dense* inputs, not on the pruned ones."""
    m, layer, x, cos, sin = layer_inputs()
    pos = Positions(cos, sin, None)
    x_pruned = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    subsets = list(itertools.combinations(range(6), 3))
    errors = ep.subset_errors(layer, x_pruned, pos, subsets, batch_size=3, target_x=x)
    with torch.no_grad():
        moe_in = lambda v: layer.post_attention_layernorm(layer.attend(v, cos, sin))
        z_dense = layer.block_sparse_moe(moe_in(x))[0]  # [3, 10, 64] the dense model's block output
        for s, err in zip(subsets, errors):
            z_s = sliced(layer, list(s)).block_sparse_moe(moe_in(x_pruned))[0]
            assert err.item() == pytest.approx((z_s - z_dense).double().pow(2).sum().sqrt().item(), rel=1e-4)
    assert not torch.allclose(errors, ep.subset_errors(layer, x_pruned, pos, subsets, batch_size=3))


def drop(ckpt, text_file, out, **how):
    """drop_experts as main() runs it, on 3 calibration windows of 16 tokens, its log lines caught."""
    reader = checkpoint.CheckpointReader(ckpt)
    tokens = data.calibration_tokens(ckpt, reader.config.vocab_size, 128, text_file, None, 3, 16, 0)
    lines = []
    rep = ep.drop_experts(reader, tokens, ep.ExpertPruning(**how), out, log=lines.append)
    return tokens, rep, lines


def chain(ckpt, tokens, r, progressive, batch_size=2):
    """NAEE layer by layer, written out: each layer's subset errors on the stream the protocol feeds
    it, the target always the dense model's block output. Returns [(keep, best error, worst error)]."""
    dense = checkpoint.load_model(ckpt)
    cos, sin = mm.rope_cos_sin(dense.config, tokens.shape[1])
    pos = Positions(cos, sin, None)
    with torch.no_grad():
        x_dense = x = dense.model.embed_tokens(tokens)  # [n, T, hidden]
        out = []
        for layer in dense.model.layers:
            subsets = list(itertools.combinations(range(len(layer.block_sparse_moe.experts)), r))
            errors = ep.subset_errors(layer, x, pos, subsets, batch_size, x_dense if progressive else None)
            keep = list(subsets[int(errors.argmin())])
            out.append((keep, errors.min().item(), errors.max().item()))
            x = sliced(layer, keep)(x, cos, sin)[0] if progressive else layer(x_dense, cos, sin)[0]
            x_dense = layer(x_dense, cos, sin)[0]
    return out


@pytest.mark.parametrize("protocol", ["layerwise", "progressive"])
def test_each_protocol_feeds_each_layer_its_stream_and_reports_what_it_chose(tmp_path, protocol):
    """Layer l >= 1 sees the dense stream (layerwise) or the stream through the pruned layers
    (progressive), against the dense block's output either way; the report and the log say so."""
    ckpt = write_checkpoint(tmp_path / "ck", num_hidden_layers=3)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    tokens, rep, lines = drop(ckpt, str(text), str(tmp_path / "o"), r=2, protocol=protocol, batch_size=2)
    expected = chain(ckpt, tokens, 2, protocol == "progressive")
    assert rep["kept_experts"] == [k for k, _, _ in expected]
    assert [e["layer"] for e in rep["layers"]] == [0, 1, 2] and all(e["subsets"] == 6 for e in rep["layers"])
    for e, (keep, best, worst) in zip(rep["layers"], expected):
        assert e["keep"] == keep and e["error"] == pytest.approx(best, rel=1e-6)
        assert e["worst_error"] == pytest.approx(worst, rel=1e-6)
    assert {k: rep[k] for k in ("method", "r", "skip", "protocol", "skip_beta", "calibration_tokens")} == \
        {"method": "naee", "r": 2, "skip": False, "protocol": protocol, "skip_beta": None, "calibration_tokens": 48}
    assert json.load(open(tmp_path / "o" / "expert_prune_report.json")) == rep
    assert os.path.isfile(tmp_path / "o" / "tokenizer.json")  # the input's other files come along
    logged = [re.fullmatch(r"layer (\d): keep experts (\[\d, \d\]) \((\d+\.\d)s\)", s).groups() for s in lines]
    assert [g[:2] for g in logged] == [(str(l), str(k)) for l, (k, _, _) in enumerate(expected)]
    assert all(0 <= float(g[2]) < 600 for g in logged)  # the layer's own seconds, not a clock reading


def test_no_expert_dropped_records_no_subsets_and_skipping_logs_its_beta(tmp_path, ckpt, text_file):
    for select in ("naee", "reap"):
        _, rep, lines = drop(ckpt, text_file, str(tmp_path / select), r=4, skip=True, select=select)
        assert rep["layers"] == [] and rep["kept_experts"] == [[0, 1, 2, 3]] * 2
        assert [float(re.fullmatch(r"layer \d: keep experts \[0, 1, 2, 3\], skip beta (\d\.\d{3}) \(\d+\.\ds\)", s)
                      .group(1)) for s in lines] == pytest.approx(rep["skip_beta"], abs=5e-4)
    _, rep, _ = drop(ckpt, text_file, str(tmp_path / "reap2"), r=2, select="reap")
    assert set(rep["layers"][0]) == {"layer", "keep", "saliency"}
    assert [len(e["saliency"]) for e in rep["layers"]] == [4, 4] and [e["layer"] for e in rep["layers"]] == [0, 1]


@pytest.mark.parametrize("how,msg", [(dict(r=2, protocol="dense"), "unknown protocol 'dense'; choose from layerwise, "
                                                                    "progressive"),
                                     (dict(r=2, select="best"), "unknown expert selection 'best'; choose from naee, reap")])
def test_drop_experts_names_a_bad_setting(tmp_path, ckpt, text_file, how, msg):
    with pytest.raises(data.DataError) as e:
        drop(ckpt, text_file, str(tmp_path / "o"), **how)
    assert str(e.value) == msg


def test_skipping_needs_top_2_routing(tmp_path, text_file):
    ckpt = write_checkpoint(tmp_path / "ck", num_experts_per_tok=1)
    with pytest.raises(data.DataError) as e:
        drop(ckpt, text_file, str(tmp_path / "o"), r=4, skip=True)
    assert str(e.value) == "dynamic skipping is defined for top-2 routing; this model routes to 1"


def test_cd_moe_bounds_stored_dtype_and_report(tmp_path, text_file):
    """Every layer and every expert may be condensed (the bounds are inclusive), one more is a
    one-line error; the output keeps the input's stored dtype and files, and reports what it did."""
    ckpt = write_checkpoint(tmp_path / "ck", dtype=torch.bfloat16)
    tokens = data.calibration_tokens(ckpt, 300, 128, text_file, None, 4, 16, 0)
    lines = []
    rep = ep.cd_moe(ckpt, tokens, 2, 4, str(tmp_path / "all"), log=lines.append)
    assert sorted(rep["condensed_layers"]) == ["0", "1"] and rep["method"] == "cd-moe"
    assert rep["calibration_tokens"] == 64 and lines
    assert checkpoint.CheckpointReader(str(tmp_path / "all"), allow_variants=True).stored_dtype() == torch.bfloat16
    assert os.path.isfile(tmp_path / "all" / "tokenizer.json")
    assert json.load(open(tmp_path / "all" / "expert_prune_report.json")) == rep
    with pytest.raises(OutputError, match="exists"):  # never replaced without overwrite
        ep.cd_moe(ckpt, tokens, 1, 2, str(tmp_path / "all"))
    one = ep.cd_moe(ckpt, tokens, 1, 1, str(tmp_path / "all"), overwrite=True)  # one layer, one expert: replaced
    (layer, c), = one["condensed_layers"].items()
    assert len(c["experts"]) == 1
    bf16 = ep.cd_moe(ckpt, tokens, 1, 1, str(tmp_path / "bf16"), dtype="bfloat16")["condensed_layers"]  # under autocast
    assert bf16 != one["condensed_layers"]  # the gates it measures are bfloat16's
    for n_layers, n_experts in ((3, 2), (1, 5), (0, 2), (1, 0)):
        with pytest.raises(data.DataError) as e:
            ep.cd_moe(ckpt, tokens, n_layers, n_experts, str(tmp_path / "bad"))
        assert str(e.value) == "--condense-layers must lie in [1, 2] and --condense-experts in [1, 4]"
    assert not (tmp_path / "bad").exists()


def test_variant_blocks_show_an_observer_what_each_expert_saw():
    """The observer contract of mini_mixtral's block holds for both variants: a condensed layer
    shows each always-on expert every token with its fixed weight; a skipping layer shows the
    plain block's calls less the skipped second choices (beta 1: each token's top expert only,
    at gate 1)."""
    block = random_model().model.layers[0].block_sparse_moe
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    x = h.reshape(10, 64)
    calls, plain, skipping, top1 = [], [], [], []
    with torch.no_grad(), torch.device("meta"), MetaMeetsReal():  # every tensor the blocks make is on x's device
        variants.CondensedMoeBlock(block, [1, 3], [0.3, 0.2])(h, calls.append)
        block(h, plain.append)
        variants.SkippingMoeBlock(block, 0.0)(h, skipping.append)
        variants.SkippingMoeBlock(block, 1.0)(h, top1.append)
    with torch.no_grad():
        assert [c.expert for c in calls] == [1, 3]
        for c, w in zip(calls, (0.3, 0.2)):
            assert torch.equal(c.tokens, torch.arange(10)) and torch.equal(c.x, x)
            assert torch.equal(c.gate, torch.full((10,), w))
            assert torch.equal(c.h, block.experts[c.expert].hidden(x)) and torch.equal(c.y, block.experts[c.expert](x))
        assert [(c.expert, c.tokens.tolist()) for c in plain] == [(c.expert, c.tokens.tolist()) for c in skipping]
        first = mm.route(block.gate(x), 2)[1][:, 0]  # [10] each token's top expert
        assert sorted((c.expert, t) for c in top1 for t in c.tokens.tolist()) == sorted(
            (int(e), t) for t, e in enumerate(first))
        assert all(torch.equal(c.gate, torch.ones(len(c.tokens))) for c in top1)


def test_skip_ratios_cover_every_window_of_every_batch():
    """g1 / g0 of every token of every window, whatever the batch size: the top-2 weights of the
    router on the MoE block's input, computed here for all windows at once."""
    m, layer, x, cos, sin = layer_inputs(2)
    x = torch.cat([x, x.flip(0) * 0.5])  # [6, 10, 64]: 6 windows, batches of 4 and 2
    with torch.no_grad():
        h = layer.post_attention_layernorm(layer.attend(x, cos, sin)).reshape(-1, 64)  # [60, hidden]
        w, _ = mm.route(layer.block_sparse_moe.gate(h), 2)
    got = ep.skip_ratios(layer, x, Positions(cos, sin, None), batch_size=4)
    assert got.shape == (60,) and torch.allclose(got, w[:, 1] / w[:, 0])


def test_expert_budget_counts_condensed_skipping_and_sparse_layers():
    per = 3 * 64 * 96
    cfg = small_config(num_hidden_layers=3, extra={"condensed_layers": {"0": {"experts": [1, 2], "weights": [0.4, 0.3]},
                                                                       "2": {"experts": [3], "weights": [0.5]}}})
    got = ep.expert_budget(cfg, skip_fraction=0.25, nonzero_fraction=0.5)
    # layers 0 and 2 condensed; layer 1 routed top-2 with a quarter of its expert calls skipped: 1.5 calls a token
    stored, macs = (2 + 4 + 1) * per, (2 + 2 * (1 - 0.25) + 1) * per
    assert got == {"stored_expert_params": stored * 0.5, "expert_macs_per_token": macs,
                   "nonzero_expert_macs_per_token": macs * 0.5}


def test_calibration_tokens_given_as_a_file_are_the_windows_used_and_never_an_output(tmp_path, ckpt, text_file, capsys):
    tokens = data.calibration_tokens(ckpt, 300, 128, text_file, None, 3, 16, 7)  # [3, 16]
    npy = tmp_path / "windows.npy"
    np.save(npy, tokens.numpy())
    rep = ep.main(["--model", ckpt, "--keep-experts", "2", "--calib-tokens", str(npy), "--out", str(tmp_path / "o")])
    reader = checkpoint.CheckpointReader(ckpt)
    ref = ep.drop_experts(reader, tokens, ep.ExpertPruning(2), str(tmp_path / "ref"), log=lambda s: None)
    assert rep["calibration_tokens"] == 48 and rep["kept_experts"] == ref["kept_experts"]
    assert rep["layers"] == ref["layers"]
    for given in (["--calib-tokens", str(npy)], ["--calib-data", text_file, "--nsamples", "2", "--seqlen", "16"]):
        line = script_error(capsys, ep.main, ["--model", ckpt, "--keep-experts", "2", *given, "--out", given[1],
                                              "--overwrite"])  # an input is never the output, even with --overwrite
        assert "input" in line
    assert np.array_equal(np.load(npy), tokens.numpy()) and open(text_file).read() == TEXT


def test_a_recipe_with_the_former_r_and_a_model_path_relative_to_the_repository_repeats_its_run(
        tmp_path, text_file, monkeypatch):
    """Reports written before --keep-experts record `r`; a report's relative model path is read
    relative to the repository when it does not exist where the recipe is run from."""
    first = str(tmp_path / "first")
    ep.main(["--keep-experts", "6", "--calib-data", text_file, "--nsamples", "2", "--seqlen", "16", "--out", first])
    rep = json.load(open(os.path.join(first, "expert_prune_report.json")))
    assert rep["args"]["model"] == "models/tiny-mixtral"
    rep["args"]["r"] = rep["args"].pop("keep_experts")
    old = tmp_path / "old_report.json"
    old.write_text(json.dumps(rep))
    monkeypatch.chdir(tmp_path)  # models/tiny-mixtral does not exist here
    again = ep.main(["--recipe", str(old), "--out", str(tmp_path / "again")])
    assert again["args"]["keep_experts"] == 6 and again["kept_experts"] == rep["kept_experts"]
    assert again["recipe"]["overridden"] == {}


def test_overwrite_replaces_a_finished_output_and_a_recipe_reads_its_inputs_relative_to_the_repository(
        tmp_path, ckpt, monkeypatch):
    """--overwrite replaces an existing output; a recipe's relative calibration paths (text or
    tokens) are read relative to the repository when they do not exist where it is run from."""
    repo = tmp_path / "repo"
    (repo / "texts").mkdir(parents=True)
    (repo / "texts" / "t.txt").write_text(TEXT)
    tokens = data.calibration_tokens(ckpt, 300, 128, str(repo / "texts" / "t.txt"), None, 3, 16, 0)
    np.save(repo / "texts" / "w.npy", tokens.numpy())
    monkeypatch.setattr(cli, "REPO", str(repo))
    monkeypatch.chdir(repo)
    out = str(tmp_path / "o")
    for given in (["--calib-data", "texts/t.txt", "--nsamples", "3", "--seqlen", "16"], ["--calib-tokens", "texts/w.npy"]):
        first = ep.main(["--model", ckpt, "--keep-experts", "2", *given, "--out", out, "--overwrite"])
        assert json.load(open(os.path.join(out, "expert_prune_report.json")))["kept_experts"] == first["kept_experts"]
        monkeypatch.chdir(tmp_path)  # texts/ is not here: the recipe's paths are read in the repository
        again = ep.main(["--recipe", os.path.join(out, "expert_prune_report.json"), "--out", str(tmp_path / "again"),
                         "--overwrite"])
        assert again["kept_experts"] == first["kept_experts"] and again["layers"] == first["layers"]
        monkeypatch.chdir(repo)


def test_the_report_records_the_run_and_nothing_of_the_output(tmp_path, ckpt, text_file):
    """The report's args are the run's (its --seed's windows were the ones used), without the
    output, --overwrite or a recipe that was not given; CD-MoE's report records them too, and its
    --dtype reaches the forwards; an existing output is refused unless overwrite."""
    argv = ["--model", ckpt, "--calib-data", text_file, "--nsamples", "3", "--seqlen", "16", "--seed", "7"]
    rep = ep.main([*argv, "--keep-experts", "2", "--out", str(tmp_path / "o")])
    tokens = data.calibration_tokens(ckpt, 300, 128, text_file, None, 3, 16, 7)
    ref = ep.drop_experts(checkpoint.CheckpointReader(ckpt), tokens, ep.ExpertPruning(2), str(tmp_path / "ref"),
                          log=lambda s: None)
    assert rep["layers"] == ref["layers"] and rep["args"]["seed"] == 7
    assert not {"out", "overwrite", "recipe"} & set(rep["args"]) and "recipe" not in rep
    with pytest.raises(OutputError, match="exists"):
        ep.drop_experts(checkpoint.CheckpointReader(ckpt), tokens, ep.ExpertPruning(2), str(tmp_path / "ref"),
                        log=lambda s: None)
    cd = {d: ep.main([*argv, "--condense-layers", "1", "--dtype", d, "--out", str(tmp_path / d)]) for d in ("float32", "bfloat16")}
    assert cd["float32"]["args"]["dtype"] == "float32" and cd["bfloat16"]["args"]["condense_layers"] == 1
    assert cd["float32"]["condensed_layers"] != cd["bfloat16"]["condensed_layers"]


def test_help_opens_with_the_modules_docstring():
    """expert_prune.py --help shows the module's docstring (NAEE, REAP, CD-MoE and their references)."""
    p = ep.build_parser()
    assert p.description == ep.__doc__ and ep.__doc__.strip().split("\n")[0] in p.format_help()
