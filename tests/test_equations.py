"""Each equation pinned by value and direction: small cases whose expected output is computed by
hand or by an obviously-correct slow loop written here (never a call into the code under test),
and cases on which the plausible wrong readings of the paper give a different answer.

The invariance tests elsewhere (unit gates give Wanda, scaling an expert's gates changes nothing)
hold for every monotone transform of the score; these do not.
"""

import itertools
import math

import pytest
import torch

import data
import distill
import eval_ppl
import expert_prune as ep
import mini_mixtral as mm
import pretrain_tiny as pt
import prune
import variants
from conftest import expert_mse, random_model


def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# --- Eq. 2: the router ----------------------------------------------------------------------


def test_route_is_softmax_topk_renormalised():
    logits = [[2.0, 1.0, 0.5, -1.0], [0.1, 0.3, 0.2, 0.0], [-3.0, 4.0, 4.5, 0.0]]
    w, e = mm.route(torch.tensor(logits), 2)
    for t, row in enumerate(logits):
        p = softmax(row)
        top = sorted(range(4), key=lambda i: -p[i])[:2]
        assert e[t].tolist() == top
        for k in range(2):
            assert w[t, k].item() == pytest.approx(p[top[k]] / (p[top[0]] + p[top[1]]), rel=1e-6)
    # renormalised: the raw softmax probabilities of the two would be 0.5761 and 0.2119 for token 0
    assert w[0].tolist() == pytest.approx([0.7311, 0.2689], abs=1e-4)


# --- Eq. 4-5: expert-load coefficient of variation -------------------------------------------


def test_load_cv_is_population_std_over_mean():
    # counts 1, 2, 3, 6: mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5
    assert eval_ppl.expert_load_cv(torch.tensor([1, 2, 3, 6])) == pytest.approx(math.sqrt(3.5) / 3, rel=1e-12)
    # the sample std (n - 1) would give sqrt(14 / 3) / 3 = 0.7201; the population one is 0.6236
    assert eval_ppl.expert_load_cv(torch.tensor([1, 2, 3, 6])) == pytest.approx(0.6236, abs=1e-4)


# --- Eq. 8 / 9: statistics and score ----------------------------------------------------------


def slow_sq_norm(x, gate=None):
    rows, cols = len(x), len(x[0])
    return [sum((x[t][j] * (gate[t] if gate is not None else 1.0)) ** 2 for t in range(rows)) for j in range(cols)]


def test_sq_norm_is_the_sum_over_tokens_of_gated_squares():
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    assert prune.sq_norm(x, gate).tolist() == pytest.approx(slow_sq_norm(x.tolist(), gate.tolist()), rel=1e-12)
    assert prune.sq_norm(x).tolist() == pytest.approx(slow_sq_norm(x.tolist()), rel=1e-12)
    # by hand: one token [1, 2] with gate 0.5 -> [0.25, 1.0]; with sqrt(gate) it would be [0.5, 2.0]
    assert prune.sq_norm(torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])).tolist() == [0.25, 1.0]


def test_activation_score_is_abs_weight_times_norm():
    w = torch.tensor([[-2.0, 1.0, 0.5], [0.0, -3.0, 4.0]])
    sq = torch.tensor([4.0, 9.0, 0.25], dtype=torch.float64)  # norms 2, 3, 0.5
    expect = [[abs(w[i, j].item()) * math.sqrt(sq[j].item()) for j in range(3)] for i in range(2)]
    assert prune.activation_score(w, sq).tolist() == expect == [[4.0, 3.0, 0.25], [0.0, 9.0, 2.0]]


def mask_from(method, w, x, gate, sparsity=0.5):
    s = prune.InputStats(method)
    s.add(x, gate)
    pruned, _ = prune.prune_matrix(w, method, s, sparsity)
    return (pruned == 0).tolist()


def one_token_per_column(a, b, ga, gb):
    """Column 0 sees only value a (gate ga), column 1 only value b (gate gb)."""
    return torch.tensor([[a, 0.0], [0.0, b]]), torch.tensor([ga, gb])


