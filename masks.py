"""
Each row's k lowest scores, exactly and at close to memory speed: the selection behind every
unstructured mask in prune.py (Wanda's and MoE-Pruner's per-row comparison group, Eq. 8 and 9;
SparseGPT's per-block one; the whole-matrix group).

The rule is a stable sort's: per row, the k lowest scores, and among equal scores the lower
column first. torch.kthvalue and torch.sort select it, but on a CPU they run at a few ns an
element, several times the cost of reading the matrix. Here the k-th value is bracketed instead
(Floyd & Rivest 1975, "Algorithm 489: SELECT"):

  1. a sorted sample of every stride-th column gives each row a bracket [lo, hi) around it;
  2. counting the scores below a guess (one comparison pass, no sort) narrows each bracket by
     interpolation until a few scores a row lie inside it;
  3. every score below lo is among the k lowest, none at or above hi is, and the few inside are
     ordered exactly, by (score, column).

A key may stand in for the exact score in steps 1-2 (MoE-Pruner's float32 |W_ij| * ||X_j||,
half the bytes of its float64 value): the bracket is then widened by the key's relative error,
so that the scores in step 3 are ordered by their exact values and the selection is the exact
one, ties included. tests/test_masks.py pins it against a stable sort.
"""

import math
from typing import Callable, Optional

import numpy as np
import torch

KEY_REL_ERROR = 2.0 ** -22  # a float32 |W_ij| * float32(c_j) vs the float64 |W_ij| * c_j: two roundings of
# 2^-24 each, with a factor 2 to spare
NORMAL = 2.0 ** -100  # brackets at or above this: far from float32's subnormal range, where the relative bound fails


def indicator_like(key: torch.Tensor) -> torch.Tensor:
    """A buffer for 0/1 comparison results: float, which torch writes and sums several times faster
    than bool; float32 counts exactly up to 2^24 a row, float64 beyond (a whole matrix as one row)."""
    return torch.empty(key.shape, dtype=torch.float32 if key.shape[1] <= 2**24 else torch.float64, device=key.device)


def count_below(key: torch.Tensor, t: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """#{key < t} per row, key [rows, cols], t [rows, 1] -> [rows, 1] in buf's dtype, exact (indicator_like)."""
    return torch.lt(key, t, out=buf).sum(dim=1, keepdim=True)


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, m] sorted along each row: on a CPU by numpy, whose SIMD sort is ~8x torch's on short rows."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=1))
    return x.sort(dim=1).values


def where_nonzero(ind: torch.Tensor, chunk: int = 64):
    """(rows, cols) of the nonzero entries of ind [rows, cols], row-major, as nonzero(as_tuple=True):
    for a sparse ind several times faster, by finding the nonzero chunks of `chunk` entries first."""
    cols = ind.shape[1]
    if ind.numel() % chunk:
        return ind.nonzero(as_tuple=True)
    flat = ind.view(-1, chunk)  # [numel / chunk, chunk]
    hit = flat.sum(dim=1).nonzero()[:, 0]  # chunks holding a nonzero entry
    sub = flat[hit].nonzero()  # [n, 2] (chunk among hit, offset)
    idx = hit[sub[:, 0]] * chunk + sub[:, 1]  # flat indices, ascending
    return idx // cols, idx % cols


