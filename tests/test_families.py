"""OLMoE's and Qwen3-MoE's checkpoints: logits against transformers' OlmoeForCausalLM and
Qwen3MoeForCausalLM on checkpoints that transformers writes, the name map both ways, and every
script on a fine-grained checkpoint of each family (more experts, top-4, OLMoE's gates not
renormalised)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import checkpoint
import data
import distill
import eval_ppl
import expert_prune as ep
import mini_mixtral as mm
import prune
import sparse24
import variants
import zeroshot
from conftest import random_model, script_error, small_tokenizer, write_checkpoint

# a fine-grained model of each family: 16 experts, top-4 (the small Mixtral has 4, top-2)
FAMILIES = {
    "olmoe": dict(qk_norm="projection", norm_topk_prob=False, num_local_experts=16, num_experts_per_tok=4,
                  intermediate_size=32, extra={"model_type": "olmoe"}),
    "qwen3_moe": dict(qk_norm="head", norm_topk_prob=True, head_dim=16, num_local_experts=16, num_experts_per_tok=4,
                      intermediate_size=32, extra={"model_type": "qwen3_moe"}),
}


def family_model(family, seed=0, **overrides):
    """A random model of the family, its q/k norms not all ones (so that they matter)."""
    m = random_model(seed=seed, **{**FAMILIES[family], **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return m


@pytest.fixture(params=sorted(FAMILIES))
def family_ckpt(request, tmp_path):
    return write_checkpoint(tmp_path / request.param, family_model(request.param))


# --- against transformers ------------------------------------------------------------------------

HF = {  # transformers' config and model classes, and a config of each family with the switch under test
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=8, num_experts_per_tok=3, intermediate_size=24)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24, intermediate_size=40,
                       head_dim=16, rms_norm_eps=1e-6)),
}


def hf_checkpoint(tmp_path, family, **overrides):
    """A small random checkpoint that transformers writes in the published layout (per-expert keys),
    its norms randomised, with a tokenizer beside it; returns (path, transformers' model)."""
    transformers = pytest.importorskip("transformers")
    config_class, model_class, kw = HF[family]
    cfg = getattr(transformers, config_class)(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=128, eos_token_id=0, **{**kw, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path / f"hf-{family}"
    hf.save_pretrained(path)
    (path / "tokenizer.json").write_text(small_tokenizer(300).to_str())
    return str(path), hf


@pytest.mark.parametrize("family,norm_topk_prob", [("olmoe", False), ("olmoe", True), ("qwen3_moe", True),
                                                    ("qwen3_moe", False)])
def test_logits_match_transformers_both_ways(tmp_path, family, norm_topk_prob):
    path, hf = hf_checkpoint(tmp_path, family, norm_topk_prob=norm_topk_prob)
    ours = checkpoint.load_model(path)
    assert ours.config.model_type == family and ours.config.norm_topk_prob == norm_topk_prob
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(idx).logits
        assert ours(idx).abs().max() > 0.1
        assert (ours(idx) - theirs).abs().max().item() <= 1e-5
    # written back by this project, in the family's own names: transformers reads it to the same logits
    checkpoint.save_model(ours, str(tmp_path / "ours"))
    again = type(hf).from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, theirs)
    names = lambda p: set(checkpoint.CheckpointReader(str(p)).file_keys.values())
    assert names(tmp_path / "ours") == names(path) and any(".mlp.experts.3.gate_proj." in k for k in names(path))
    written = json.load(open(tmp_path / "ours" / "config.json"))
    assert written["model_type"] == family and "qk_norm" not in written and written["norm_topk_prob"] == norm_topk_prob


@pytest.mark.parametrize("family", sorted(HF))
def test_prune_and_eval_ppl_on_a_checkpoint_transformers_wrote(tmp_path, family, text_file):
    """prune.py and eval_ppl.py on the family's checkpoint as transformers writes it: the pruned
    checkpoint is the family's, and transformers computes the same logits from it as this model."""
    path, hf = hf_checkpoint(tmp_path, family)
    out = str(tmp_path / "pruned")
    prune.main(["--model", path, "--method", "moe-pruner", "--nm", "2:4", "--calib-data", text_file, "--nsamples",
                "4", "--seqlen", "32", "--out", out])
    ours = checkpoint.load_model(out)
    theirs = type(hf).from_pretrained(out).eval()
    idx = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(idx) - theirs(idx).logits).abs().max().item() <= 1e-5
    w = theirs.state_dict()["model.layers.1.mlp.experts.gate_up_proj"] if hasattr(theirs.model.layers[1].mlp.experts,
                                                                                   "gate_up_proj") else None
    assert w is None or (w == 0).float().mean() == 0.5  # transformers' fused experts hold the 2:4 zeros
    report = str(tmp_path / "ppl.json")
    eval_ppl.main(["--model", path, out, "--eval-data", text_file, "--seqlen", "32", "--json", report])
    dense, pruned = json.load(open(report))
    windows, _, _ = eval_ppl.evaluation_windows(path, text_file, seqlen=32)  # the windows eval_ppl.py scored
    with torch.no_grad():
        nll = torch.cat([mm.next_token_nll(hf(w[None]).logits, w[None], reduction="none") for w in windows])
    assert dense["ppl"] == pytest.approx(nll.mean().exp().item(), rel=1e-5)  # transformers' perplexity
    assert pruned["ppl"] != dense["ppl"]


def test_the_switches_change_the_output():
    """Parity could pass with a switch ignored only if it never mattered: each one does."""
    idx = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(3))
    m = family_model("olmoe")
    with torch.no_grad():
        base = m(idx)
        m.model.layers[0].self_attn.q_norm.weight.mul_(2.0)  # the q norm is applied
        assert (m(idx) - base).abs().max() > 1e-3
        m = family_model("olmoe")
        for layer in m.model.layers:
            layer.block_sparse_moe.renormalise = True
        assert (m(idx) - base).abs().max() > 1e-3