def test_eq9_gate_not_sqrt_gate_nor_gate_squared_nor_no_gate():
    w = torch.ones(1, 2)
    # scores |x_j| f(g_j) with a = 1, b = 3: Eq. 9 (f = g) 1.00 vs 0.75 prunes column 1;
    # sqrt(g) 1.0 vs 1.5 and no gate (Wanda) 1 vs 3 prune column 0
    x, gate = one_token_per_column(1.0, 3.0, 1.0, 0.25)
    assert mask_from("moe-pruner", w, x, gate) == [[False, True]]
    assert mask_from("wanda", w, x, gate) == [[True, False]]
    # gate 1 and 0.5: Eq. 9 gives 1 vs 1.5 (prune column 0); g^2 would give 1 vs 0.75 (prune column 1)
    x, gate = one_token_per_column(1.0, 3.0, 1.0, 0.5)
    assert mask_from("moe-pruner", w, x, gate) == [[True, False]]


def test_norm_not_squared_norm():
    # |W| = 4, 1 and ||X_j|| = 1, 3: |W| ||X|| = 4 vs 3 prunes column 1; |W| ||X||^2 = 4 vs 9 would prune column 0
    w = torch.tensor([[4.0, 1.0]])
    x, gate = one_token_per_column(1.0, 3.0, 1.0, 1.0)
    assert mask_from("wanda", w, x, None) == [[False, True]]
    assert mask_from("moe-pruner", w, x, gate) == [[False, True]]


def test_renormalised_gate_not_raw_probability():
    """Expert 0 gets token A (logits 0, 0, -20, -20: raw probability 0.5, renormalised 0.5) and
    token B (logits 0.1, -1, 0, -1: raw 0.389, renormalised over its top 2 0.525). A feeds only
    column 0 (value 0.9), B only column 1 (value 1): with renormalised gates the scores are 0.45
    vs 0.525 and column 0 is pruned; raw probabilities (0.45 vs 0.389) would prune column 1."""
    logits = torch.tensor([[0.0, 0.0, -20.0, -20.0], [0.1, -1.0, 0.0, -1.0]])
    w, e = mm.route(logits, 2)
    assert 0 in e[0].tolist() and 0 in e[1].tolist()  # both tokens routed to expert 0
    g = torch.tensor([w[t, e[t].tolist().index(0)].item() for t in range(2)])  # expert 0's gate of each token
    raw = [softmax(r)[0] for r in logits.tolist()]
    assert g.tolist() == pytest.approx([0.5, raw[1] / (raw[1] + softmax(logits[1].tolist())[2])], rel=1e-6)
    assert raw[1] == pytest.approx(0.389, abs=1e-3) and g[1].item() == pytest.approx(0.525, abs=1e-3)
    x = torch.tensor([[0.9, 0.0], [0.0, 1.0]])
    assert mask_from("moe-pruner", torch.ones(1, 2), x, g) == [[True, False]]
    assert mask_from("moe-pruner", torch.ones(1, 2), x, torch.tensor(raw)) == [[False, True]]  # the wrong reading
    # through the real block: the observer hands pruning exactly route()'s renormalised weights
    m = random_model()
    block = m.model.layers[0].block_sparse_moe
    h = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(2))
    seen = {}
    with torch.no_grad():
        _, rl = block(h, observer=lambda c: seen.update({(c.expert, t): g for t, g in zip(c.tokens.tolist(),
                                                                                         c.gate.tolist())}))
    ww, ee = mm.route(rl, 2)
    for t in range(9):
        for k in range(2):
            assert seen[(ee[t, k].item(), t)] == ww[t, k].item()


def test_row_group_not_matrix_group():
    score = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert prune.unstructured_mask(score, 0.5).tolist() == [[True, False], [True, False]]  # a per-matrix threshold: [[T, T], [F, F]]


# --- masks: direction ---------------------------------------------------------------------------


def test_masks_are_boolean_and_ties_are_broken_by_the_lower_index():
    tied = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m = prune.unstructured_mask(tied, 0.5)
    assert m.dtype == torch.bool and m.tolist() == [[True, True, False, False], [False, True, True, False],
                                                    [True, True, False, False]]  # one below the tie, one tie
    none = prune.unstructured_mask(tied, 0.1)  # floor(0.4) = 0 pruned per row
    assert none.dtype == torch.bool and none.shape == tied.shape and not none.any()
    assert prune.nm_mask(tied, 2, 4).dtype == torch.bool


def test_unstructured_mask_prunes_the_lowest_scores_of_each_row():
    g = torch.Generator().manual_seed(3)
    for rows, cols, s in [(3, 10, 0.5), (5, 7, 0.3), (2, 16, 0.75)]:
        score = torch.rand(rows, cols, generator=g, dtype=torch.float64)
        mask = prune.unstructured_mask(score, s)
        k = int(cols * s)
        for i in range(rows):
            order = sorted(range(cols), key=lambda j: score[i, j].item())
            assert [j for j in range(cols) if mask[i, j]] == sorted(order[:k])  # the k lowest, by an independent sort