def kth_bracket(key: torch.Tensor, k: int, buf: torch.Tensor, spread: int = 16, passes: int = 8):
    """(lo, hi), each [rows, 1] in key's dtype, with #{key < lo} < k <= #{key < hi} in every row: the
    row's k-th smallest key lies in [lo, hi), and about `spread` keys a row inside it (more where
    `passes` interpolations do not get there; lo = -inf or hi = inf where a bracket missed).
    buf: an indicator_like(key) to count in."""
    rows, cols = key.shape
    stride = max(1, min(64, cols // 64))  # a sample of at least 64 keys a row, sorted at ~1/64 of a pass
    sample = sort_rows(key[:, stride // 2::stride])  # [rows, m]
    m = sample.shape[1]
    r = (k - 1) * m // cols  # the sample rank the k-th key falls near
    margin = int(1.5 * math.sqrt(m)) + 2  # 3 standard deviations of a sampled quantile's rank, sqrt(m p (1 - p))
    ninf, pinf = key.new_full((rows, 1), -math.inf), key.new_full((rows, 1), math.inf)
    lo = sample[:, r - margin, None] if r >= margin else ninf
    hi = sample[:, r + margin, None] if r + margin < m else pinf
    nlo, nhi = count_below(key, lo, buf), count_below(key, hi, buf)
    missed = nlo >= k  # a sample more than 3 sigma off: the whole row below hi
    lo, nlo = torch.where(missed, ninf, lo), torch.where(missed, 0.0, nlo)
    missed = nhi < k
    hi, nhi = torch.where(missed, pinf, hi), torch.where(missed, float(cols), nhi)
    for _ in range(passes):
        if float((nhi - nlo).sum()) <= spread * rows:
            break
        span = nhi - nlo  # keys in [lo, hi)
        step = (span / 32).clamp(min=1)  # aim just to either side of the k-th, so that both ends move
        for target in (k - 0.5 - step, k - 0.5 + step):
            f = ((target - nlo) / span).clamp(0, 1)
            g = (lo.double() + (hi.double() - lo.double()) * f).to(key.dtype)  # linear interpolation
            g = torch.where(torch.isfinite(g), g, lo)  # an infinite end: no guess
            n = count_below(key, g, buf)
            up, down = (n < k) & (g > lo), (n >= k) & (g < hi)
            lo, nlo = torch.where(up, g, lo), torch.where(up, n, nlo)
            hi, nhi = torch.where(down, g, hi), torch.where(down, n, nhi)
    return lo, hi


def lowest_k(key: torch.Tensor, k: int, exact: Optional[Callable] = None, rel_error: float = 0.0,
             keep: torch.Tensor = None, buf: torch.Tensor = None):
    """(keep, lo): keep [rows, cols] (an indicator_like(key), or the one given) is 0 for each row's k
    lowest scores (ties to the lower column) and 1 for the others; every score below lo [rows, 1] is
    among them.

    key [rows, cols] orders the scores; or, with exact(rows, cols) -> the exact scores at those
    positions, it approximates them within a relative rel_error, which bounds a float's error only
    away from zero: then (None, lo) where some row's lo is below NORMAL, for the caller to select
    on the exact scores instead."""
    cols = key.shape[1]
    keep = indicator_like(key) if keep is None else keep
    buf = indicator_like(key) if buf is None else buf
    lo, hi = kth_bracket(key, k, buf)
    if rel_error:
        if not bool((lo >= NORMAL).all()):
            return None, lo
        lo, hi = lo * (1 - 4 * rel_error), hi * (1 + 4 * rel_error)  # a key's error cannot carry a score across
    torch.ge(key, lo, out=keep)
    need = k - (cols - keep.sum(dim=1, keepdim=True))  # [rows, 1] how many of the scores from lo up to take
    if not rel_error:  # a k-th value many keys share (the zeros of a matrix pruned before): its ties by column
        tied = (torch.le(key, lo, out=buf).sum(dim=1, keepdim=True) >= k) & torch.isfinite(lo)  # [rows, 1]
        if bool(tied.any()):
            t = tied[:, 0]
            ties = key[t] == lo[t]  # [tied rows, cols]
            keep[t] = keep[t].masked_fill(ties & (ties.cumsum(dim=1) <= need[t]), 0)
            hi = torch.where(tied, lo, hi)  # nothing left inside [lo, hi) for those rows
    inside = torch.lt(key, hi, out=buf).mul_(keep)  # 1 in [lo, hi)
    row, col = where_nonzero(inside)  # [n] each, row-major
    value = exact(row, col) if exact is not None else key[row, col]
    order = torch.sort(value, stable=True).indices  # by value, then (stable) by column
    order = order[torch.sort(row[order], stable=True).indices]  # grouped by row
    row, col = row[order], col[order]
    rank = torch.arange(len(row), device=key.device) - torch.searchsorted(row, row)  # rank within its row
    take = rank < need[row, 0]
    keep[row[take], col[take]] = 0
    return keep, lo


def lowest_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True for each row's k lowest of score [rows, cols], ties to the lower column: a stable sort's
    first k, torch.sort(score, stable=True).indices[:, :k]."""
    if k == 0:
        return torch.zeros_like(score, dtype=torch.bool)
    return lowest_k(score, k)[0] == 0


def prune_rows(w: torch.Tensor, k: int, sq_norms: Optional[torch.Tensor], score: Callable,
               block_elements: int = 2**20, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w [out, in] with each row's k lowest scores set to +0, ties to the lower column, as masked_fill of
    unstructured_mask(score(w, sq_norms)) would: score is Wanda's and MoE-Pruner's |W_ij| * sqrt(sq_norms_j)
    (prune.activation_score, Eq. 8 and 9), ordered on its float32 key and resolved on its exact values;
    sq_norms None: magnitude, |W_ij| (exact in w's dtype). Returns the pruned copy, written into out if
    given (w itself prunes in place, saving a fresh tensor's page faults). Rows go in blocks of
    about block_elements (4 MB of float32 keys), so that every pass over a block runs in cache, in
    buffers allocated once (a fresh multi-MB tensor costs its page faults each time)."""
    out = torch.empty_like(w) if out is None else out
    if k == 0:
        return out.copy_(w)
    scale = None if sq_norms is None else sq_norms.double().sqrt().float()  # [in] the key's column factor
    rows = max(1, block_elements // w.shape[1])
    key_buf, keep_buf, count_buf = (torch.empty(min(rows, w.shape[0]), w.shape[1], device=w.device) for _ in range(3))
    for i in range(0, w.shape[0], rows):
        wb, o = w[i:i + rows], out[i:i + rows]  # [rows, in]
        key, keep, buf = key_buf[:len(wb)], keep_buf[:len(wb)], count_buf[:len(wb)]
        key.copy_(wb).abs_()  # float32 |W| (exact for a float16 or bfloat16 w too)
        if sq_norms is None:
            lo = lowest_k(key, k, keep=keep, buf=buf)[1]
        else:
            exact = lambda r, c: score(wb[r, c][None, :], sq_norms[c])[0]  # the score at (r, c), [n] float64
            found, lo = lowest_k(key.mul_(scale), k, exact, KEY_REL_ERROR, keep, buf)
            if found is None:  # near zero: selected on the exact scores
                keep, lo = lowest_k(score(wb, sq_norms), k)
        if bool((lo > 0).all()):  # every zero score pruned: every kept w is nonzero, and w * 1 = w
            torch.mul(wb, keep if w.dtype == keep.dtype else keep.to(w.dtype), out=o).add_(0.0)  # pruned: w * 0 is
            # -0 where w < 0; + 0.0 makes it +0, as masked_fill
        else:
            o.copy_(wb.masked_fill(keep == 0, 0))
    return out


def count_zeros(w: torch.Tensor, block_elements: int = 2**20) -> int:
    """The number of zeros in w, counted a block at a time in a float indicator (torch.count_nonzero
    branches on every value, slow where pruning left zeros and nonzeros at random)."""
    flat = w.reshape(-1)
    buf = torch.empty(min(block_elements, flat.numel()), device=w.device)  # float32: exact counts up to 2^24
    return sum(int(torch.eq(flat[i:i + len(buf)], 0, out=buf[:len(flat[i:i + len(buf)])]).sum().item())
               for i in range(0, flat.numel(), len(buf)))
