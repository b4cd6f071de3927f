"""The one-run privacy audit of Steinke, Nasr & Jagielski (NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", arXiv:2305.08846. ``m`` canaries are
each included independently with probability 1/2; after one training run the
auditor guesses "in" for some canaries and "out" for others (``r`` guesses in all,
abstaining on the rest) and gets ``v`` right. Under (eps, delta)-DP the number of
correct guesses is stochastically dominated by Binomial(r, q), q = e^eps/(1+e^eps),
up to a delta term (their Theorem 3.1 / Proposition 5.7). :func:`p_value` is that
tail bound, computed exactly as in the paper's Algorithm (appendix code); the
audited lower bound :func:`eps_lower_bound` is the largest eps whose p-value is
still below ``1 - confidence``, found by doubling then 30 bisection steps, exactly
as the paper's ``get_eps_audit``.

Ceiling: with m = r = v = 1000, delta = 1e-5 and 95% confidence the bound cannot
exceed about 5.8 whatever the mechanism (q^1000 >= 0.05 - delta term).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[>= v correct out of r guesses] under an (eps, delta)-DP null hypothesis (paper's Algorithm)."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need eps >= 0 and 0 <= delta <= 1, got eps={eps} delta={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0:
        return 1.0
    # alpha = max_i P[v > Binomial(r, q) >= v - i] / i, i = 1..v (the paper's loop, vectorised;
    # np.cumsum adds in the same order as the loop)
    acc = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(acc / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def eps_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest eps such that ``p_value(m, r, v, eps, delta) < 1 - confidence`` (0 if none)."""
    p = 1.0 - confidence
    if not 0 < p < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < p:
        lo, hi = hi, 2 * hi
    for _ in range(30):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < p:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditResult:
    eps_lower_bound: float
    m: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def audit_from_scores(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.95,
                      k_plus: int | None = None, k_minus: int | None = None,
                      threshold: float | None = None) -> AuditResult:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest; bound eps.

    With ``threshold`` (and no k's) every canary is guessed: "in" iff its score exceeds
    the threshold. With nothing given, the m // 2 highest are "in", the rest "out".
    The rule must be fixed before ``included`` is looked at (choosing the best of
    many rules afterwards inflates the bound).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != (m,):
        raise ValueError("scores and included must have the same length")
    if k_plus is None and k_minus is None and threshold is not None:
        k_plus = int((scores > threshold).sum())
        k_minus = m - k_plus
    elif k_plus is None and k_minus is None:
        k_plus, k_minus = m // 2, m - m // 2
    k_plus, k_minus = int(k_plus or 0), int(k_minus or 0)
    if k_plus + k_minus > m:
        raise ValueError(f"k_plus + k_minus = {k_plus + k_minus} exceeds m = {m}")
    order = np.argsort(-scores, kind="stable")
    v = int(included[order[:k_plus]].sum()) + int((~included[order[m - k_minus:]]).sum() if k_minus else 0)
    r = k_plus + k_minus
    return AuditResult(eps_lower_bound(m, r, v, delta, confidence), m, r, v, k_plus, k_minus)


def claimed_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """The epsilon the privacy ledger claims for ``steps`` sampled-Gaussian steps: the ledger's own RDP
    accountant (:func:`defenses.privacy.analysis.epsilon`, its one set of orders ``ORDERS``), so the audit's
    "claimed" epsilon and the run's ledger can never differ by a choice of orders."""
    from defenses.privacy.analysis import epsilon

    if noise_multiplier <= 0:
        return math.inf
    return epsilon([(noise_multiplier, sample_rate, steps)], delta, "rdp")
