"""masks.py: the per-row selection every unstructured mask uses is a stable sort's, bit for bit, and
the faster paths around the scores leave prune.py's outputs as they were."""

import math

import pytest
import torch

import layerwise
import masks
import prune
from checkpoint import CheckpointReader
from conftest import write_checkpoint

FAST = pytest.mark.parametrize("seed", range(6))


def sorted_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: a stable sort's first k of each row (ties to the lower column)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k], True)
    return mask


def weights(g, rows, cols, kind):
    """Weights as checkpoints hold them (bfloat16 values), with ties, zeros of either sign, or sorted rows."""
    w = torch.randn(rows, cols, generator=g).bfloat16().float()
    if kind == "ints":
        w = torch.randint(-3, 4, (rows, cols), generator=g).float()  # many exact ties
    elif kind == "zeros":
        w[torch.rand(rows, cols, generator=g) < 0.6] = -0.0  # a matrix pruned before, negative zeros included
    elif kind == "sorted":
        w = torch.sort(w.abs(), dim=1).values  # the sample's every 64th column is no fair sample
    elif kind == "tiny":
        w = w * 1e-30  # float32 keys |W| * c near their subnormal range: the exact float64 scores decide
    return w


@FAST
@pytest.mark.parametrize("kind", ["normal", "ints", "zeros", "sorted", "tiny"])
def test_prune_rows_is_masked_fill_of_the_stable_sort_bit_for_bit(seed, kind):
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):
        rows, cols = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 2500, (1,), generator=g))
        w = weights(g, rows, cols, kind)
        sq = torch.rand(cols, generator=g, dtype=torch.float64) * 10
        sq[torch.rand(cols, generator=g) < 0.1] = 0  # dead inputs: every score of the column is 0
        k = int(torch.randint(1, cols, (1,), generator=g))
        block = int(torch.randint(1, 4 * cols, (1,), generator=g))  # 1 row a block .. several
        for norms, score in ((sq, prune.activation_score(w, sq)), (None, prune.magnitude_score(w))):
            ref = w.masked_fill(sorted_mask(score, k), 0)
            got = masks.prune_rows(w, k, norms, prune.activation_score, block_elements=block)
            assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # +0 and -0 told apart
            inplace = w.clone()
            masks.prune_rows(inplace, k, norms, prune.activation_score, block_elements=block, out=inplace)
            assert torch.equal(inplace.view(torch.int32), ref.view(torch.int32))
            assert masks.count_zeros(ref) == int((ref == 0).sum())


@FAST
def test_lowest_k_mask_is_the_stable_sort_for_long_rows_and_ties(seed):
    """SparseGPT's block mask is one row of out x 128 saliencies in float32; the whole-matrix group one
    row of float64 scores."""
    g = torch.Generator().manual_seed(seed)
    for cols, dtype in ((70_000, torch.float32), (5_000, torch.float64), (3, torch.float32)):
        score = torch.rand(2, cols, generator=g, dtype=dtype)
        score[:, ::7] = score[:, 1::7][:, :score[:, ::7].shape[1]]  # exact ties across columns
        for k in (0, 1, cols // 3, cols - 1):
            assert torch.equal(masks.lowest_k_mask(score, k), sorted_mask(score, k))
            assert torch.equal(prune.unstructured_mask(score, k / cols + 1e-9), sorted_mask(score, k))


def test_the_bracket_holds_the_kth_key_and_few_others():
    g = torch.Generator().manual_seed(0)
    key = torch.rand(64, 4096, generator=g)
    k = 2048
    lo, hi = masks.kth_bracket(key, k, masks.indicator_like(key))
    below, under_hi = (key < lo).sum(dim=1), (key < hi).sum(dim=1)
    assert bool((below < k).all()) and bool((under_hi >= k).all())
    assert float((under_hi - below).float().mean()) <= 64  # narrowed from the sample's ~700 a row


@FAST
def test_squared_norms_a_block_of_columns_at_a_time_are_the_whole_batchs_bitwise(seed):
    """Each column's sum runs over the tokens in one order however many columns a block holds: the
    statistics, hence the masks, are those of the whole batch at once."""
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 3000, (1,), generator=g))
    x = torch.randn(tokens, 700, generator=g)
    gate = torch.rand(tokens, generator=g)
    whole = (x.double() * gate.double()[:, None]).pow(2).sum(dim=0)
    assert torch.equal(prune.sq_norm(x, gate), whole)
    assert torch.equal(prune.sq_norm(x), x.double().pow(2).sum(dim=0))
    x64 = x.double()
    prune.sq_norm(x64, gate)
    assert torch.equal(x64, x.double())  # a float64 input is read, never scaled in place
    assert torch.equal(prune.sq_norm(x.bfloat16(), gate), (x.bfloat16().double() * gate.double()[:, None]).pow(2).sum(0))


