"""The shipped embedded models: the real loading code, the tokenizer and the protocol on real weights."""

import json
import os

import pytest
import torch

import data
import eval_ppl
import checkpoint

MODEL = data.SHIPPED_MODEL
MODELS = [data.SHIPPED_MODEL, data.DECISIVE_MODEL, data.FINE_GRAINED_MODEL]  # all committed; none may go missing


def test_the_default_model_is_the_shipped_one():
    assert data.default_model_dir() == MODEL != data.DECISIVE_MODEL


@pytest.mark.parametrize("model", MODELS)
def test_shipped_model_is_an_official_layout_half_precision_checkpoint(model):
    reader = checkpoint.CheckpointReader(model)  # checks every key and shape against config.json
    assert reader.stored_dtype() == torch.float16
    size = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model))
    assert size < 40 * 2**20
    ids = data.load_tokenizer(model).encode("def f(x):\n    return x\n").ids
    assert max(ids) < reader.config.vocab_size


@pytest.mark.parametrize("model", MODELS)
def test_shipped_model_reproduces_its_report(model):
    report = json.load(open(os.path.join(model, "report.json")))
    assert report["corpus"] == data.corpus_id()  # the shipped snapshot, whatever Python runs this
    ids = data.encode(data.load_tokenizer(model), data.stdlib_text("eval"))
    windows = data.eval_windows(ids, report["train_config"]["seqlen"])
    # the windows the report names; the shipped models' reports were written on the first 64
    windows = windows[report.get("eval_window_indices", list(range(report["eval_windows"])))]
    ppl = eval_ppl.perplexity(checkpoint.load_model(model), windows)
    assert ppl == pytest.approx(report["ppl"], rel=1e-4)
    assert ppl < report["unigram_ppl"] / 5


@pytest.mark.parametrize("model", MODELS)
def test_shipped_model_matches_transformers(model):
    transformers = pytest.importorskip("transformers")
    idx = torch.randint(0, 4096, (1, 64), generator=torch.Generator().manual_seed(0))
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()  # its family's class
    with torch.no_grad():
        assert (hf(idx).logits - checkpoint.load_model(model)(idx)).abs().max() <= 1e-4


@pytest.mark.parametrize("model", MODELS)
def test_shipped_model_experts_are_balanced(model):
    # MoE-Pruner Eq. 4-5: the CV of top-1 expert counts is <= 0.5 in every layer on the calibration
    # split, and no expert is (nearly) dead: none under a sixth of the even share of top-1 choices
    # (a model trained with the pooled loss had a CV of 1.66)
    tok = data.load_tokenizer(model)
    windows = data.calibration_windows(data.encode(tok, data.stdlib_text("calib")), 32, 512, seed=0)
    with torch.no_grad():
        stats = eval_ppl.router_stats(checkpoint.load_model(model), windows)
    assert len(stats) == 4
    # a top-8 router is balanced over all 8 of each token's experts; its top-1 choices, which Eq. 4-5
    # count, among 32 experts spread less evenly than a top-2 router's among 8
    bound = 0.6 if model == data.FINE_GRAINED_MODEL else 0.5
    for s in stats:
        assert s["load_cv"] <= bound, s
        assert min(s["top1_counts"]) > sum(s["top1_counts"]) / len(s["top1_counts"]) / 6  # no dead expert


def test_the_decisive_model_routes_decisively():
    """models/tiny-mixtral-decisive: the router puts >= 60% of its probability on the two chosen
    experts in every layer (the shipped model: 35-44%)."""
    tok = data.load_tokenizer(data.DECISIVE_MODEL)
    windows = data.calibration_windows(data.encode(tok, data.stdlib_text("calib")), 16, 512, seed=0)
    with torch.no_grad():
        stats = eval_ppl.router_stats(checkpoint.load_model(data.DECISIVE_MODEL), windows)
    assert all(s["topk_mass"] >= 0.6 for s in stats), [s["topk_mass"] for s in stats]


def test_the_fine_grained_model_is_an_olmoe_with_the_others_active_parameters():
    """models/tiny-olmoe: 32 experts, top-8, gates not renormalised, q/k norms over the projections,
    in OLMoE's layout; per token as many expert parameters as the others' top-2 of 8, and as many in all."""
    fine, coarse = checkpoint.read_config(data.FINE_GRAINED_MODEL), checkpoint.read_config(data.SHIPPED_MODEL)
    assert (fine.model_type, fine.norm_topk_prob, fine.qk_norm) == ("olmoe", False, "projection")
    assert (fine.num_local_experts, fine.num_experts_per_tok) == (32, 8)
    assert fine.num_experts_per_tok * fine.intermediate_size == coarse.num_experts_per_tok * coarse.intermediate_size
    assert fine.num_local_experts * fine.intermediate_size == coarse.num_local_experts * coarse.intermediate_size
    keys = checkpoint.CheckpointReader(data.FINE_GRAINED_MODEL).file_keys.values()
    assert "model.layers.3.mlp.experts.31.down_proj.weight" in keys and "model.layers.0.self_attn.q_norm.weight" in keys
