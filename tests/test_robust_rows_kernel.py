"""The selected-rows mean kernel (defenses/robust/_rows_kernel.py, issue 20): Multi-Krum's final mean."""

from __future__ import annotations

import pytest
import torch

RK = pytest.importorskip("defenses.robust._rows_kernel", exc_type=ImportError)


@pytest.mark.parametrize("n, d, idx", [(1, 5, [0]), (3, 0, [1, 2]), (5, 7, [4, 0, 2]), (13, 2 * 2048 + 5, list(range(0, 13, 2))),
                                       (50, 70001, list(range(3, 43))), (4, 2048, [1, 1, 3])])
def test_rows_mean_is_the_float64_mean_rounded_once(n, d, idx):
    """Every shape class (d = 0, one row, a partial last chunk, a repeated index): the float32 rounding of the
    float64 mean of the chosen rows, and nothing from the others."""
    g = torch.Generator().manual_seed(n * 1000 + d)
    X = torch.randn(n, d, generator=g) * torch.logspace(-3, 3, n)[:, None]
    ix = torch.tensor(idx)
    got = RK.rows_mean(X, ix)
    want = (X.double()[ix].sum(0) / len(idx)).float()
    assert got.dtype == torch.float32 and got.shape == (d,)
    assert torch.equal(got, want)  # X's values span 2^20: the float64 sum is exact here, so one rounding


def test_rows_mean_is_independent_of_the_thread_count():
    X = torch.randn(9, 3 * RK.CHUNK + 17)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = RK.rows_mean(X, torch.tensor([0, 3, 8]))
        torch.set_num_threads(2)
        two = RK.rows_mean(X, torch.tensor([0, 3, 8]))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@pytest.mark.parametrize("idx", [[], [9], [-1]])
def test_rows_mean_refuses_bad_indices(idx):
    with pytest.raises(ValueError, match="row indices"):
        RK.rows_mean(torch.randn(9, 10), torch.tensor(idx, dtype=torch.long))


def test_multikrum_routes_float32_to_the_kernel_and_agrees_with_the_gemv(monkeypatch):
    from defenses.robust import _ops, aggregators
    from defenses.robust.aggregators import MultiKrum

    g = torch.Generator().manual_seed(7)
    X = torch.randn(12, 5000, generator=g)
    X[:3] += 5.0  # three outliers: never selected
    assert not RK.supports(X)  # 240 KB: cache-resident, w @ X
    monkeypatch.setattr(RK, "MIN_BYTES", 0)
    calls = []
    real = RK.rows_mean
    monkeypatch.setattr(RK, "rows_mean", lambda X, idx: calls.append(idx.tolist()) or real(X, idx))
    fast = MultiKrum(f=3)(X)
    MultiKrum(f=3)(X.double())
    MultiKrum(f=3)(X.requires_grad_(True))
    assert calls == [list(range(3, 12))]  # sorted, the nine inliers; float64 and grad inputs keep the GEMV
    monkeypatch.setattr(aggregators, "compiled", lambda name: None)
    slow = MultiKrum(f=3)(X.detach())
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-7)
    assert torch.allclose(fast.double(), X.detach().double()[3:].mean(0), rtol=0, atol=1e-7)
    assert _ops.compiled("_rows_kernel") is RK
