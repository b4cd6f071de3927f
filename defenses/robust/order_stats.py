"""Per-coordinate order statistics of an ``(n, d)`` tensor through a bitonic sorting network.

``middle_sum(X, lo, hi)[j]`` is the sum of the order statistics ``lo .. hi-1`` (0-based,
ascending) of column ``j``: ``CoordinateMedian`` and ``TrimmedMean`` are both a middle sum
divided by its length.

Why a sorting network: a per-coordinate sort or selection (``torch.sort``/``kthvalue``/
``quantile`` along dim 0, which is what ByzFL calls) does scalar, branchy work per coordinate
(about 0.5 us per coordinate at n = 50). A sorting network does the same comparisons for every
coordinate, so each of its layers is one ``torch.minimum`` and one ``torch.maximum`` over a
whole block of coordinates: SIMD, no branches, no Python loop over coordinates.

Network (Batcher 1968, "Sorting networks and their applications"): the rows are padded to
``N = 2^k`` with ``-inf`` / ``+inf`` (which sort to the ends and shift every rank by the
number of ``-inf`` rows), then sorted by the classic alternating-direction bitonic sort:
``log2(N) (log2(N) + 1) / 2`` layers of ``N / 2`` compare-exchanges, each layer a pair of
elementwise ops on strided views of a cache-sized block of coordinates. The last merge is
pruned: a half-cleaner splits a bitonic block into a lower and an upper half (each again
bitonic), so it only descends into the halves that straddle ``lo`` or ``hi``; a half that lies
wholly inside ``[lo, hi)`` is summed as it is, one wholly outside is dropped. Only kept values
are summed, so huge Byzantine values cannot cancel the honest ones in floating point.

NaN: ``torch.minimum``/``maximum`` propagate NaN, so a column holding a NaN gives NaN (a
sort would rank it last instead). The wire decoder rejects a client update with a non-finite
value (``secfed.wire``: that client is dropped), so none reaches an aggregator in a run.

Above ``MAX_NETWORK_ROWS`` rows the network does ``O(log^2 n)`` passes over the data and a
cache-blocked ``torch.sort`` along contiguous memory is used instead.

Compiled path: CPU float32/float64 inputs go to ``_select_kernel`` (numba) when numba imports:
the same kind of network, but run on a 64-coordinate tile that stays in cache, so the data is
read once (a few times the cost of one ``X.sum(0)`` instead of tens). Results: every order
statistic, the median and the even-n median ``(a + b) * 0.5`` are bit-identical to this torch
path; sums of several ranks (``middle_sum``, ``trimmed_mean``) are accumulated in float64 in
ascending rank order and rounded once, where the torch path adds float32 partial sums in network
order, so the two can differ in the last bits (the float64 result is the more accurate one, and
cannot overflow for finite float32 inputs). ``SECFED_NO_NUMBA=1`` forces the torch path.
"""

from __future__ import annotations

import functools
import math

import torch

from defenses.robust._ops import compiled

BLOCK_ELEMENTS = 1 << 20  # 4 MiB of float32 per block: the working set of one block stays in cache
MAX_NETWORK_ROWS = 1024


def _middle(X: torch.Tensor, lo: int, hi: int, mode: str) -> torch.Tensor:
    """``mode`` "sum" / "mean" of ranks ``[lo, hi)``, or "pair_mean" (``(x_lo + x_lo+1) * 0.5``)."""
    n = X.shape[0]
    if not 0 <= lo < hi <= n:
        raise ValueError(f"middle_sum: need 0 <= lo < hi <= n (lo={lo}, hi={hi}, n={n})")
    kernel = compiled("_select_kernel")  # None: the pure-torch network
    if kernel is not None and kernel.supports(X):
        return kernel.middle_stat(X, lo, hi, mode)
    out = middle_sum_torch(X, lo, hi)
    if mode == "pair_mean":
        return out.mul_(0.5)
    return out.div_(hi - lo) if mode == "mean" else out