def test_gates_not_renormalised_are_the_softmax_probabilities():
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(4))
    w, e = mm.route(logits, 4, renormalise=False)
    probs = torch.softmax(logits, -1)
    assert torch.equal(w, probs.gather(1, e)) and (w.sum(-1) < 1).all()
    wn, en = mm.route(logits, 4)
    assert torch.equal(e, en) and torch.allclose(wn, w / w.sum(-1, keepdim=True))


def test_eq9_weights_by_the_models_own_gate():
    """The observer hands pruning (Eq. 9) the gate the model weights each expert's output by: for
    OLMoE the softmax probability itself, not renormalised over the top-k."""
    m = family_model("olmoe")
    block = m.model.layers[0].block_sparse_moe
    x = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(5))
    probs = torch.softmax(block.gate(x[0]), -1)  # [30, 16]
    seen = []
    with torch.no_grad():
        block(x, seen.append)
    assert sum(len(c.tokens) for c in seen) == 30 * 4
    for c in seen:
        assert torch.allclose(c.gate, probs[c.tokens, c.expert], rtol=1e-6, atol=0)


@pytest.mark.parametrize("key,value", [("clip_qkv", 8.0), ("attention_bias", True), ("mlp_only_layers", [0]),
                                       ("decoder_sparse_step", 2)])
def test_a_decoder_the_model_does_not_build_is_a_one_line_error(family_ckpt, key, value, capsys):
    cfg = json.load(open(os.path.join(family_ckpt, "config.json")))
    json.dump({**cfg, key: value}, open(os.path.join(family_ckpt, "config.json"), "w"))
    msg = script_error(capsys, eval_ppl.main, ["--model", family_ckpt, "--eval-windows", "1"])
    assert f"{key} {value!r} is not supported" in msg


