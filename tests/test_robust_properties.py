"""Property tests: permutation invariance, translation equivariance, and outputs inside the
honest hull where the theory says so (Yin et al. 2018 for the coordinate-wise rules)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.robust import (NNM, Bulyan, CenteredClipping, CoordinateMedian, GeometricMedian, Krum, Mean, MultiKrum,
                             TrimmedMean)
from defenses.robust._ops import pairwise_sq_dists
from defenses.robust.order_stats import coordinate_median

SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def updates(draw, min_n=3, max_n=12, max_d=6):
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-2, 1.0, 1e2]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g) * scale).double(), seed


def rules(n, order_free=False):
    """The rules to check. With one neighbour, Krum scores of a mutually-nearest pair tie exactly and the
    index order decides; Bulyan's last Krum rounds always have one neighbour, so it is checked for
    equivariance only."""
    f = max(0, (n - 3) // 4)
    out = [Mean(), CoordinateMedian(), TrimmedMean(f), GeometricMedian(tol=1e-12, max_iter=300), CenteredClipping(1.0, L=3)]
    if n - f - 2 >= 2:
        out += [Krum(f), MultiKrum(f)]
    if n >= 4 * f + 3 and not order_free:
        out.append(Bulyan(f))
    return out


@SETTINGS
@given(updates())
def test_permutation_invariance(data):
    X, seed = data
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed + 1))
    for agg in rules(len(X), order_free=True):
        a, b = agg(X), agg(X[perm])
        assert torch.allclose(a, b, atol=1e-8 * float(X.abs().max()) + 1e-9), type(agg).__name__


@SETTINGS
@given(updates(), st.floats(-50, 50))
def test_translation_equivariance(data, shift):
    X, seed = data
    t = torch.linspace(-1, 1, X.shape[1], dtype=X.dtype) * shift
    for agg in rules(len(X)):
        kw = {"center": t.clone()} if isinstance(agg, CenteredClipping) else {}
        base = agg(X, center=torch.zeros(X.shape[1], dtype=X.dtype)) if kw else agg(X)
        moved = agg(X + t, **kw)
        tol = 1e-6 * (float(X.abs().max()) + abs(shift)) + 1e-9
        assert torch.allclose(moved, base + t, atol=tol), type(agg).__name__
    nnm = NNM(f=1)
    assert torch.allclose(nnm(X + t), nnm(X) + t, atol=1e-6 * (float(X.abs().max()) + abs(shift)) + 1e-9)


@SETTINGS
@given(updates(min_n=5), st.floats(1e3, 1e9), st.integers(0, 10))
def test_coordinatewise_rules_stay_in_the_honest_range(data, magnitude, which):
    """With f < n/2 arbitrary rows, median and trimmed mean (f per side) lie, per coordinate,
    between the smallest and largest honest value."""
    X, seed = data
    n = len(X)
    f = (n - 1) // 2
    bad = torch.full((f, X.shape[1]), magnitude * (-1) ** which, dtype=X.dtype)
    Y = torch.cat([X[: n - f], bad])
    honest = X[: n - f]
    lo, hi = honest.min(0).values, honest.max(0).values
    for out in (CoordinateMedian()(Y), TrimmedMean(f)(Y)):
        assert bool(((out >= lo - 1e-9) & (out <= hi + 1e-9)).all())


@SETTINGS
@given(updates(min_n=2, max_n=9))
def test_median_and_trimmed_mean_match_sort_references(data):
    X, _ = data
    X = torch.round(X * 2) / 2  # many ties
    S = torch.sort(X, dim=0).values
    n = len(X)
    ref = S[(n - 1) // 2] if n % 2 else 0.5 * (S[n // 2 - 1] + S[n // 2])
    assert torch.allclose(coordinate_median(X), ref)
    for f in range(0, (n - 1) // 2 + 1):
        assert torch.allclose(TrimmedMean(f)(X), S[f:n - f].mean(0))


@SETTINGS
@given(updates(min_n=2, max_n=10, max_d=8))
def test_pairwise_distances_match_cdist(data):
    X, _ = data
    ref = torch.cdist(X, X) ** 2
    assert torch.allclose(pairwise_sq_dists(X), ref, rtol=1e-6, atol=1e-9 * float((X * X).sum(1).max()) + 1e-12)
    # a large common offset takes the centred path and stays accurate
    Y = X.float() + 100.0 * X.abs().max().float()
    Yd = Y.double()
    ref = torch.cdist(Yd, Yd) ** 2
    assert torch.allclose(pairwise_sq_dists(Y), ref, rtol=1e-4, atol=1e-4 * float(ref.max()) + 1e-12)
