"""The bitonic order-statistics kernel (``defenses/robust/order_stats.py``) against ``torch.sort``.

Every rank window ``[lo, hi)`` is checked on inputs with ties and infinities, for n on both sides
of every power of two, with blocks narrower than d (several blocks plus a ragged last one), and on
the ``torch.sort`` path used above ``MAX_NETWORK_ROWS``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.robust import order_stats
from defenses.robust.order_stats import coordinate_median, middle_sum, trimmed_mean


def reference(X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.sort(X.double(), dim=0).values[lo:hi].sum(0)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_every_rank_window_matches_sort(n, d, seed, data):
    g = torch.Generator().manual_seed(seed)
    X = torch.round(torch.randn(n, d, generator=g) * 3)  # many ties
    if data.draw(st.booleans()):
        X[torch.rand(n, d, generator=g) < 0.05] = math.inf
        X[torch.rand(n, d, generator=g) < 0.05] = -math.inf
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    got, ref = middle_sum(X, lo, hi).double(), reference(X, lo, hi)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))  # -inf + inf in a window is NaN in both
    ok = ~torch.isnan(ref)
    assert torch.allclose(got[ok], ref[ok], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("n", [2, 3, 7, 8, 9, 31, 32, 33, 50, 64, 65, 100, 129])
def test_median_and_trimmed_mean_across_powers_of_two(n, monkeypatch):
    monkeypatch.setattr(order_stats, "BLOCK_ELEMENTS", 1 << 12)  # several blocks and a ragged last one
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, 5000, generator=g)
    assert torch.allclose(coordinate_median(X), torch.quantile(X, 0.5, dim=0), atol=1e-6)
    for f in {f for f in (0, 1, n // 5, (n - 1) // 2) if 2 * f < n}:
        ref = torch.sort(X, dim=0).values[f:n - f].double().mean(0).float()
        assert torch.allclose(trimmed_mean(X, f), ref, atol=1e-6)


def test_sort_path_above_the_network_limit(monkeypatch):
    monkeypatch.setattr(order_stats, "MAX_NETWORK_ROWS", 4)
    X = torch.randn(9, 3000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(coordinate_median(X), torch.quantile(X, 0.5, dim=0))
    assert torch.allclose(trimmed_mean(X, 2), torch.sort(X, 0).values[2:7].mean(0), atol=1e-6)


def test_huge_byzantine_values_do_not_cancel_honest_ones():
    X = torch.tensor([[1.0], [2.0], [3.0], [3e38], [-3e38]])
    assert float(trimmed_mean(X, 1)) == 2.0  # "sum - extremes" would give inf - inf or 0


def test_nan_column_gives_nan_and_other_columns_are_unaffected():
    X = torch.randn(10, 4)
    X[3, 1] = math.nan
    out = coordinate_median(X)
    assert math.isnan(float(out[1]))
    keep = [0, 2, 3]
    assert torch.allclose(out[keep], torch.quantile(X[:, keep], 0.5, dim=0))


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="lo < hi"):
        middle_sum(torch.zeros(3, 2), 2, 2)