def test_qwen3_reads_the_published_expert_keys_and_keeps_its_dense_width(tmp_path):
    path, _ = hf_checkpoint(tmp_path, "qwen3_moe")
    cfg = json.load(open(os.path.join(path, "config.json")))
    published = {k: v for k, v in cfg.items() if k != "num_local_experts"}
    published["num_experts"] = 8  # the key of Qwen3-30B-A3B's config.json
    json.dump(published, open(os.path.join(path, "config.json"), "w"))
    c = checkpoint.read_config(path)
    assert (c.num_local_experts, c.intermediate_size, c.extra["dense_intermediate_size"]) == (8, 24, 40)
    out = checkpoint.config_json(c)
    assert (out["num_experts"], out["moe_intermediate_size"], out["intermediate_size"]) == (8, 24, 40)


# --- every script on them ------------------------------------------------------------------------


def tensors(path):
    r = checkpoint.CheckpointReader(path)
    return {k: r.get(k) for k in r.weight_map}


@pytest.mark.parametrize("method,extra", [("moe-pruner", ()), ("wanda", ("--nm", "2:4")), ("magnitude", ()),
                                          ("sparsegpt", ("--nm", "2:4", "--prune-attention")),
                                          ("wanda", ("--stats-tokens", "all", "--group", "matrix")),
                                          ("moe-pruner", ("--dense-forward", "--batch-size", "2"))])
def test_prune_writes_the_familys_layout_at_the_asked_sparsity(tmp_path, family_ckpt, text_file, method, extra):
    out = str(tmp_path / "out")
    prune.main(["--model", family_ckpt, "--method", method, "--calib-data", text_file, "--nsamples", "6",
                "--seqlen", "32", "--out", out, *extra])
    before, after = tensors(family_ckpt), tensors(out)
    assert checkpoint.read_config(out).to_dict() == checkpoint.read_config(family_ckpt).to_dict()
    assert set(checkpoint.CheckpointReader(out).file_keys.values()) == set(
        checkpoint.CheckpointReader(family_ckpt).file_keys.values())
    for k, v in before.items():
        if ".experts." in k:
            assert (after[k] == 0).float().mean() == 0.5, k
            if method != "sparsegpt":  # SparseGPT updates the weights it keeps (OBS)
                assert torch.equal(after[k], v.masked_fill(after[k] == 0, 0)), k
        elif ".self_attn." in k and k.endswith("_proj.weight") and "--prune-attention" in extra:
            assert (after[k] == 0).float().mean() == 0.5, k
        else:
            assert torch.equal(after[k], v), k  # the router and the q/k norms among them


def test_moe_pruner_differs_from_wanda_where_gates_vary(tmp_path, family_ckpt, text_file):
    outs = {}
    for method in ("moe-pruner", "wanda"):
        prune.main(["--model", family_ckpt, "--method", method, "--calib-data", text_file, "--nsamples", "6",
                    "--seqlen", "32", "--out", str(tmp_path / method)])
        outs[method] = tensors(str(tmp_path / method))
    assert any(not torch.equal(outs["moe-pruner"][k] == 0, outs["wanda"][k] == 0) for k in outs["wanda"])


def test_eval_ppl_and_router_statistics(tmp_path, family_ckpt):
    out = str(tmp_path / "ppl.json")
    eval_ppl.main(["--model", family_ckpt, "--eval-windows", "2", "--seqlen", "32", "--router-stats", "--json", out])
    r = json.load(open(out))  # one model: one object
    model = checkpoint.load_model(family_ckpt)
    assert np.isfinite(r["ppl"]) and r["ppl"] > 1
    for layer in r["router"]:
        assert 0 < layer["gate_entropy"] <= 1 and layer["expert_gate_cv"] > 0
        assert len(layer["top1_counts"]) == 16
        if not model.config.norm_topk_prob:  # OLMoE's top-1 gate is a probability over all 16 experts
            assert layer["top1_gate_mean"] < layer["topk_mass"]


