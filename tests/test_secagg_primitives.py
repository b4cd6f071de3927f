"""SecAgg+ building blocks: Shamir over GF(2^256 + 297), AES-CTR masks, quantisation, the graph."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.secure_aggregation import graph, shamir
from defenses.secure_aggregation.prg import MaskExpander, derive_key
from defenses.secure_aggregation.quantize import Quantizer, choose_bits
from secfed.errors import ConfigError, MalformedMessage

P = shamir.PRIME


def _b(v: int) -> bytes:
    return v.to_bytes(32, "big")


# ------------------------------------------------------------------ Shamir
def test_prime_is_the_smallest_above_2_256():
    import sympy

    assert sympy.isprime(P) and sympy.nextprime(1 << 256) == P


def test_shamir_golden_vectors_by_hand():
    # f(x) = 5 + 3x: f(1) = 8, f(2) = 11
    assert shamir.combine([(1, 8), (2, 11)], 2) == _b(5)
    # f(x) = 7 + 2x + x^2: f(1) = 10, f(2) = 15, f(3) = 22; any order
    assert shamir.combine([(3, 22), (1, 10), (2, 15)], 3) == _b(7)
    # wrap-around in the field: f(x) = 1 + (p - 1) x: f(1) = 0, f(2) = p - 1
    assert shamir.combine([(1, 0), (2, P - 1)], 2) == _b(1)
    # t = 1: the share is the secret
    assert shamir.combine([(9, 42)], 1) == _b(42)


@settings(max_examples=25, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), k=st.integers(1, 12), data=st.data())
def test_shamir_any_t_shares_reconstruct(secret, k, data):
    t = data.draw(st.integers(1, k))
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k, unique=True))
    ys = shamir.split(secret, t, xs)
    subset = data.draw(st.permutations(list(zip(xs, ys))))[:t]
    assert shamir.combine(subset, t) == secret


def test_shamir_fewer_than_t_or_bad_shares_fail():
    secret = os.urandom(32)
    xs = [1, 2, 3, 4, 5]
    ys = shamir.split(secret, 3, xs)
    with pytest.raises(MalformedMessage):
        shamir.combine(list(zip(xs, ys))[:2], 3)
    with pytest.raises(MalformedMessage):
        shamir.combine([(1, ys[0]), (1, ys[1]), (3, ys[2])], 3)
    with pytest.raises(MalformedMessage):
        shamir.combine([(1, P), (2, ys[1]), (3, ys[2])], 3)
    # t - 1 shares plus a wrong one give a different value (or an invalid one)
    try:
        assert shamir.combine([(1, ys[0]), (2, ys[1]), (3, (ys[2] + 1) % P)], 3) != secret
    except MalformedMessage:
        pass
    with pytest.raises(ValueError):
        shamir.split(secret, 6, xs)
    with pytest.raises(ValueError):
        shamir.split(secret, 2, [1, 1, 2])


def test_shamir_coefficients_are_fresh():
    s = os.urandom(32)
    assert shamir.split(s, 3, [1, 2, 3]) != shamir.split(s, 3, [1, 2, 3])


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("ring_bits", [32, 64])
def test_mask_is_the_aes_ctr_keystream(ring_bits):
    key = os.urandom(32)
    d = 1000
    e = MaskExpander(d, ring_bits)
    raw = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(d * ring_bits // 8))
    assert np.array_equal(e.expand(key), np.frombuffer(raw, dtype=f"<u{ring_bits // 8}"))
    acc = np.zeros(d, dtype=f"<u{ring_bits // 8}")
    e.add(acc, key, +1)
    e.add(acc, key, -1)
    assert not acc.any()  # + then - cancels exactly mod 2^b
    assert not np.array_equal(e.expand(key), e.expand(os.urandom(32)))


def test_derive_key_separates_contexts():
    s = os.urandom(32)
    assert derive_key(s, b"a") != derive_key(s, b"b") and len(derive_key(s, b"a")) == 32


# ------------------------------------------------------------------ quantisation
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 1000), w=st.sampled_from([1, 7, 1000, 65536]), bits=st.sampled_from(["auto", 8, 16, 24]))
def test_extreme_sum_never_wraps(n, w, bits):
    try:
        q, b = choose_bits(n, w, bits)
    except ConfigError:
        return
    Q = 2 ** (q - 1) - 1
    assert n * w * Q < 2 ** (b - 1)  # the largest possible |sum| stays signed-representable
    quant = Quantizer(1.0, q, b)
    one = quant.encode(np.array([1.0, -1.0]), w, torch.Generator().manual_seed(0))
    ring = (one.astype(object) * n) % (1 << b)  # n clients all at the extremes
    total, tw = quant.decode(np.array([int(v) for v in ring], dtype=one.dtype))
    assert total[0] == pytest.approx(n * w) and total[1] == pytest.approx(-n * w) and tw == n * w


def test_choose_bits_refuses_impossible_and_prefers_32_bit_ring():
    assert choose_bits(100, 1, "auto") == (25, 32)
    assert choose_bits(4, 65536, "auto")[1] == 64
    with pytest.raises(ConfigError, match="bits"):
        choose_bits(100, 65536, 60)


def test_stochastic_rounding_is_unbiased():
    quant = Quantizer(1.0, 8, 32)  # coarse grid: step 1/127
    x = np.full(200_000, 0.3 / 127)  # 0.3 of a step
    z = quant.encode(x, 1, torch.Generator().manual_seed(0))[:-1].view(np.int32)
    assert set(np.unique(z)) == {0, 1}
    assert abs(z.mean() - 0.3) < 0.005  # 5 sigma is about 0.005


def test_out_of_range_is_reported_not_clipped():
    quant = Quantizer(0.5, 16, 32)
    assert quant.check(np.array([0.1, -0.5]), 3.0, 10) is None
    assert "outside [-clip_range, clip_range]" in quant.check(np.array([0.1, 0.6]), 1.0, 10)
    assert "non-finite" in quant.check(np.array([np.nan]), 1.0, 10)
    assert "weight" in quant.check(np.array([0.1]), 2.5, 10)
    assert "weight" in quant.check(np.array([0.1]), 11.0, 10)


# ------------------------------------------------------------------ graph
@pytest.mark.parametrize("n,k", [(10, 4), (11, 4), (100, 34), (12, 5)])
def test_harary_is_k_regular_and_symmetric(n, k):
    nb = graph.harary(n, k)
    assert all(len(s) == k and i not in s for i, s in enumerate(nb))
    assert all(i in nb[j] for i, s in enumerate(nb) for j in s)


def test_neighbour_graph_relabels_randomly():
    ids = list(range(100, 140))
    g1 = graph.neighbour_graph(ids, 6, torch.Generator().manual_seed(1))
    g2 = graph.neighbour_graph(ids, 6, torch.Generator().manual_seed(2))
    assert set(g1) == set(ids) and g1 != g2


def test_degree_choice_meets_both_bounds():
    for n in (50, 100, 1000, 10_000):
        k, t = graph.choose_degree(n, 0.05, 0.1, 1e-6, 40)
        assert t > (k + 1) / 2
        if k < n - 1:
            assert graph.security_ok(n, k, t, 0.05, 40) and graph.recovery_ok(n, k, t, 0.1, 1e-6)
            assert k <= 8 * math.log2(n)  # O(log n)
    assert graph.choose_degree(10, 0.05, 0.1, 1e-6, 40) == (9, 6)  # small cohorts: complete graph


def test_binomial_tail_matches_scipy():
    from scipy.stats import binom

    for k, t, p in [(34, 18, 0.05), (35, 18, 0.9), (10, 0, 0.3), (10, 11, 0.3)]:
        assert graph.binom_sf(t, k, p) == pytest.approx(binom.sf(t - 1, k, p), rel=1e-9, abs=1e-300)