def slow_nm(score, n, m):
    rows, cols = score.shape
    out = [[True] * cols for _ in range(rows)]
    for i in range(rows):
        for g in range(0, cols, m):
            best = sorted(range(g, g + m), key=lambda j: -score[i, j].item())[:n]
            for j in best:
                out[i][j] = False
    return out


def test_nm_ties_keep_the_lower_index():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
    assert prune.nm_mask(score, 2, 4).tolist() == [[False, False, True, True, False, True, True, False]]


def test_nm_keeps_the_n_highest_of_every_group():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    assert prune.nm_mask(score, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]
    g = torch.Generator().manual_seed(4)
    for n, m in [(2, 4), (1, 4), (4, 8), (3, 8)]:
        score = torch.rand(3, 16, generator=g, dtype=torch.float64)
        assert prune.nm_mask(score, n, m).tolist() == slow_nm(score, n, m)


def test_a_weight_whose_column_carries_larger_gated_activations_survives():
    """Equal weights; column 1's tokens are larger but carry small gates: Eq. 9 keeps column 0
    where Wanda (ungated) keeps column 1."""
    w = torch.ones(2, 2)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    gate = torch.tensor([0.9, 0.2, 0.2])  # column 0: ||x g|| = 0.9; column 1: sqrt(2 * 0.4^2) = 0.566
    assert mask_from("moe-pruner", w, x, gate) == [[False, True], [False, True]]
    assert mask_from("wanda", w, x, None) == [[True, False], [True, False]]


# --- SparseGPT ------------------------------------------------------------------------------


def test_hessian_and_magnitude_score_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert prune.hessian(x).tolist() == [[10.0, -1.0], [-1.0, 5.0]]  # X^T X, no 2/n factor
    assert prune.magnitude_score(torch.tensor([[-2.0, 0.5]])).tolist() == [[2.0, 0.5]]


