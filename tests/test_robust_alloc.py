"""Large aggregator outputs in huge pages (``_ops.empty_rows``): same values, memory given back."""

from __future__ import annotations

import resource

import torch

from defenses.robust import NNM, Bucketing, StaticClip
from defenses.robust._ops import HUGE_MIN_BYTES, empty_rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_empty_rows_small_is_torch_empty_and_large_is_a_plain_tensor():
    small = empty_rows((3, 4))
    assert small.shape == (3, 4) and small.dtype == torch.float32
    n, d = 4, HUGE_MIN_BYTES // 4 // 4 + 123  # just over the threshold, not a multiple of the 2 MiB page
    big = empty_rows((n, d))
    assert big.shape == (n, d) and big.is_contiguous() and big.dtype == torch.float32
    big.fill_(1.5)
    assert float(big.sum()) == 1.5 * n * d
    assert empty_rows((2, HUGE_MIN_BYTES // 8), torch.float64).dtype == torch.float64


def test_empty_rows_memory_is_returned_when_the_tensor_is_freed():
    shape = (8, 2 * HUGE_MIN_BYTES // 32)  # 32 MiB each
    before = _rss_mib()
    for _ in range(12):  # 384 MiB in all if nothing were returned
        t = empty_rows(shape)
        t.fill_(1.0)
        del t
    assert _rss_mib() - before < 100


def test_preaggregators_give_the_same_values_through_the_huge_page_outputs():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, HUGE_MIN_BYTES // 4 // 6 + 7, generator=g)
    assert X.numel() * 4 >= HUGE_MIN_BYTES
    norms = torch.linalg.vector_norm(X, dim=1)
    c = float(norms.median())
    assert torch.equal(StaticClip(c)(X), X * torch.clamp(c / norms.clamp_min(1e-12), max=1.0)[:, None])
    out = NNM(f=2)(X)
    D = torch.cdist(X.double(), X.double())
    ref = torch.stack([X[D[i].argsort()[:4]].double().mean(0) for i in range(6)]).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    b = Bucketing(s=4, seed=3)(X)
    assert b.shape == (2, X.shape[1]) and torch.isfinite(b).all()
