"""Empirical epsilon lower bound from a membership-inference threshold test.

Any (eps, delta)-DP mechanism bounds every test between members and non-members by
``TPR <= e^eps FPR + delta`` (and the same with the roles swapped; Kairouz, Oh & Viswanath
2015). Given attack scores of members and non-members (e.g. the loss-threshold scores of
``mia.loss_scores``), a threshold is picked on one half of the examples and the counts on
the other half are turned into a bound with two-sided 95% Clopper-Pearson intervals
(Jagielski, Ullman & Oprea 2020): ``eps_lb = log((TPR_lo - delta) / FPR_hi)``. Choosing
the threshold on separate examples keeps the selection from biasing the bound.
"""

from __future__ import annotations

import math

import numpy as np


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Two-sided (1 - alpha) Clopper-Pearson interval for a binomial proportion k / n."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def epsilon_lower_bound(tp: int, n_pos: int, fp: int, n_neg: int, delta: float, alpha: float = 0.05) -> float:
    """Largest eps the counts rule out at confidence 1 - alpha: TPR <= e^eps FPR + delta (and the swap)."""
    tpr_lo, _ = clopper_pearson(tp, n_pos, alpha)
    _, fpr_hi = clopper_pearson(fp, n_neg, alpha)
    tnr_lo, _ = clopper_pearson(n_neg - fp, n_neg, alpha)
    _, fnr_hi = clopper_pearson(n_pos - tp, n_pos, alpha)
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def threshold_epsilon_lower_bound(s_in: np.ndarray, s_out: np.ndarray, delta: float) -> float:
    """Threshold chosen on the first half of each score array, bound counted on the second half."""
    half_in, half_out = len(s_in) // 2, len(s_out) // 2
    a_in, b_in = s_in[:half_in], s_in[half_in:]
    a_out, b_out = s_out[:half_out], s_out[half_out:]
    best_t, best_e = None, -1.0
    for t in np.unique(np.r_[a_in, a_out]):
        e = epsilon_lower_bound(int((a_in >= t).sum()), len(a_in), int((a_out >= t).sum()), len(a_out), delta)
        if e > best_e:
            best_t, best_e = t, e
    if best_t is None:
        return 0.0
    return epsilon_lower_bound(int((b_in >= best_t).sum()), len(b_in), int((b_out >= best_t).sum()), len(b_out), delta)