def slow_sparsegpt(w, H, sparsity, nm=None, blocksize=None, percdamp=0.01):
    """OBS one column at a time, every later column updated at once (no lazy batching); the
    unstructured mask chosen per block of blocksize columns by w^2 / U_jj^2 on the current
    weights (ties to the lower flat index), the N:M mask at each group's first column; U the upper
    Cholesky factor of (H + damp)^-1; inputs never seen (H_jj = 0) have their weights zeroed."""
    W, H = w.double().clone(), H.double().clone()
    rows, cols = W.shape
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * H.diagonal().mean() * torch.eye(cols, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    bs = blocksize or cols
    mask = torch.zeros_like(W, dtype=torch.bool)
    for b in range(0, cols, bs):
        e = min(b + bs, cols)
        if nm is None:
            sal = (W[:, b:e] ** 2 / U.diagonal()[b:e][None, :] ** 2).reshape(-1).tolist()
            k = int(len(sal) * sparsity)
            for t in sorted(range(len(sal)), key=lambda t: sal[t])[:k]:
                mask[t // (e - b), b + t % (e - b)] = True
        for i in range(b, e):
            if nm is not None and (i - b) % nm[1] == 0:
                n, m = nm
                for r in range(rows):
                    sal = [W[r, j].item() ** 2 / U[j, j].item() ** 2 for j in range(i, i + m)]
                    keep = sorted(range(m), key=lambda t: -sal[t])[:n]
                    for t in range(m):
                        mask[r, i + t] = t not in keep
            q = torch.where(mask[:, i], torch.zeros_like(W[:, i]), W[:, i])
            err = (W[:, i] - q) / U[i, i]
            W[:, i] = q
            for j in range(i + 1, cols):
                W[:, j] -= err * U[i, j]
    return W


def test_sparsegpt_matches_a_slow_obs_loop():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(4, 8, generator=g)
    x = torch.randn(32, 8, generator=g)
    H = x.T @ x
    got = prune.sparsegpt_prune(w, H, 0.5, blocksize=8)
    assert torch.allclose(got.double(), slow_sparsegpt(w, H, 0.5), atol=1e-4)
    assert ((got == 0).sum() == 16)


def test_sparsegpt_lazy_blocks_nm_dead_inputs_and_the_default_block():
    g = torch.Generator().manual_seed(14)
    w = torch.randn(4, 16, generator=g)
    x = torch.randn(40, 16, generator=g)
    x[:, 5] = 0  # input 5 never active: its weights are zeroed, its Hessian diagonal set to 1
    H = x.T @ x
    for kw in ({"blocksize": 4}, {"blocksize": 8, "nm": (2, 4)}, {"blocksize": 16, "nm": (1, 4)}):
        got = prune.sparsegpt_prune(w, H, 0.5, **kw)
        assert torch.allclose(got.double(), slow_sparsegpt(w, H, 0.5, **kw), atol=1e-4), kw
        assert (got[:, 5] == 0).all()
    # a dead input's weights are zero whatever the mask, and where H is small its diagonal of 1 sets the
    # dampening (1% of the mean diagonal)
    for scale, sparsity in ((1.0, 0.1), (0.01, 0.5)):
        got = prune.sparsegpt_prune(w, H * scale ** 2, sparsity, blocksize=16)
        assert (got[:, 5] == 0).all()
        assert torch.allclose(got.double(), slow_sparsegpt(w, H * scale ** 2, sparsity, blocksize=16), atol=1e-4)
    # one pruned weight in a block (k = 1) and the default block of 128 columns (two blocks of 256)
    got = prune.sparsegpt_prune(w[:1, :4], H[:4, :4], 0.25, blocksize=4)
    assert int((got == 0).sum()) == 1
    assert torch.allclose(got.double(), slow_sparsegpt(w[:1, :4], H[:4, :4], 0.25, blocksize=4), atol=1e-5)
    wide, xw = torch.randn(2, 256, generator=g), torch.randn(300, 256, generator=g)
    got = prune.sparsegpt_prune(wide, xw.T @ xw, 0.5)
    assert torch.allclose(got.double(), slow_sparsegpt(wide, xw.T @ xw, 0.5, blocksize=128), atol=1e-4)


def test_sparsegpt_dampening_is_a_fraction_of_the_mean_diagonal():
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(3, 8, generator=g), torch.randn(6, 8, generator=g)  # rank 6 < 8: dampening matters
    H = x.T @ x
    for damp in (0.01, 0.1):
        assert torch.allclose(prune.sparsegpt_prune(w, H, 0.5, blocksize=8, percdamp=damp).double(),
                              slow_sparsegpt(w, H, 0.5, percdamp=damp), atol=1e-4)


def test_relative_error_from_the_gram_matrix():
    g = torch.Generator().manual_seed(8)
    w, dw, x = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(9, 5, generator=g)
    for scale_w, scale_dw in ((1.0, 1.0), (1e-3, 1e-4), (1.0, 1e-3)):  # small norms too: no floor of 1 anywhere
        a, b = w * scale_w, dw * scale_dw
        direct = (x @ b.T).norm() / (x @ a.T).norm()
        assert prune.relative_error(b, a, x.T @ x) == pytest.approx(direct.item(), rel=1e-5)


# --- OWL (per-layer sparsity) ----------------------------------------------------------------


def test_owl_sparsities_by_hand():
    # outlier ratios 0.01, 0.03, 0.02, 0.05: normalised to [0, 2 lam] = 0, 0.08, 0.04, 0.16 (lam 0.08),
    # centred (mean 0.07): -0.07, 0.01, -0.03, 0.09; subtracted from 0.6: 0.67, 0.59, 0.63, 0.51
    assert prune.owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.6, 0.08) == pytest.approx([0.67, 0.59, 0.63, 0.51])
    assert prune.owl_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]  # no spread: uniform
    s = prune.owl_sparsities([0.013, 0.0271, 0.0199, 0.0457, 0.0311], 0.55, 0.07)
    assert abs(sum(s) / len(s) - 0.55) < 1e-12  # the mean is the target
    assert prune.owl_sparsities([0.01, 0.03], 0.5, 0.1) == pytest.approx([0.6, 0.4], abs=1e-12)  # float64 arithmetic
    # the mean of 1, 1, 1, 10 is 3.25: with M = 2 only 10 (> 6.5) is an outlier; pooled over two
    # matrices the same four scores with M = 0.5 (threshold 1.625) again give 1 of 4
    assert prune.outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 10.0])], 2.0) == 0.25
    assert prune.outlier_ratio([torch.tensor([1.0, 1.0]), torch.tensor([1.0, 10.0])], 0.5) == 0.25
    assert prune.outlier_ratio([torch.tensor([2.0, 2.0])], 1.0) == 0.0  # strictly above


# --- Eq. 10 ---------------------------------------------------------------------------------


