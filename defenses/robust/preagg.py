"""Pre-aggregators: ``(n, d) -> (n', d)``, chained in front of an aggregator
(config ``server.pre_aggregators``), e.g. NNM then CenteredClipping.
"""

from __future__ import annotations

from typing import Any

import torch

from defenses.robust._ops import check_f, check_updates, clip_rows, pairwise_sq_dists, rows_out
from secfed.interfaces import derive_seed
from secfed.needs import Need

__all__ = ["NNM", "Bucketing", "StaticClip"]


def _mix(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``M @ X``, a large CPU output in huge pages (``rows_out``: no 4 KiB page fault per page written)."""
    return torch.matmul(M, X, out=rows_out((M.shape[0], X.shape[1]), M, X))


class NNM:
    """Nearest-neighbour mixing (Allouah et al., AISTATS 2023): replace each ``x_i`` by the mean of
    its ``n - f`` nearest neighbours in Euclidean distance, itself included.

    Same as ByzFL's ``NNM(f)`` (up to how exact distance ties are broken). Cost:
    one Gram-matrix product for the distances and one ``(n, n) @ (n, d)`` product
    for the means.
    """

    needs = Need.ROWS

    def __init__(self, f: int = 1) -> None:
        self.f = check_f(f, "NNM")

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        X = check_updates(X, "NNM")
        n = X.shape[0]
        if self.f >= n:
            raise ValueError(f"NNM: needs f < n (n={n}, f={self.f})")
        k = n - self.f
        D = pairwise_sq_dists(X)
        # the point itself has distance 0; make sure it wins a tie with an identical neighbour
        D.diagonal().fill_(-1.0)
        idx = torch.topk(D, k, dim=1, largest=False, sorted=False).indices
        M = torch.zeros(n, n, dtype=X.dtype)
        M.scatter_(1, idx, 1.0 / k)
        return _mix(M, X)


class Bucketing:
    """Bucketing (Karimireddy, He & Jaggi, ICLR 2022): shuffle the n updates, average consecutive
    buckets of ``s``; returns ``ceil(n / s)`` bucket means (the last bucket may be smaller).

    The shuffle is simulation randomness from ``(seed, call counter)``; the counter
    is checkpointed (``state_dict``). ByzFL's ``Bucketing(s)`` is the same rule with
    torch's global RNG.
    """

    needs = Need.ROWS

    def __init__(self, s: int = 2, seed: int = 0) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError("Bucketing: s must be a positive integer")
        self.s, self.seed, self.calls = s, int(seed), 0

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        X = check_updates(X, "Bucketing")
        n = X.shape[0]
        self.calls += 1
        g = torch.Generator().manual_seed(derive_seed(self.seed, "bucketing", self.calls))
        perm = torch.randperm(n, generator=g)
        b = -(-n // self.s)
        bucket = torch.empty(n, dtype=torch.long)
        bucket[perm] = torch.arange(n) // self.s
        M = torch.zeros(b, n, dtype=X.dtype)
        M[bucket, torch.arange(n)] = 1.0
        M = M / M.sum(1, keepdim=True)
        return _mix(M, X)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))


class StaticClip:
    """Static clipping: ``x_i * min(1, max_norm / ||x_i||)`` for each row (ByzFL ``Clipping(c)``)."""

    needs = Need.ROWS

    def __init__(self, max_norm: float = 1.0) -> None:
        if not max_norm > 0:
            raise ValueError("StaticClip: max_norm must be > 0")
        self.max_norm = float(max_norm)

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        return clip_rows(check_updates(X, "StaticClip"), self.max_norm)
