"""One-run audit (Steinke, Nasr & Jagielski 2023): exact bound, canaries, planted bug."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from attacks.dp_audit.canary import CanaryAudit, audit_dpfedavg, canary_directions
from defenses.robust import clip_rows
from attacks.dp_audit.one_run import audit_from_scores, claimed_epsilon, eps_lower_bound, p_value


def test_p_value_golden_by_hand():
    # m=r=v=1, eps=0: q=1/2, beta=P[Bin(1,1/2)>=1]=1/2, alpha=pmf(0)=1/2, no delta term
    assert p_value(1, 1, 1, 0.0, 0.0) == pytest.approx(0.5)
    # m=r=v=2, eps=ln 3: q=3/4, beta=9/16; alpha=max(pmf(1)=3/8, (3/8+1/16)/2)=3/8; + 3/8*0.1*2*2
    assert p_value(2, 2, 2, math.log(3), 0.1) == pytest.approx(9 / 16 + 0.375 * 0.4)


def test_ceiling_matches_closed_form_and_paper():
    # delta = 0, all 1000 right: largest eps with q^1000 < 0.05, q = e^eps / (1 + e^eps)
    q = 0.05 ** (1 / 1000)
    assert eps_lower_bound(1000, 1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert 5.7 < eps_lower_bound(1000, 1000, 1000, 1e-5) < 5.82  # "about 5.8"


@settings(max_examples=25, deadline=None)
@given(st.integers(10, 300), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_bound_monotone_in_correct_guesses(m, frac_r, frac_v):
    r = max(1, int(m * frac_r))
    v = int(r * frac_v)
    lo = eps_lower_bound(m, r, v, 1e-5)
    hi = eps_lower_bound(m, r, min(v + 1, r), 1e-5)
    assert 0 <= lo <= hi + 1e-9
    if lo > 0:  # the bound is exactly where the p-value crosses 0.05
        assert p_value(m, r, v, lo, 1e-5) < 0.05 <= p_value(m, r, v, lo * 1.01 + 1e-6, 1e-5)


def test_random_guessing_gives_no_bound():
    rng = np.random.default_rng(0)
    res = audit_from_scores(rng.normal(size=1000), rng.random(1000) < 0.5, 1e-5)
    assert res.eps_lower_bound < 0.3


@pytest.mark.parametrize("z,q,rounds", [(2.0, 1.0, 3), (5.0, 0.01, 10), (1.1, 0.3, 20)])
def test_claimed_epsilon_is_the_ledgers_epsilon(z, q, rounds):
    """Issue 21: the one-run audit's "claimed" epsilon and the DP-FedAvg ledger's epsilon come from one
    accountant with one set of RDP orders (defenses.privacy.analysis.ORDERS), so they are equal."""
    from defenses.privacy.guard import DPFedAvgGuard

    guard = DPFedAvgGuard(noise_multiplier=z, sample_rate=q, delta=1e-5)
    guard.load([{"mechanism": "dp-fedavg", "z": z, "q": q, "steps": 1}] * rounds)  # the ledger replayed
    assert claimed_epsilon(z, q, rounds, 1e-5) == guard.epsilon()
    assert claimed_epsilon(0.0, 1.0, 1, 1e-5) == math.inf


def test_claimed_epsilon_does_not_use_opacus_default_orders():
    """Opacus' default orders give another figure here; the claim must follow the ledger's orders."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(5.0, 0.01, 10)]  # optimal order above Opacus' largest default (63): 0.047 vs 0.104
    assert claimed_epsilon(5.0, 0.01, 10, 1e-5) < 0.6 * acc.get_epsilon(1e-5)


def test_canaries_orthonormal_and_clipping():
    u = canary_directions(50, 64, torch.Generator().manual_seed(0))
    assert torch.allclose(u @ u.T, torch.eye(50), atol=1e-5)
    X = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    assert torch.allclose(clip_rows(X, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_planted_bug_audits_at_ceiling_while_claiming_eps_below_one():
    bg = lambda t: 0.1 * torch.randn(10, 1024, generator=torch.Generator().manual_seed(t))
    out = audit_dpfedavg(m=1000, d=1024, noise_multiplier=4.5, forget_noise=True, background=bg)
    assert out["claimed_eps"] <= 1.0
    assert out["correct"] == out["guesses"] == 1000
    assert out["eps_lower_bound"] > 5.7


@pytest.mark.parametrize("z", [4.5, 1.0, 0.5])
def test_correct_mechanism_never_audits_above_claim(z):
    for seed in range(3):
        out = audit_dpfedavg(m=1000, d=1024, noise_multiplier=z, seed=seed)
        assert out["eps_lower_bound"] <= out["claimed_eps"]
        assert out["correct"] < 1000


def test_audit_state_accumulates_scores():
    a = CanaryAudit(20, 32, 1.0, seed=3)
    a.observe(a.canary_rows().sum(0))
    a.observe(a.canary_rows().sum(0))
    assert a.rounds == 2
    assert torch.allclose(a.scores.float(), 2.0 * a.included.float(), atol=1e-5)


def test_observer_in_engine_catches_planted_bug(tmp_path):
    from conftest import digits_config
    from secfed.engine import Engine, read_rounds

    obs = {"name": "dp-audit", "m": 200, "noise_multiplier": 4.5, "forget_noise": True, "canary_dim": 256}
    cfg = digits_config(server={"cohort_size": 5, "observers": [obs]}, run={"rounds": 1},
                        client={"local_steps": 1})
    Engine(cfg, tmp_path / "run", progress=False).run()
    rec = read_rounds(tmp_path / "run")[0]
    assert rec["audit_status"] == "ok" and rec["audit_correct"] == 200
    assert rec["audit_eps_lower_bound"] > 3.0 > 1.0 > rec["audit_claimed_eps"]