def test_expert_mse_sums_per_expert_means_over_teacher_routed_tokens():
    m = random_model(seed=1)
    x_s = torch.randn(6, 64, generator=torch.Generator().manual_seed(9))
    teacher_y = torch.randn(6, 64, generator=torch.Generator().manual_seed(10))
    calls = {0: [mm.ExpertCall(1, torch.tensor([0, 2, 5]), None, None, None, teacher_y[[0, 2, 5]]),
                 mm.ExpertCall(3, torch.tensor([1]), None, None, None, teacher_y[[1]])]}
    got = expert_mse(calls, {0: x_s}, m)
    experts = m.model.layers[0].block_sparse_moe.experts
    with torch.no_grad():
        slow = 0.0
        for e, toks in ((1, [0, 2, 5]), (3, [1])):
            sq = [(experts[e](x_s[t]) - teacher_y[t]).pow(2).sum().item() for t in toks]
            slow += sum(sq) / (len(toks) * 64)  # the mean over the tokens' elements
    assert got.item() == pytest.approx(slow, rel=1e-5)
    assert distill.kd_lambda(torch.tensor(2.4), torch.tensor(0.8)) == pytest.approx(3.0)  # L_CE / L_expert, not inverted
    assert distill.kd_lambda(torch.tensor(3.0), torch.tensor(1.0)) == 3.0
    for ce, l_exp in ((2.0, 0.0), (float("nan"), 1.0), (1.0, float("nan")), (float("inf"), 1.0)):
        with pytest.raises(data.DataError, match="undefined"):
            distill.kd_lambda(torch.tensor(ce), torch.tensor(l_exp))


# --- the load-balancing loss ---------------------------------------------------------------


def slow_balance(logits, k):
    n = len(logits[0])
    probs = [softmax(r) for r in logits]
    f = [0.0] * n
    for p in probs:
        for e in sorted(range(n), key=lambda i: -p[i])[:k]:
            f[e] += 1 / len(probs)
    P = [sum(p[e] for p in probs) / len(probs) for e in range(n)]
    return n * sum(f[e] * P[e] for e in range(n))


def test_load_balancing_loss_against_a_loop():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(10, 4, generator=g), torch.randn(6, 4, generator=g)
    assert pt.load_balancing_loss([a], 2).item() == pytest.approx(slow_balance(a.tolist(), 2), rel=1e-5)
    pooled = slow_balance(a.tolist() + b.tolist(), 2)
    assert pt.load_balancing_loss([a, b], 2).item() == pytest.approx(pooled, rel=1e-5)
    per_layer = (slow_balance(a.tolist(), 2) + slow_balance(b.tolist(), 2)) / 2
    assert pt.load_balancing_loss([a, b], 2, per_layer=True).item() == pytest.approx(per_layer, rel=1e-5)
    c = torch.randn(8, 4, generator=g)
    c[:, 3] = -20.0  # the last expert is never chosen: f_3 = 0, its P_3 still counted
    assert pt.load_balancing_loss([c], 2).item() == pytest.approx(slow_balance(c.tolist(), 2), rel=1e-5)


# --- NAEE ---------------------------------------------------------------------------------------


def test_skip_rule_by_hand():
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.75, 0.25], [0.5, 0.25]])
    # beta 0.5: skip when g1 < 0.5 g0: 0.4 < 0.3 no, 0.1 < 0.45 yes, 0.5 < 0.25 no, 0.25 < 0.375 yes,
    # 0.25 < 0.25 no (strictly less: a tie keeps the second expert, as NAEE's reference does)
    assert variants.skip_second(w, 0.5).tolist() == [False, True, False, True, False]


def test_subset_error_is_a_sum_of_unsquared_norms_over_batches():
    """NAEE's reference takes one Frobenius norm per cached forward (a batch of windows), unsquared,
    and sums them: 4 windows in batches of 2 are two norms, not four and not one."""
    m = random_model(num_local_experts=3)
    layer = m.model.layers[0]
    x = torch.randn(4, 5, 64, generator=torch.Generator().manual_seed(12))
    cos, sin = mm.rope_cos_sin(m.config, 5)
    subsets = list(itertools.combinations(range(3), 2))
    errors = ep.subset_errors(layer, x, ep.Positions(cos, sin, None), subsets, batch_size=2)
    block = layer.block_sparse_moe
    with torch.no_grad():
        h = layer.post_attention_layernorm(layer.attend(x, cos, sin))  # [4, 5, 64]
        for s, keep in enumerate(subsets):
            total = 0.0
            for batch in ((0, 1), (2, 3)):
                sq = 0.0
                for win in batch:
                    for t in range(5):
                        full_w, full_e = mm.route(block.gate(h[win, t])[None], 2)
                        kw, ke = ep.masked_route(block.gate(h[win, t])[None], keep, 2)
                        y = sum(full_w[0, k] * block.experts[full_e[0, k]](h[win, t]) for k in range(2))
                        ys = sum(kw[0, k] * block.experts[ke[0, k]](h[win, t]) for k in range(2))
                        sq += (ys - y).double().pow(2).sum().item()
                total += math.sqrt(sq)  # a batch's Frobenius norm, not squared
            assert errors[s].item() == pytest.approx(total, rel=1e-4)


