"""pretrain_tiny.py: sparse upcycling is function-preserving; --init-from upcycles a dense checkpoint."""

import dataclasses

import pytest
import torch

import eval_ppl
import pretrain_tiny as pt
from conftest import random_model, script_error


def test_upcycled_moe_computes_the_dense_model():
    # every expert is a copy of the dense FFN and the top-2 gates sum to 1, so the upcycled MoE
    # equals the dense model whatever the fresh router does (Komatsuzaki et al. 2022, Section 3)
    dense = random_model(seed=3, num_local_experts=1, num_experts_per_tok=1)
    moe = pt.upcycle(dense, dataclasses.replace(dense.config, num_local_experts=4, num_experts_per_tok=2), seed=4).eval()
    router = moe.model.layers[0].block_sparse_moe.gate.weight
    assert router.abs().sum() > 0 and moe.config.num_local_experts == 4
    x = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)
    w1 = moe.model.layers[1].block_sparse_moe.experts[3].w1.weight
    assert torch.equal(w1, dense.model.layers[1].block_sparse_moe.experts[0].w1.weight)


def test_batch_load_cv_counts_top1_choices():
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.arange(8) % 4] = 5.0  # two tokens per expert
    assert pt.batch_load_cv(logits) == 0.0
    logits[:, 0] = 9.0  # all top-1 choices on expert 0
    assert pt.batch_load_cv(logits) == pytest.approx(3 ** 0.5)


def test_upcycle_noise_breaks_the_copies_symmetry_but_not_the_function():
    dense = random_model(seed=3, num_local_experts=1, num_experts_per_tok=1)
    cfg = dataclasses.replace(dense.config, num_local_experts=4, num_experts_per_tok=2)
    moe = pt.upcycle(dense, cfg, seed=4, noise=0.01).eval()
    experts = moe.model.layers[0].block_sparse_moe.experts
    w = [e.w1.weight for e in experts]
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - dense.model.layers[0].block_sparse_moe.experts[0].w1.weight).std() / w[0].std()
    assert 0.005 < rel < 0.02  # noise of 1% of the matrix's std
    assert torch.equal(pt.upcycle(dense, cfg, seed=4, noise=0.01).model.layers[0].block_sparse_moe.experts[2].w3.weight,
                       experts[2].w3.weight)  # seeded
    x = torch.randint(0, dense.config.vocab_size, (2, 24))
    with torch.no_grad():
        assert (moe(x) - dense(x)).abs().max() < 0.05 * dense(x).abs().max()


def test_init_from_upcycles_a_dense_checkpoint_and_continues_an_moe_one():
    tc = pt.TrainConfig(num_local_experts=4, num_experts_per_tok=2, upcycle_noise=0.0)
    dense = random_model(seed=3, num_local_experts=1, num_experts_per_tok=1)
    tc = dataclasses.replace(tc, **{f: getattr(dense.config, f) for f in ("vocab_size", "hidden_size",
                                                                           "intermediate_size", "num_hidden_layers")})
    windows = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    moe, stage = pt.start_from(dense, tc, windows)
    assert stage == 3 and moe.config.num_local_experts == 4 and moe.training
    again, stage = pt.start_from(moe, tc, windows)
    assert stage == 4 and again is moe
    fine, stage = pt.start_from(moe, dataclasses.replace(tc, granularity=2, layout="olmoe"), windows)
    assert stage == 5 and fine.config.num_local_experts == 8 and fine.config.model_type == "olmoe"
    assert fine.config.extra["architectures"] == ["OlmoeForCausalLM"]
    assert fine.config.extra["router_aux_loss_coef"] == tc.aux_loss_coef