@pytest.mark.parametrize("nm,dead", [(None, False), (None, True), ((2, 4), False)])
def test_sparsegpts_solver_error_from_its_obs_loss_is_the_products(nm, dead):
    """sum (w - q)^2 / [H^-1]_jj^2 = tr(dW (H + lambda I) dW^T): the relative error without its two
    products agrees with them to float32's accuracy."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 256, generator=g), torch.randn(600, 256, generator=g)
    if dead:
        x[:, :20] = 0
    H = prune.hessian(x)
    losses = []
    q = prune.sparsegpt_prune(w, H, 0.5, nm, blocksize=64, losses=losses)
    dense_sq = (x @ w.T).double().pow(2).sum().item()  # what the dense pass's output hooks sum
    exact = prune.relative_error(q - w, w, H)
    assert prune.obs_relative_error(losses[0], q, w, H, 0.01, dense_sq) == pytest.approx(exact, rel=1e-4)
    assert torch.equal(q, prune.sparsegpt_prune(w, H, 0.5, nm, blocksize=64))  # asking for the loss changes nothing


def test_a_bfloat16_run_holds_a_bfloat16_checkpoints_layers_in_bfloat16(tmp_path, ckpt, text_file, monkeypatch):
    """--dtype bfloat16 on a checkpoint stored in bfloat16: each layer is held as stored (no cast a
    pass), and the output is bitwise the one of layers held in float32."""
    bf16 = write_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    reader = CheckpointReader(bf16)
    assert layerwise.weight_dtype(reader, 0, "bfloat16") == torch.bfloat16
    assert layerwise.weight_dtype(reader, 0, "float32") == torch.float32
    assert layerwise.weight_dtype(CheckpointReader(ckpt), 0, "bfloat16") == torch.float32  # stored otherwise
    outs = {}
    for held in ("bfloat16", "float32"):
        if held == "float32":
            monkeypatch.setattr(layerwise, "weight_dtype", lambda reader, l, compute=None: torch.float32)
        for method in ("moe-pruner", "sparsegpt"):
            args = prune.PruneArgs(method=method, calib_data=text_file, nsamples=4, seqlen=32, dtype="bfloat16",
                                   percdamp=0.1)  # 128 tokens: a few experts see few of them
            out = tmp_path / f"{method}-{held}"
            prune.prune_checkpoint(bf16, str(out), args, log=lambda m: None)
            outs[method, held] = {n: CheckpointReader(str(out)).get(n) for n in reader.weight_map}
    for method in ("moe-pruner", "sparsegpt"):
        a, b = outs[method, "bfloat16"], outs[method, "float32"]
        assert all(torch.equal(a[n].view(torch.int16), b[n].view(torch.int16)) for n in a)


def test_sparsegpts_hessian_is_a_float32_product_inside_a_bfloat16_forward():
    """The observer runs inside the forward's autocast: the Hessian must not become a bfloat16 product."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 96, generator=g).bfloat16()
    with layerwise.compute_dtype("cpu", "bfloat16"):
        inside = prune.hessian(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, prune.hessian(x))
    assert not torch.equal(inside, (x.T @ x).float())  # what autocast's bfloat16 product would give
