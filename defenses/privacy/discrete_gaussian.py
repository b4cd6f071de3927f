"""The discrete Gaussian on the integers, from OS randomness (Canonne, Kamath & Steinke, NeurIPS 2020).

N_Z(0, sigma^2) has pmf P[Y = y] = exp(-y^2 / (2 sigma^2)) / sum_k exp(-k^2 / (2 sigma^2)), y in Z.
A mechanism that adds it to an integer-valued query with L2 sensitivity Delta is
(Delta^2 / (2 sigma^2))-zCDP, i.e. its Renyi divergence of every order alpha is at most
alpha Delta^2 / (2 sigma^2), the continuous Gaussian's (CKS20, Thm 4 / Prop. 5). The output
is an integer: there is no floating-point grid whose holes depend on the input (the leak of
float Gaussian noise, Mironov 2012; review finding 6).

Two samplers, both taking every random bit from the operating system (``secrets`` /
``os.urandom``), never from the run seed:

* :func:`sample_exact` -- CKS20 Algorithm 1 (Bernoulli(exp(-gamma)) by the Taylor-series
  trick), 2 (discrete Laplace) and 3 (rejection from the discrete Laplace with
  t = floor(sigma) + 1), in exact rational arithmetic (:class:`fractions.Fraction`) with
  uniform integers from :func:`secrets.randbelow`. Exactly N_Z(0, sigma^2). Slow (pure
  Python); used for scalars and as the reference of the tests.
* :func:`sample` -- the same rejection scheme vectorised in NumPy for d = 1e5..1e6
  coordinates: Y = G1 - G2 with G_i = floor(-t ln U_i) geometric (P[G >= k] = e^(-k/t), so Y
  is discrete-Laplace with parameter t), accepted with probability
  exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)) (CKS20 Alg. 3), the U's 53-bit uniforms from
  ``os.urandom``. Bound on its deviation from N_Z(0, sigma^2): the only inexact steps are
  (i) U on the grid 2^-53 (0, 1], so P[G >= k] is e^(-k/t) up to an additive 2^-53, and
  (ii) ``log``/``exp`` in float64 (relative error < 2^-50) and the acceptance comparison
  against a 53-bit uniform (additive 2^-53). For |y| <= 12 sigma every event used has
  probability >= e^-13 (~ 2^-19), so each outcome's probability is off by a factor within
  1 +- 2^-30; beyond 12 sigma the exact mass is < e^-72 and the sampler's extra mass is at
  most 2^-52 per proposal (<= 2 proposals expected). Per coordinate this is an extra
  (epsilon', delta') of at most (2^-29, 2^-50); over d = 1e6 coordinates delta' <= 1e-9,
  below the accountant's precision. The integers themselves are exact (int64).
"""

from __future__ import annotations

import math
import os
import secrets
from fractions import Fraction

import numpy as np

# ------------------------------------------------------------------ exact (CKS20, rational arithmetic)


def _bernoulli(p: Fraction) -> bool:
    """Bernoulli(p) for a rational p in [0, 1], exactly."""
    return secrets.randbelow(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction) -> bool:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 (CKS20, Algorithm 1), exactly."""
    gamma = Fraction(gamma)
    if gamma < 0:
        raise ValueError("gamma must be >= 0")
    while gamma > 1:  # exp(-gamma) = exp(-1)^floor(gamma) * exp(-(gamma - floor(gamma)))
        if not bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def discrete_laplace(t: int) -> int:
    """P[Y = y] proportional to exp(-|y| / t), integer t >= 1 (CKS20, Algorithm 2 with s = 1)."""
    while True:
        u = secrets.randbelow(t)
        if not bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while bernoulli_exp(Fraction(1)):
            v += 1
        y = u + t * v
        negative = secrets.randbelow(2) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def sample_exact(sigma2: Fraction | float | int) -> int:
    """One draw of N_Z(0, sigma2), exactly (CKS20, Algorithm 3); sigma2 > 0 (a float is taken exactly)."""
    sigma2 = Fraction(sigma2)
    if sigma2 <= 0:
        raise ValueError("sigma^2 must be > 0")
    t = math.isqrt(math.floor(sigma2)) + 1  # floor(sigma) + 1
    while True:
        y = discrete_laplace(t)
        gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
        if bernoulli_exp(gamma):
            return y


# ------------------------------------------------------------------ vectorised (documented bound above)


def _uniform_open0(n: int) -> np.ndarray:
    """n uniforms in (0, 1] from 53-bit integers from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return (raw.astype(np.float64) + 1.0) * 2.0**-53


def _uniform_closed0(n: int) -> np.ndarray:
    """n uniforms in [0, 1) from 53-bit integers from os.urandom."""
    raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return raw.astype(np.float64) * 2.0**-53


def sample(sigma: float, size: int) -> np.ndarray:
    """``size`` draws of N_Z(0, sigma^2) as int64 (vectorised CKS20 Alg. 3; bound in the module docstring)."""
    sigma = float(sigma)
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number (got {sigma})")
    if sigma > 2.0**40:
        raise ValueError("sigma too large for int64 samples")
    size = int(size)
    out = np.empty(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    sigma2 = sigma * sigma
    filled = 0
    while filled < size:
        m = 2 * (size - filled) + 64  # acceptance is > 1/2 (CKS20, Sec. 5.3)
        g1 = np.floor(-t * np.log(_uniform_open0(m)))
        g2 = np.floor(-t * np.log(_uniform_open0(m)))
        y = g1 - g2
        accept = _uniform_closed0(m) < np.exp(-((np.abs(y) - sigma2 / t) ** 2) / (2 * sigma2))
        got = y[accept][: size - filled]
        out[filled:filled + got.size] = got.astype(np.int64)
        filled += got.size
    return out


def pmf(y: np.ndarray | int, sigma: float) -> np.ndarray:
    """The exact pmf of N_Z(0, sigma^2) at y (normaliser summed to 40 sigma; for tests and docs)."""
    k = np.arange(-math.ceil(40 * sigma) - 1, math.ceil(40 * sigma) + 2, dtype=np.float64)
    norm = float(np.exp(-(k**2) / (2 * sigma * sigma)).sum())
    y = np.asarray(y, dtype=np.float64)
    return np.exp(-(y**2) / (2 * sigma * sigma)) / norm


def variance(sigma: float) -> float:
    """Var of N_Z(0, sigma^2) (slightly below sigma^2; CKS20 Prop. 19)."""
    k = np.arange(-math.ceil(40 * sigma) - 1, math.ceil(40 * sigma) + 2, dtype=np.float64)
    w = np.exp(-(k**2) / (2 * sigma * sigma))
    return float((w * k**2).sum() / w.sum())