def test_granular_upcycling_with_renormalised_gates_computes_the_moe():
    """Each expert split into g slices of its hidden units, router rows repeated: a token's top-(g k)
    are its top-k experts' slices, each with 1 / g of its renormalised gate, and the slices' w2 are
    scaled by g, so the fine-grained model is the coarse one."""
    moe = random_model(seed=5)  # 4 experts x 96, top-2
    x = torch.randint(0, moe.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    fine = pt.granular_upcycle(moe, 3, "mixtral", x).eval()
    assert (fine.config.num_local_experts, fine.config.num_experts_per_tok, fine.config.intermediate_size) == (12, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(fine(x), moe(x), rtol=1e-5, atol=1e-5)
    part = fine.model.layers[1].block_sparse_moe.experts[3 * 2 + 1]  # expert 2's second slice
    whole = moe.model.layers[1].block_sparse_moe.experts[2]
    assert torch.equal(part.w1.weight, whole.w1.weight[32:64]) and torch.equal(part.w2.weight, whole.w2.weight[:, 32:64] * 3)


def test_granular_upcycling_into_olmoe_scales_by_the_measured_mass_and_rms():
    """Into OLMoE's form the gates are the softmax's p_e / g: the slices' w2 are scaled by g / m (m the
    layer's mean top-k mass), and the new q/k norms by the mean RMS of each projection's output."""
    moe = random_model(seed=6)
    x = torch.randint(0, moe.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    fine = pt.granular_upcycle(moe, 2, "olmoe", x)
    c = fine.config
    assert (c.model_type, c.norm_topk_prob, c.qk_norm, c.num_local_experts, c.num_experts_per_tok) == (
        "olmoe", False, "projection", 8, 4)
    with torch.no_grad():
        h = moe.model.embed_tokens(x)
        cos, sin = pt.mm.rope_cos_sin(moe.config, 20)
        layer = moe.model.layers[0]
        normed = layer.input_layernorm(h)
        q_rms = layer.self_attn.q_proj(normed).pow(2).mean(-1).sqrt().mean()
        logits = layer.block_sparse_moe.gate(layer.post_attention_layernorm(layer.attend(h, cos, sin)))
        mass = torch.softmax(logits, -1).topk(2, -1).values.sum(-1).mean()
    new = fine.model.layers[0]
    assert torch.allclose(new.self_attn.q_norm.weight, q_rms.expand(c.num_attention_heads * c.dim_head), rtol=1e-5)
    torch.testing.assert_close(new.block_sparse_moe.experts[1].w2.weight,
                               layer.block_sparse_moe.experts[0].w2.weight[:, 48:] * (2 / mass), rtol=1e-5, atol=0)
    assert torch.equal(new.block_sparse_moe.gate.weight[4:6], layer.block_sparse_moe.gate.weight[2].expand(2, -1))


def test_granularity_that_does_not_divide_the_width_is_an_error():
    moe = random_model(seed=6)  # experts 96 wide
    with pytest.raises(pt.data.DataError, match="--granularity 5 does not divide the experts' width 96"):
        pt.start_from(moe, pt.TrainConfig(granularity=5), torch.zeros(1, 4, dtype=torch.long))


def test_init_from_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    line = script_error(capsys, pt.main, ["--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "no such checkpoint directory" in line
    assert not (tmp_path / "out").exists()


def test_load_balancing_loss_and_load_cv():
    uniform = [torch.zeros(64, 8)]  # equal logits: topk picks arbitrary experts but probs are uniform
    assert pt.load_balancing_loss(uniform, 2).item() == pytest.approx(2.0)  # sum_k f = 2 (k slots), P = 1/8
    collapsed = torch.full((64, 8), -10.0)
    collapsed[:, 0] = 10.0
    assert pt.load_balancing_loss([collapsed], 2).item() > 4.0
    # two layers that each collapse onto a different expert: pooled, the two layers look balanced
    # between experts 0 and 1; per layer (Switch's form) each layer is collapsed and pays for it.
    a = torch.full((64, 2), -10.0)
    a[:, 0] = 10.0
    b = a.flip(1)
    pooled = pt.load_balancing_loss([a, b], 1).item()
    assert pooled == pytest.approx(1.0, abs=1e-3)  # f = P = [1/2, 1/2]: the balanced value
    assert pt.load_balancing_loss([a, b], 1, per_layer=True).item() == pytest.approx(2.0, abs=1e-3)
    assert pt.load_balancing_loss([a], 1, per_layer=True).item() == pytest.approx(pt.load_balancing_loss([a], 1).item())
    assert eval_ppl.expert_load_cv(torch.tensor([5, 5, 5, 5])) == 0.0
    assert eval_ppl.expert_load_cv(torch.tensor([8, 0, 0, 0])) == pytest.approx(3 ** 0.5)  # sqrt(n - 1)
