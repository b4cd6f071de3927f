"""Vectorised building blocks shared by the robust aggregators.

Everything works on an ``(n, d)`` float tensor of updates, one row per client,
with memory O(n d + n^2): pairwise distances come from one Gram matrix
product, order statistics from ``topk``/``kthvalue`` along dim 0.
"""

from __future__ import annotations

import torch


def check_updates(X: torch.Tensor, name: str) -> torch.Tensor:
    """Validate the ``(n, d)`` input of an aggregator; returns it as float."""
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(f"{name}: expected an (n, d) tensor of updates, got {getattr(X, 'shape', type(X))}")
    if X.shape[0] == 0:
        raise ValueError(f"{name}: no updates to aggregate")
    return X if X.is_floating_point() else X.float()


def check_f(f: int, name: str) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ValueError(f"{name}: f must be a non-negative integer (got {f!r})")
    return f


def pairwise_sq_dists(X: torch.Tensor) -> torch.Tensor:
    """``D[i, j] = ||x_i - x_j||^2`` through one ``n x n x d`` matrix product.

    Rows are centred on their mean first (distances are translation invariant),
    which removes most of the cancellation of ``|a|^2 + |b|^2 - 2 a.b``; the
    Gram matrix is accumulated in float64 (an O(n^2) cost), the diagonal is exactly 0.
    """
    Xc = X - X.mean(0, keepdim=True)
    G = (Xc @ Xc.T).double()
    G = 0.5 * (G + G.T)
    sq = G.diagonal()
    D = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min_(0.0)
    D.fill_diagonal_(0.0)
    return D


def row_norms(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(X, dim=1)


def sum_smallest(X: torch.Tensor, k: int) -> torch.Tensor:
    """Per column, the sum of the ``k`` smallest entries (exact with ties), shape ``(d,)``."""
    n = X.shape[0]
    if k <= 0:
        return X.new_zeros(X.shape[1])
    if k >= n:
        return X.sum(0)
    if k <= n - k:
        return torch.topk(X, k, dim=0, largest=False, sorted=False).values.sum(0)
    return X.sum(0) - torch.topk(X, n - k, dim=0, largest=True, sorted=False).values.sum(0)


def coordinate_median(X: torch.Tensor) -> torch.Tensor:
    """Per-coordinate median; for even n the mean of the two middle values (as numpy / ``torch.quantile``)."""
    n = X.shape[0]
    lo = torch.kthvalue(X, (n + 1) // 2, dim=0).values
    if n % 2 == 1:
        return lo
    # the upper middle value: lo itself if it occurs at rank n/2 + 1 too, else the smallest entry above lo
    ties = (X <= lo).sum(0) > n // 2
    above = torch.where(X > lo, X, torch.full_like(X, float("inf"))).amin(0)
    hi = torch.where(ties, lo, above)
    return 0.5 * (lo + hi)


def clip_rows(X: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """Scale each row to norm at most ``max_norm``: ``x * min(1, C / ||x||)``."""
    norms = row_norms(X)
    scale = torch.clamp(max_norm / norms.clamp_min(1e-12), max=1.0)
    return X * scale[:, None]
