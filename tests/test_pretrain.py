"""pretrain_tiny.py: sparse upcycling is function-preserving; --init-from refuses a dense checkpoint."""

import dataclasses

import pytest
import torch

import pretrain_tiny as pt
from conftest import random_model, write_checkpoint


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


def test_init_from_a_dense_or_missing_checkpoint_is_an_error(tmp_path):
    src = write_checkpoint(tmp_path / "dense", num_local_experts=1, num_experts_per_tok=1)
    with pytest.raises(SystemExit) as e:
        pt.main(["--init-from", src, "--out", str(tmp_path / "out")])
    assert "not an MoE checkpoint" in str(e.value.code)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        pt.main(["--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "no such checkpoint directory" in str(e.value.code)
    assert not (tmp_path / "out").exists()