# --- CD-MoE ---------------------------------------------------------------------------------


def test_js_divergence_by_hand():
    a = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    total = 0.0
    for ra, rb in zip(a.tolist(), b.tolist()):
        p, q = softmax(ra), softmax(rb)
        mid = [(u + v) / 2 for u, v in zip(p, q)]
        kl = lambda s, t: sum(si * math.log(si / ti) for si, ti in zip(s, t))
        total += 0.5 * kl(p, mid) + 0.5 * kl(q, mid)
    assert ep.js_divergence(a, b) == pytest.approx(total / 2, rel=1e-9)
    # over the last dimension whatever the rank: [2, 1, 3] is the same two rows
    assert ep.js_divergence(a[:, None, :], b[:, None, :]) == pytest.approx(total / 2, rel=1e-9)
    assert ep.js_divergence(a.reshape(1, 2, 3), b.reshape(1, 2, 3)) == pytest.approx(total / 2, rel=1e-9)


def test_cd_moe_weight_counts_a_single_token_and_an_unrouted_last_expert():
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    e = torch.tensor([[0, 1], [0, 2]])  # expert 1 and expert 2 routed once each, expert 3 (the last) never
    assert ep.routed_gate_means(w, e, 4).tolist() == pytest.approx([0.65, 0.3, 0.4, 0.0])


def test_cd_moe_weight_by_hand_not_over_all_tokens():
    # expert 1 routed on 2 of 4 tokens with gates 0.6 and 0.8: its weight is 0.7 (over all tokens: 0.35)
    w = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.5, 0.5], [0.9, 0.1]])
    e = torch.tensor([[1, 0], [1, 2], [0, 2], [2, 0]])
    got = ep.routed_gate_means(w, e, 3).tolist()
    assert got == pytest.approx([(0.4 + 0.5 + 0.1) / 3, 0.7, (0.2 + 0.5 + 0.9) / 3])


# --- REAP -----------------------------------------------------------------------------------


def test_reap_saliency_is_the_mean_over_routed_tokens_of_probability_times_output_norm():
    m = random_model(seed=4)
    layer = m.model.layers[1]
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(13))
    cos, sin = mm.rope_cos_sin(m.config, 6)
    got = ep.reap_saliency(layer, x, ep.Positions(cos, sin, None), batch_size=1)
    block = layer.block_sparse_moe
    with torch.no_grad():
        h = layer.post_attention_layernorm(layer.attend(x, cos, sin))[0]
        sums, counts = [0.0] * 4, [0] * 4
        renormalised = [0.0] * 4
        for t in range(6):
            w, e = mm.route(block.gate(h[t])[None], 2)
            p = softmax(block.gate(h[t]).tolist())  # over all experts: the reference's probability for Mixtral
            for k in range(2):
                ex = e[0, k].item()
                norm = block.experts[ex](h[t]).norm().item()
                sums[ex] += p[ex] * norm
                renormalised[ex] += w[0, k].item() * norm
                counts[ex] += 1
    expect = [s / c if c else 0.0 for s, c in zip(sums, counts)]
    assert got.tolist() == pytest.approx(expect, rel=1e-5)
    # not the renormalised top-2 gate, which is larger by 1 / (the top-2 probability mass)
    assert got.tolist() != pytest.approx([r / c if c else 0.0 for r, c in zip(renormalised, counts)], rel=1e-3)
    # the mean over routed tokens, not over all tokens (which would scale each by counts / 6)
    assert any(c not in (0, 6) for c in counts)


def test_subsets_enumerated_are_all_r_subsets():
    assert list(itertools.combinations(range(4), 2))[0] == (0, 1)  # the enumeration order NAEE ties resolve by