def test_router_statistics_of_the_gates_by_hand():
    """gate_entropy and expert_gate_cv from their definitions, token by token and expert by expert."""
    m = family_model("olmoe", num_hidden_layers=1)
    windows = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, (logits,) = m(windows, return_router_logits=True)
    w, e = mm.route(logits, 4, renormalise=False)
    share = w / w.sum(-1, keepdim=True)
    entropy = (-(share * share.log()).sum(-1) / np.log(4)).mean().item()
    cvs, counts = [], []
    for x in range(16):
        g = w[e == x].double()
        if len(g) > 1:
            cvs.append((g.std(unbiased=False) / g.mean()).item())
            counts.append(len(g))
    cv = float(np.average(cvs, weights=counts))
    stats = eval_ppl.router_stats(m, windows)[0]
    assert stats["gate_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert stats["expert_gate_cv"] == pytest.approx(cv, rel=1e-4)


def test_distill_both_modes(tmp_path, family_ckpt, text_file):
    student = str(tmp_path / "student")
    prune.main(["--model", family_ckpt, "--method", "wanda", "--calib-data", text_file, "--nsamples", "4",
                "--seqlen", "16", "--out", student])
    for mode in ("per-expert", "full"):
        out = str(tmp_path / f"kd-{mode}")
        distill.main(["--teacher", family_ckpt, "--student", student, "--calib-data", text_file, "--nsamples", "8",
                      "--seqlen", "16", "--epochs", "1", "--lr", "1e-3", "--batch-size", "4", "--mode", mode,
                      "--out", out])
        kd, st = tensors(out), tensors(student)
        assert checkpoint.read_config(out).model_type == checkpoint.read_config(family_ckpt).model_type
        changed = [k for k in kd if not torch.equal(kd[k], st[k])]
        assert any(".experts." in k for k in changed), mode
        assert all(torch.equal(kd[k] == 0, st[k] == 0) for k in kd if ".experts." in k), mode  # masks kept


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse24_stores_and_loads_the_familys_matrices(tmp_path, family, text_file):
    ck = write_checkpoint(tmp_path / "ck", family_model(family, intermediate_size=128))  # shapes the kernels take
    pruned, packed = str(tmp_path / "p"), str(tmp_path / "packed")
    prune.main(["--model", ck, "--method", "wanda", "--nm", "2:4", "--calib-data", text_file,
                "--nsamples", "4", "--seqlen", "16", "--out", pruned])
    rep = sparse24.main(["--model", pruned, "--save", packed])
    assert rep["model"]["converted_matrices"] == 2 * 16 * 3
    dense = checkpoint.load_model(pruned, torch.float16)  # a float32 checkpoint compresses to float16
    loaded = sparse24.load_compressed(packed)
    idx = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(loaded(idx), dense(idx))
    keys = json.load(open(os.path.join(packed, "model.safetensors.index.json")))["weight_map"] if os.path.isfile(
        os.path.join(packed, "model.safetensors.index.json")) else checkpoint.CheckpointReader(
        packed, layout=sparse24.compressed_layout(checkpoint.read_config(packed))).file_keys.values()
    assert any(".mlp.experts.0.down_proj." in k for k in keys) and not any("block_sparse_moe" in k for k in keys)


def test_expert_level_methods_on_sixteen_experts(tmp_path, family_ckpt, text_file, capsys):
    common = ["--model", family_ckpt, "--calib-data", text_file, "--nsamples", "2", "--seqlen", "16"]
    for select in ("naee", "reap"):
        out = str(tmp_path / select)
        rep = ep.main([*common, "--keep-experts", "12", "--select", select, "--out", out])
        assert checkpoint.read_config(out).num_local_experts == 12
        assert checkpoint.read_config(out).model_type == checkpoint.read_config(family_ckpt).model_type
        if select == "naee":  # C(16, 12) = 1820 subsets: every one is tried
            assert {l["search"] for l in rep["layers"]} == {"exhaustive"} and rep["layers"][0]["subsets"] == 1820
        eval_ppl.main(["--model", out, "--eval-windows", "1", "--seqlen", "16"])
    out = str(tmp_path / "cd")
    ep.main([*common, "--condense-layers", "1", "--condense-experts", "4", "--out", out])
    assert np.isfinite(eval_ppl.perplexity(variants.load_model(out), torch.randint(0, 300, (1, 16))))
    msg = script_error(capsys, ep.main, [*common, "--skip", "--out", str(tmp_path / "skip")])
    assert "dynamic skipping is defined for top-2 routing; this model routes to 4" in msg


def test_naee_on_sixty_four_experts_is_a_greedy_search(tmp_path, text_file):
    """C(64, 56) = 4.4e9 subsets cannot be tried: 8 rounds, each dropping the expert whose removal
    changes the layer output least, 64 + 63 + ... + 57 subsets in all."""
    ck = write_checkpoint(tmp_path / "ck", family_model("olmoe", num_local_experts=64, num_experts_per_tok=8,
                                                        intermediate_size=8))
    rep = ep.main(["--model", ck, "--calib-data", text_file, "--nsamples", "2", "--seqlen", "16", "--keep-experts",
                   "56", "--out", str(tmp_path / "o")])
    for layer in rep["layers"]:
        assert layer["search"] == "greedy" and layer["subsets"] == sum(range(57, 65)) and len(layer["keep"]) == 56


def test_greedy_search_keeps_what_exhaustive_keeps_when_one_expert_goes():
    """Dropping one expert, greedy elimination is the exhaustive search: the same subset, the same error."""
    m = family_model("olmoe", num_local_experts=6, num_experts_per_tok=2)
    layer = m.model.layers[0]
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(8))
    cos, sin = mm.rope_cos_sin(m.config, 8)
    pos = ep.Positions(cos, sin, None)
    exhaustive = ep.naee_keep(layer, x, pos, 5, 2)
    old, ep.NAEE_SUBSETS = ep.NAEE_SUBSETS, 0
    try:
        greedy = ep.naee_keep(layer, x, pos, 5, 2)
    finally:
        ep.NAEE_SUBSETS = old
    assert (exhaustive["search"], greedy["search"]) == ("exhaustive", "greedy")
    assert greedy["keep"] == exhaustive["keep"] and greedy["error"] == exhaustive["error"]


