"""Privacy accounting maths: epsilon of a composed Poisson-subsampled Gaussian, and calibration.

A *history* is a list of ``(noise_multiplier, sample_rate, steps)`` triples, the same
convention as Opacus' accountants: ``steps`` compositions of the sampled Gaussian
mechanism with noise std ``z * sensitivity`` and Poisson sampling rate ``q``.

* ``"rdp"``: Renyi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar & Zhang
  2019), converted to (epsilon, delta) with the improved conversion of Balle et al.
  2020 as Opacus does. The orders are Google ``dp-accounting``'s default set (finer
  and wider than Opacus' default), so both report the same figure.
* ``"prv"``: privacy random variables (Gopi, Lee & Wutschitz 2021) through Opacus'
  ``PRVAccountant``; the reported value is the *upper* end of its error interval
  (``eps_error``), so it is a guarantee, not an estimate.

Calibration is a binary search over the accountant: (target epsilon, delta, q, steps)
-> the smallest z on a 1e-3 relative grid, or (target epsilon, delta, q, z) -> the
largest number of rounds. An impossible request raises :class:`ConfigError` naming
the config key.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from secfed.errors import ConfigError

History = list[tuple[float, float, int]]

# dp-accounting's DEFAULT_RDP_ORDERS (rdp_privacy_accountant.py)
ORDERS: list[float] = ([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])

ACCOUNTANTS = ("rdp", "prv")
MAX_NOISE = 1e4
MAX_ROUNDS = 10_000_000


def _clean(history: Iterable[tuple[float, float, int]]) -> History:
    """Drop empty steps and merge repeats of the same (z, q) (composition is order-free)."""
    merged: dict[tuple[float, float], int] = {}
    for z, q, steps in history:
        if steps <= 0 or q <= 0:
            continue  # nothing released, or nobody sampled
        if not (z >= 0 and 0 < q <= 1):
            raise ValueError(f"bad mechanism (z={z}, q={q})")
        key = (float(z), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    return [(z, q, s) for (z, q), s in merged.items()]


@functools.lru_cache(maxsize=4096)
def _rdp_one(q: float, z: float) -> np.ndarray:
    """RDP of one sampled-Gaussian step at every order of ORDERS (RDP is additive in steps)."""
    return np.asarray(rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=ORDERS), dtype=np.float64)


def rdp_epsilon(history: Iterable[tuple[float, float, int]], delta: float, orders: list[float] | None = None) -> float:
    """epsilon at ``delta`` of the composed history by RDP (inf if some step has z = 0)."""
    hist = _clean(history)
    if not hist:
        return 0.0
    if any(z == 0 for z, _, _ in hist):
        return math.inf
    if orders is None:
        rdp = sum(_rdp_one(q, z) * s for z, q, s in hist)
        orders = ORDERS
    else:
        rdp = sum(rdp_analysis.compute_rdp(q=q, noise_multiplier=z, steps=s, orders=orders) for z, q, s in hist)
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


def prv_epsilon(history: Iterable[tuple[float, float, int]], delta: float, eps_error: float = 0.01) -> float:
    """epsilon at ``delta`` by the PRV accountant: an upper bound within ``eps_error`` of the truth."""
    hist = _clean(history)
    if not hist:
        return 0.0
    if any(z == 0 for z, _, _ in hist):
        return math.inf
    acc = PRVAccountant()
    acc.history = list(hist)
    return float(acc.get_epsilon(delta=delta, eps_error=eps_error))


def epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    if accountant == "rdp":
        return rdp_epsilon(history, delta)
    if accountant == "prv":
        return prv_epsilon(history, delta)
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def adaptive_update_noise(noise_multiplier: float, count_noise_std: float) -> float:
    """Andrew et al. 2021, Thm 1: z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).

    With the update noised at z_Delta (sensitivity C) and the clipped-count sum noised
    at sigma_b (sensitivity 1/2 after centering b_i - 1/2), the pair is exactly one
    Gaussian mechanism with multiplier z, so the accountant charges z.
    """
    if noise_multiplier <= 0:
        raise ConfigError("adaptive clipping needs a noise multiplier > 0")
    if 2 * count_noise_std <= noise_multiplier:
        raise ConfigError(f"config key 'server.stages.adaptive-clip.count_noise_std': must exceed z/2 = "
                          f"{noise_multiplier / 2:.4g} (got {count_noise_std:.4g}); the count's noise would spend the whole budget")
    return (noise_multiplier ** -2 - (2 * count_noise_std) ** -2) ** -0.5


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    key: str = "server.privacy") -> float:
    """The smallest noise multiplier z with epsilon(z, q, steps, delta) <= target (to 0.1%)."""
    if steps <= 0:
        raise ConfigError(f"config key '{key}': nothing to calibrate for 0 steps")
    return calibrate_noise_for(lambda z: [(z, sample_rate, steps)], target_epsilon, delta, accountant, key)


def calibrate_noise_for(histories, target_epsilon: float, delta: float, accountant: str = "rdp",
                        key: str = "server.privacy") -> float:
    """The smallest z (to 0.1%) such that every history in ``histories(z)`` stays within epsilon.

    ``histories(z)`` returns one history, or a list of histories (e.g. one per client
    for sample-level DP: the guarantee is the worst of them).
    """
    _check_target(target_epsilon, delta, key)

    def worst(z: float) -> float:
        h = histories(z)
        hs = h if h and isinstance(h[0], list) else [h]
        return max(epsilon(x, delta, accountant) for x in hs)

    return smallest_noise(worst, target_epsilon, delta, key)


def smallest_noise(eps_of, target_epsilon: float, delta: float, key: str = "server.privacy",
                   what: str = "this sampling rate and number of steps") -> float:
    """The smallest z (to 0.1%) with ``eps_of(z) <= target``: doubling from 1, then bisection
    (epsilon falls monotonically in z); ConfigError naming ``key`` past ``MAX_NOISE``."""
    lo, hi = 0.0, 1.0
    while eps_of(hi) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > MAX_NOISE:
            raise ConfigError(f"config key '{key}.epsilon': epsilon={target_epsilon} at delta={delta} is out of reach "
                              f"for {what} (noise multiplier > {MAX_NOISE:g}); raise epsilon or lower run.rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if eps_of(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def calibrate_rounds(target_epsilon: float, delta: float, round_history: History, accountant: str = "rdp",
                     key: str = "server.privacy") -> int:
    """The largest T such that T repetitions of ``round_history`` stay within epsilon.

    Raises ConfigError if not even one round fits.
    """
    _check_target(target_epsilon, delta, key)
    hist = _clean(round_history)

    def fits(t: int) -> bool:
        return epsilon([(z, q, s * t) for z, q, s in hist], delta, accountant) <= target_epsilon

    if not fits(1):
        one = epsilon(hist, delta, accountant)
        raise ConfigError(f"config key '{key}.epsilon': a single round already spends epsilon={one:.4g} > {target_epsilon} "
                          "at this noise multiplier; raise noise_multiplier or epsilon")
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_ROUNDS:
            return MAX_ROUNDS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _check_target(target_epsilon: float, delta: float, key: str) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"config key '{key}.epsilon': must be a positive number (got {target_epsilon})")
    if not (0 < delta < 1):
        raise ConfigError(f"config key '{key}.delta': must be in (0, 1) (got {delta})")