def middle_sum(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per column, the sum of the order statistics ``lo <= rank < hi`` of the ``n`` rows of X."""
    return _middle(X, lo, hi, "sum")


def middle_sum_torch(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``middle_sum`` by the pure-torch bitonic network (any dtype and device)."""
    n, d = X.shape
    if not 0 <= lo < hi <= n:
        raise ValueError(f"middle_sum: need 0 <= lo < hi <= n (lo={lo}, hi={hi}, n={n})")
    if n == 1:
        return X[0].clone()
    if n > MAX_NETWORK_ROWS:
        return _sorted_middle_sum(X, lo, hi)
    N = 1 << (n - 1).bit_length()
    below = (N - n) // 2  # -inf rows; the other N - n - below rows are +inf
    b = max(1024, BLOCK_ELEMENTS // N)
    out = X.new_empty(d)
    Y = X.new_empty(N, min(b, d))
    Z = torch.empty_like(Y)
    for s in range(0, d, b):
        w = min(b, d - s)
        if w != Y.shape[1]:  # the last, narrower block
            Y = X.new_empty(N, w)
            Z = torch.empty_like(Y)
        Y[:below].fill_(-math.inf)
        Y[below:below + n].copy_(X[:, s:s + w])
        Y[below + n:].fill_(math.inf)
        S, T = _bitonic_halves(Y, Z)
        out[s:s + w] = _merge_middle_sum(S, lo + below, hi + below)
        Y, Z = S, T
    return out


def _bitonic_halves(Y: torch.Tensor, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the first half of Y's N rows ascending and the second half descending, so that each
    column is one bitonic sequence. Ping-pongs between Y and Z; returns (result, scratch).

    Stage k sorts blocks of k rows, alternately ascending and descending. The descending blocks
    are negated for the stage (negation is exact, and sorting -x ascending sorts x descending), so
    every compare-exchange layer is the same two ops on the whole block: rows i and i + j of each
    group of 2j rows go to (min, max). One sign flip per stage moves the negation to the next
    stage's descending blocks.
    """
    N, b = Y.shape
    flips = _stage_sign_flips(N, Y.dtype)
    k = 2
    while k < N:
        Y.mul_(flips[k])
        j = k // 2
        while j >= 1:
            Yv = Y.view(N // (2 * j), 2, j, b)
            Zv = Z.view(N // (2 * j), 2, j, b)
            torch.minimum(Yv[:, 0], Yv[:, 1], out=Zv[:, 0])
            torch.maximum(Yv[:, 0], Yv[:, 1], out=Zv[:, 1])
            Y, Z = Z, Y
            j //= 2
        k *= 2
    if N > 2:
        Y.mul_(flips[N])
    return Y, Z


@functools.lru_cache(maxsize=32)
def _stage_sign_flips(N: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """``flips[k]``, an (N, 1) column of +-1: multiplying by it before stage k (k = 2, 4, ..., N/2)
    undoes the previous stage's negation and negates stage k's descending blocks; ``flips[N]``
    undoes the last stage's negation. Built once per (N, dtype), not once per block."""
    signs, k = {}, 2
    while k < N:
        sign = torch.ones(N // (2 * k), 2, k, 1, dtype=dtype)
        sign[:, 1] = -1.0
        signs[k] = sign.view(N, 1)
        k *= 2
    flips, prev = {}, None
    for k, sign in signs.items():
        flips[k] = sign if prev is None else sign * prev
        prev = sign
    if prev is not None:
        flips[N] = prev
    return flips


def _merge_middle_sum(B: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Sum of ranks ``[lo, hi)`` of each column of the bitonic block B, sorting only what is needed."""
    m = B.shape[0]
    if lo <= 0 and hi >= m:
        return B.sum(0)
    h = m // 2
    lower = torch.minimum(B[:h], B[h:])  # the h smallest, bitonic
    upper = torch.maximum(B[:h], B[h:])  # the h largest, bitonic
    parts = []
    if lo < h:
        parts.append(_merge_middle_sum(lower, lo, min(hi, h)))
    if hi > h:
        parts.append(_merge_middle_sum(upper, max(lo - h, 0), hi - h))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _sorted_middle_sum(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    n, d = X.shape
    b = max(1024, BLOCK_ELEMENTS // n)
    out = X.new_empty(d)
    for s in range(0, d, b):  # transposed blocks: the sort runs along contiguous memory
        out[s:s + b] = torch.sort(X[:, s:s + b].T.contiguous(), dim=1).values[:, lo:hi].sum(1)
    return out


def coordinate_median(X: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values (as numpy / ``torch.quantile``)."""
    n = X.shape[0]
    if n % 2:
        return _middle(X, n // 2, n // 2 + 1, "sum")
    return _middle(X, n // 2 - 1, n // 2 + 1, "pair_mean")


def closest_to_median_mean(X: torch.Tensor, beta: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """Per coordinate, the mean of the ``beta`` values closest to the coordinate-wise median (Bulyan's
    second step, El Mhamdi et al. 2018), of the rows ``X[index]`` (all rows if None; the compiled
    kernel reads them in place, no copy). Ties in distance at the boundary: the lower value is kept
    by the compiled kernel; the torch path (``torch.topk``) breaks them arbitrarily."""
    n = X.shape[0] if index is None else int(index.numel())
    if not 1 <= beta <= n:
        raise ValueError(f"closest_to_median_mean: need 1 <= beta <= n (beta={beta}, n={n})")
    kernel = compiled("_select_kernel")  # None: the pure-torch network
    if kernel is not None and kernel.supports(X):
        return kernel.middle_stat(X, 0, beta, "closest_mean", index)
    if index is not None:
        X = X[index]
    med = coordinate_median(X)
    idx = torch.topk((X - med).abs(), beta, dim=0, largest=False, sorted=False).indices
    return torch.gather(X, 0, idx).mean(0)


def trimmed_mean(X: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate, the mean after dropping the f largest and f smallest values (exact with ties)."""
    n = X.shape[0]
    return _middle(X, f, n - f, "mean")
