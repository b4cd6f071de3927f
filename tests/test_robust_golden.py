"""Golden vectors for the robust aggregators and pre-aggregators, each checked by hand
(the arithmetic is in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from defenses.robust import (FLAME, NNM, Bucketing, Bulyan, CenteredClipping, CoordinateMedian, FLTrust,
                             GeometricMedian, Krum, Mean, MultiKrum, NormBound, StaticClip, TrimmedMean)
from defenses.robust._ops import pairwise_sq_dists
from defenses.robust.aggregators import krum_scores

X3 = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_issue_example_median_and_trimmed_mean():
    assert torch.equal(CoordinateMedian()(X3), torch.tensor([4.0, 5, 6]))
    assert torch.equal(TrimmedMean(f=1)(X3), torch.tensor([4.0, 5, 6]))
    assert torch.allclose(Mean()(X3), torch.tensor([4.0, 5, 6]))


def test_median_even_n_averages_the_two_middle_values():
    # column 0: 1 2 | 4 10 -> 3 ; column 1: ties 5 5 | 5 7 -> 5 ; column 2: -1 0 | 0 9 -> 0
    X = t([1, 5, 0], [10, 7, -1], [2, 5, 9], [4, 5, 0])
    assert torch.equal(CoordinateMedian()(X), torch.tensor([3.0, 5, 0]))


def test_trimmed_mean_with_ties_and_outliers():
    # column 0: 0 1 2 100 -> drop 0 and 100 -> 1.5 ; column 1: 3 3 3 3 -> 3
    X = t([0, 3], [100, 3], [1, 3], [2, 3])
    assert torch.equal(TrimmedMean(f=1)(X), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError):
        TrimmedMean(f=2)(X)


# 1-D points 0, 1, 2, 4, 100 with f = 1: n-f-2 = 2 neighbours.
# score(0) = 1 + 4 = 5, score(1) = 1 + 1 = 2, score(2) = 1 + 4 = 5, score(4) = 4 + 9 = 13, score(100) = 96^2 + 98^2.
K = t([0], [1], [2], [4], [100])


def test_krum_scores_and_selection_paper_convention():
    s = krum_scores(pairwise_sq_dists(K), 2)
    assert torch.allclose(s, torch.tensor([5.0, 2, 5, 13, 96.0**2 + 98.0**2], dtype=s.dtype), atol=1e-2)  # float32 Gram
    assert torch.equal(Krum(f=1)(K), torch.tensor([1.0]))
    # Multi-Krum keeps the n-f = 4 lowest scores: points 1, 0, 2, 4 -> mean 7/4
    assert torch.allclose(MultiKrum(f=1)(K), torch.tensor([1.75]))
    assert float(MultiKrum(f=1, m=2)(K)) in (0.5, 1.5)  # point 1 and one of the tied 0 / 2


def test_krum_byzfl_convention_differs():
    # ByzFL: n-f-1 = 3 neighbours. score(0) = 1+4+16 = 21, score(1) = 1+1+9 = 11, score(2) = 1+4+4 = 9 -> picks 2
    assert torch.equal(Krum(f=1, neighbours=3)(K), torch.tensor([2.0]))


def test_bulyan_hand_checked():
    # n = 7, f = 1 (n >= 4f+3), 1-D points 0, 1, 3, 4.5, 5.2, 8, 100; exact score ties go to the lower index.
    X = t([0], [1], [3], [4.5], [5.2], [8], [100])
    sel = Bulyan(f=1).select(X).tolist()
    # round 1 (7 left, 4 nbrs): s(3) = 4 + 2.25 + 4.84 + 9 = 20.09 is the lowest (s(4.5) = 27.24, s(5.2) = 30.81)
    # round 2 (6 left, 3 nbrs): s(4.5) = .49 + 12.25 + 12.25 = 24.99 < s(5.2) = 25.97 < s(1) = 30.89
    # round 3 (5 left, 2 nbrs): s(1) = 1 + 17.64 = 18.64 < s(5.2) = 25.48 < s(0) = 28.04
    # round 4 (0, 5.2, 8, 100; 1 nbr): s(5.2) = s(8) = 7.84 -> 5.2 (lower index)
    # round 5 (0, 8, 100; 1 nbr): s(0) = s(8) = 64 -> 0
    assert sel == [2, 3, 1, 4, 0]
    # selected 3, 4.5, 1, 5.2, 0 -> median 3; beta = 5 - 2 = 3 closest: 3 (0), 4.5 (1.5), 1 (2) -> 8.5 / 3
    assert torch.allclose(Bulyan(f=1)(X), torch.tensor([8.5 / 3]))
    with pytest.raises(ValueError):
        Bulyan(f=2)(X)


def _bulyan_select_reference(X, f):
    """The rule written plainly: each round, mask removed rows to +inf, Krum-score every row, argmin."""
    from defenses.robust._ops import pairwise_sq_dists

    n = X.shape[0]
    D = pairwise_sq_dists(X)
    remaining, chosen = torch.ones(n, dtype=torch.bool), []
    for _ in range(n - 2 * f):
        r = int(remaining.sum())
        k = max(1, min(r - f - 2, r - 1))
        Dm = D.masked_fill(~remaining[None, :], float("inf"))
        scores = torch.sort(Dm, dim=1).values[:, :k + 1].sum(1) if r > 1 else torch.zeros(n, dtype=D.dtype)
        i = int(torch.argmin(scores.masked_fill(~remaining, float("inf"))))
        chosen.append(i)
        remaining[i] = False
    return chosen


@pytest.mark.parametrize("n, f, seed", [(7, 1, 0), (11, 2, 1), (23, 5, 2), (50, 10, 3), (100, 24, 4)])
def test_bulyan_selection_matches_the_plain_rule(n, f, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 40, generator=g) + 0.5 * torch.randn(1, 40, generator=g)
    X[: f] *= 30  # outliers: they must never be chosen before the inliers run out
    assert Bulyan(f).select(X).tolist() == _bulyan_select_reference(X, f)
    # exact ties (the lowest index wins) are test_bulyan_hand_checked's rounds 4 and 5; scores that tie only up to
    # the last bit of their float64 sums may go either way (the sum order is not part of the rule)


def test_geometric_median_equilateral_triangle_and_line():
    tri = t([0, 0], [2, 0], [1, math.sqrt(3)])
    assert torch.allclose(GeometricMedian(nu=1e-8, max_iter=500, tol=1e-10)(tri), torch.tensor([1.0, math.sqrt(3) / 3]), atol=1e-4)
    # on a line the geometric median is the median: 0, 1, 10 -> 1 (robust to the 10)
    assert torch.allclose(GeometricMedian(nu=1e-8, max_iter=1000, tol=0)(t([0], [1], [10])), torch.tensor([1.0]), atol=1e-3)
    # ByzFL mode: from zeros, T=1 iteration with nu=0.1: beta_i = 1/3 / max(0.1, |x_i|) -> z = 3 / (1/1 + 1/10 + 1/0.1)...
    x = t([0], [1], [10])
    b = torch.tensor([1 / 0.1, 1 / 1, 1 / 10]) / 3
    assert torch.allclose(GeometricMedian(nu=0.1, max_iter=1, tol=0, init="zeros")(x), (b @ x) / b.sum())


def test_centered_clipping_hand_checked():
    # center 0, tau 1: ||[3,4]|| = 5 -> scaled by 1/5 -> [0.6, 0.8]; [0,0] stays -> mean [0.3, 0.4]
    X = t([3, 4], [0, 0])
    assert torch.allclose(CenteredClipping(tau=1.0)(X), torch.tensor([0.3, 0.4]))
    # center [3, 4]: diffs [0,0] and [-3,-4] -> [0,0] and [-0.6,-0.8] -> v = [3,4] + [-0.3,-0.4]
    assert torch.allclose(CenteredClipping(tau=1.0)(X, center=torch.tensor([3.0, 4.0])), torch.tensor([2.7, 3.6]))
    # large tau = plain mean; L = 2 iterates
    assert torch.allclose(CenteredClipping(tau=100.0)(X), torch.tensor([1.5, 2.0]))
    # L=2: after step 1 v=[.3,.4]; diffs [2.7,3.6] (norm 4.5 -> x 1/4.5 -> [.6,.8]) and [-.3,-.4] (norm .5) -> v += [.15,.2]
    assert torch.allclose(CenteredClipping(tau=1.0, L=2)(X), torch.tensor([0.45, 0.6]))


def test_fltrust_hand_checked():
    g0 = torch.tensor([1.0, 0.0])
    # TS = relu(cos) = [1, 0, 0]; the first update rescaled to ||g0|| = 1 -> [1, 0]
    assert torch.allclose(FLTrust()(t([2, 0], [0, 3], [-1, 0]), reference=g0), torch.tensor([1.0, 0.0]))
    # TS = [1/sqrt2, 1]; rescaled [1,1]/sqrt2 and [1,0]; out = ([.5,.5] + [1,0]) / (1 + 1/sqrt2)
    out = FLTrust()(t([1, 1], [2, 0]), reference=g0)
    assert torch.allclose(out, torch.tensor([1.5, 0.5]) / (1 + 1 / math.sqrt(2)))
    assert torch.equal(FLTrust()(t([-1, 0]), reference=g0), torch.zeros(2))


def test_flame_drops_the_minority_cluster_and_clips_to_the_median_norm():
    honest = t([1, 0.1], [1, -0.1], [2, 0], [1.5, 0.05])
    bad = t([-5, 0], [-6, 0.1])
    X = torch.cat([honest, bad])
    flame = FLAME(noise=0.0)
    out = flame(X)
    assert flame.last_kept == [0, 1, 2, 3]
    S = float(X.norm(dim=1).median())  # torch's lower median of 6 norms: ||[1.5, .05]|| = 1.5008
    clipped = honest * torch.clamp(S / honest.norm(dim=1), max=1.0)[:, None]
    assert torch.allclose(out, clipped.mean(0))
    # noise: sd = noise * S, reproducible from the call counter
    a, b = FLAME(noise=0.5, seed=3), FLAME(noise=0.5, seed=3)
    assert torch.equal(a(X), b(X))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(X), b(X))


def test_norm_bound_and_static_clip():
    X = t([3, 4], [0, 0.5])
    assert torch.allclose(NormBound(max_norm=1.0)(X), torch.tensor([0.3, 0.65]))
    assert torch.allclose(StaticClip(max_norm=1.0)(X), t([0.6, 0.8], [0, 0.5]))


def test_nnm_hand_checked():
    # f = 1, n = 3: mean of the 2 nearest incl. itself. 0 -> {0,1}, 1 -> {1,0}, 10 -> {10,1}
    assert torch.allclose(NNM(f=1)(t([0], [1], [10])), t([0.5], [0.5], [5.5]))


def test_bucketing_partitions_rows():
    X = t([1], [2], [4], [8])
    out = Bucketing(s=2, seed=0)(X)
    pair_sums = sorted(int(v) for v in (2 * out).flatten().tolist())
    # each bucket sums two distinct powers of two, the buckets partition {1, 2, 4, 8}
    assert sum(pair_sums) == 15 and all(bin(v).count("1") == 2 for v in pair_sums)
    assert Bucketing(s=3)(X).shape == (2, 1)  # ceil(4 / 3)
    # reproducible across a checkpoint
    a, b = Bucketing(s=2, seed=1), Bucketing(s=2, seed=1)
    a(X)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(X), b(X))


@pytest.mark.parametrize("agg", [CoordinateMedian(), TrimmedMean(1), Krum(1), MultiKrum(1), GeometricMedian(),
                                 CenteredClipping(), NormBound(1.0)])
def test_bad_input_is_rejected(agg):
    with pytest.raises(ValueError):
        agg(torch.zeros(0, 3))
    with pytest.raises(ValueError):
        agg(torch.zeros(3))