def test_prune_and_distill_on_two_ranks_match_one_process(tmp_path, text_file):
    """torchrun on an OLMoE checkpoint: the same masks as one process, and full distillation's
    checkpoint within float32's reordering of the same sums."""
    from test_distributed import single, torchrun
    ck = write_checkpoint(tmp_path / "ck", family_model("olmoe"))
    argv = ["--model", ck, "--calib-data", text_file, "--nsamples", "6", "--seqlen", "16", "--batch-size", "2",
            "--device", "cpu", "--method", "moe-pruner"]
    single("prune.py", [*argv, "--out", str(tmp_path / "one")])
    r, _ = torchrun("prune.py", [*argv, "--out", str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr
    one, two = tensors(str(tmp_path / "one")), tensors(str(tmp_path / "two"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    kd = ["--teacher", ck, "--student", str(tmp_path / "one"), "--calib-data", text_file, "--nsamples", "4",
          "--seqlen", "16", "--epochs", "1", "--lr", "1e-3", "--batch-size", "4", "--device", "cpu"]
    single("distill.py", [*kd, "--out", str(tmp_path / "kd-one")])
    r, _ = torchrun("distill.py", [*kd, "--out", str(tmp_path / "kd-two")], tmp_path)
    assert r.returncode == 0, r.stderr
    a, b = tensors(str(tmp_path / "kd-one")), tensors(str(tmp_path / "kd-two"))
    assert checkpoint.read_config(str(tmp_path / "kd-two")).model_type == "olmoe"
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


@pytest.mark.skipif(not zeroshot.HAVE_LM_EVAL, reason="lm-eval is an optional extra (pip install -r requirements-eval.txt)")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zeroshot_runs_lm_eval_on_the_family(tmp_path, family):
    """lm-eval's hf model loads the family's checkpoint through transformers (whose logits the
    tests above equal) and scores the local task on it."""
    ck = write_checkpoint(tmp_path / "ck", family_model(family, vocab_size=4096), tokenizer=False)
    shutil.copy(os.path.join(data.SHIPPED_MODEL, "tokenizer.json"), ck)
    r = zeroshot.evaluate(ck, limit=4)
    assert 0.0 <= r["acc"] <= 1.0 and r["model"] == ck
