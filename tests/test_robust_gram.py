"""Issue 20's faster paths of the distance-based aggregators agree with the direct computations:

* GeometricMedian's Weiszfeld iterations in n-space from the Gram matrix (one matrix product and one
  final GEMV instead of two passes over X per iteration), with the cancellation guard falling back to
  the exact path bit for bit;
* CenteredClipping's single ``addmv`` step is the paper's formula.
"""

from __future__ import annotations

import pytest
import torch

from defenses.robust import CenteredClipping, GeometricMedian


def data(n, d, seed, offset=0.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64)
            + offset * torch.randn(1, d, generator=g, dtype=torch.float64)).to(dtype)


def cclip_reference(X, tau, L, center):
    """The paper's formula in float64, written out row by row."""
    X = X.double()
    v = torch.zeros(X.shape[1], dtype=torch.float64) if center is None else center.double()
    for _ in range(L):
        step = torch.zeros_like(v)
        for x in X:
            r = x - v
            step += r * min(1.0, tau / max(float(torch.linalg.vector_norm(r)), 1e-30))
        v = v + step / len(X)
    return v


@pytest.mark.parametrize("n,d,tau,L,with_center", [(7, 1000, 1.0, 1, False), (12, 20001, 30.0, 2, True),
                                                   (50, 8193, 0.5, 3, True), (3, 5, 100.0, 1, False)])
def test_centered_clipping_is_the_formula(n, d, tau, L, with_center):
    X = data(n, d, n + d)
    center = 0.1 * data(1, d, 7)[0] if with_center else None
    ref = cclip_reference(X, tau, L, center)
    ours = CenteredClipping(tau, L)(X, center=center)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    X64 = X.double()
    c64 = None if center is None else center.double()
    assert torch.allclose(CenteredClipping(tau, L)(X64, center=c64), cclip_reference(X64, tau, L, c64), rtol=1e-12,
                          atol=1e-14)


@pytest.mark.parametrize("kw", [dict(nu=0.1, max_iter=3, tol=0, init="zeros"), dict(), dict(tol=0, max_iter=20),
                                dict(nu=0.1, max_iter=1, tol=0, init="zeros")])
@pytest.mark.parametrize("n,d", [(7, 1000), (50, 20000)])
def test_geometric_median_gram_path_matches_exact_path(n, d, kw):
    X = data(n, d, n + d)
    agg = GeometricMedian(**kw)
    alpha = torch.full((n,), 1.0 / n)
    assert agg._gram_weiszfeld(X, alpha.double()) is not None  # this data takes the Gram path
    ours, exact = agg(X), agg._exact(X, alpha)
    scale = float(torch.linalg.vector_norm(X - exact, dim=1).max())
    assert float((ours - exact).abs().max()) <= 1e-5 * scale / d ** 0.5 * 10
    X64 = X.double()
    ours64, exact64 = agg(X64), agg._exact(X64, alpha.double())
    assert torch.allclose(ours64, exact64, rtol=0, atol=1e-10 * scale)


def test_geometric_median_guard_takes_the_exact_path_on_cancellation():
    """A large common offset (rows close to each other relative to their norms) fails the guard: the
    result is the exact path's, bit for bit."""
    X = 1e-3 * data(9, 5000, 3) + 10.0
    agg = GeometricMedian()
    alpha = torch.full((9,), 1.0 / 9)
    assert agg._gram_weiszfeld(X, alpha.double()) is None
    assert torch.equal(agg(X), agg._exact(X, alpha))
    # an iterate converging onto a data point fails it too
    Y = torch.zeros(5, 300, dtype=torch.float64)
    Y[1, 0], Y[2, 0], Y[3, 1], Y[4, 1] = 5.0, -4.0, 5.0, -4.0  # at row 0 the unit vectors cancel: it is the median
    Y += 3.0
    agg = GeometricMedian(nu=1e-9, tol=1e-14, max_iter=500)
    assert agg._gram_weiszfeld(Y, torch.full((5,), 0.2, dtype=torch.float64)) is None
    assert torch.equal(agg(Y), agg._exact(Y, torch.full((5,), 0.2, dtype=torch.float64)))
