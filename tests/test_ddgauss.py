"""The distributed discrete Gaussian (Kairouz, Liu & Steinke 2021) under SecAgg+: sampler, formulas, accounting, runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants.analysis import rdp as rdp_analysis
from scipy import stats

from defenses.privacy import discrete_gaussian as dg
from defenses.privacy.clipping import round_info
from secfed.rounds import Accounted
from defenses.privacy.ddgauss import (ORDERS, DDGaussAccountant, DDGaussMechanism, DDGaussNoise, Rotation, ddgauss_rdp,
                                      fwht, poisson_subsampled_rdp, rounded_l1_bound, rounded_l2_bound, shares_for, tau)
from defenses.secure_aggregation.secagg import SecAggPlus
from secfed.engine import Engine, read_rounds
from secfed.errors import ConfigError
from secfed.interfaces import ClientUpdate, DropoutPlan, RoundContext
from secfed.spec import ParamSpec

from conftest import digits_config


# ------------------------------------------------------------------ the sampler against its distribution


def _chi_square(x: np.ndarray, sigma: float, half: int) -> tuple[float, int]:
    """Pearson statistic over bins -half..half plus the two tails, against the exact pmf."""
    ys = np.arange(-half, half + 1)
    p = dg.pmf(ys, sigma)
    tail = (1.0 - p.sum()) / 2
    obs = np.array([(x < -half).sum()] + [(x == y).sum() for y in ys] + [(x > half).sum()], dtype=np.float64)
    exp = np.concatenate([[tail], p, [tail]]) * x.size
    keep = exp >= 5
    return float((((obs - exp) ** 2)[keep] / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_vectorised_sampler_passes_chi_square(sigma):
    x = dg.sample(sigma, 200_000)
    stat, df = _chi_square(x, sigma, 6)
    assert stat < stats.chi2.ppf(1 - 1e-9, df), (stat, df)  # OS randomness: false failure 1e-9


def test_exact_sampler_passes_chi_square():
    x = np.array([dg.sample_exact(1.0) for _ in range(3000)])
    stat, df = _chi_square(x, 1.0, 3)
    # bins y = +-3 expect 13 counts only: the chi-square law understates the statistic's tail there (at the
    # 1 - 1e-9 quantile one such bin alone exceeds it with probability 2.4e-9, exact binomial); at 1 - 1e-12
    # the single-bin excursions total 4e-11
    assert stat < stats.chi2.ppf(1 - 1e-12, df), (stat, df)


def test_exact_variance_and_tail_hand_computed():
    # sigma = 1/2: Var = 2 (e^-2 + 4 e^-8 + 9 e^-18) / (1 + 2 (e^-2 + e^-8 + e^-18)) = 0.273353 / 1.271340 = 0.215013
    assert dg.variance(0.5) == pytest.approx(0.215013, rel=1e-5)
    # P[|Y| >= 2] at sigma = 1: 2 (e^-2 + e^-4.5 + e^-8 + ...) / (1 + 2 (e^-0.5 + e^-2 + e^-4.5 + e^-8 + ...))
    #   = 2 * 0.146783 / 2.506628 = 0.117116
    assert 2 * float(dg.pmf(np.arange(2, 50), 1.0).sum()) == pytest.approx(0.117116, rel=1e-4)
    x = dg.sample(1.0, 400_000)
    assert (np.abs(x) >= 2).mean() == pytest.approx(0.117116, abs=6 * math.sqrt(0.117 / 400_000))
    assert x.var() == pytest.approx(dg.variance(1.0), rel=0.02)


# ------------------------------------------------------------------ the formulas, by hand


def test_rounding_sensitivity_hand_computed():
    # c/gamma = 10, d = 16, beta = e^-1/2: bound_1 = 10 + 4 = 14;
    # bound_2^2 = 100 + 16/4 + sqrt(2 * 1/2) * (10 + 4/2) = 104 + 12 = 116 -> 10.7703
    assert rounded_l2_bound(10.0, 16, math.exp(-0.5)) == pytest.approx(math.sqrt(116))
    assert rounded_l2_bound(10.0, 16, 0.0) == 14.0
    assert rounded_l1_bound(math.sqrt(116), 16) == pytest.approx(4 * math.sqrt(116))  # min(sqrt(d), Delta_2) = 4
    assert rounded_l1_bound(2.0, 16) == 4.0  # L1 <= L2^2 for integer vectors


def test_modular_sum_accounting_hand_computed():
    # n = 2 shares of sigma = 1/2, d = 1, Delta_2 = Delta_1 = 1:
    # tau = 10 exp(-2 pi^2 (1/4) (1/2)) = 10 exp(-pi^2 / 4) = 0.848049
    t = tau(0.5, 2)
    assert t == pytest.approx(0.848049, rel=1e-5)
    assert tau(0.5, 1) == 0.0  # one share is one discrete Gaussian
    # s2 = s1 = 1 / (sqrt(2) / 2) = sqrt(2): at alpha = 2
    #   t1 = 2/2 * 2 + tau * 1 = 2.848049
    #   t2 = 2/2 * (2 + 2 sqrt(2) tau + tau^2) = 2 + 2.398631 + 0.719187 = 5.117818
    #   t3 = 2/2 * (sqrt(2) + tau)^2 = 5.117818 (d = 1: same as t2)
    s = math.sqrt(2)
    assert ddgauss_rdp(np.array([2.0]), s, s, t, 1)[0] == pytest.approx(2.848049, rel=1e-5)
    # at alpha = 10: t1 = 10 + 0.848 = 10.848, t3 = 5 * 5.117818 = 25.589: t1 wins
    assert ddgauss_rdp(np.array([10.0]), s, s, t, 1)[0] == pytest.approx(10.848049, rel=1e-5)


def test_poisson_subsampling_hand_computed():
    # Zhu & Wang Thm 6 at alpha = 2, q = 1/2, eps(2) = 1:
    #   log[(1-q)(2q - q + 1) + q^2 e^1] / 1 = log(0.75 + 0.25 e) = log(1.429570) = 0.357374
    eps = np.array([1.0, 1.5])  # eps(2), eps(3)
    out = poisson_subsampled_rdp(eps, 0.5)
    assert out[0] == pytest.approx(0.357374, rel=1e-5)
    # alpha = 3: (1-q)^2 (3q - q + 1) + 3 q^2 (1-q) e^eps(2) + 3 q^3 e^(2 eps(3))
    #   = 0.5 + 0.375 e + 0.375 e^3 = 0.5 + 1.019343 + 7.532076 = 9.051419 -> log / 2 = 2.202922 / 2 = 1.101461 < eps(3)
    assert out[1] == pytest.approx(1.101461, rel=1e-5)
    assert np.array_equal(poisson_subsampled_rdp(eps, 1.0), eps)


def test_accountant_without_sampling_is_the_gaussian_bound_when_tau_vanishes():
    acc = DDGaussAccountant(clip_norm=1.0, dim=1000, shares=10, max_clients=20)
    mech = acc.mechanism(1.3)
    assert mech.tau < 1e-300  # sigma is millions of grid steps
    assert mech.sigma * math.sqrt(10) == pytest.approx(1.3 * mech.delta2)  # s2 = 1/z exactly
    rdp = 5 * np.array(ORDERS, dtype=float) / (2 * 1.3**2)
    want, _ = rdp_analysis.get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=1e-5)
    assert acc.epsilon([(1.3, 1.0, 5)], 1e-5) == pytest.approx(want, rel=1e-9)
    # sampling amplifies, and composition only grows epsilon
    assert acc.epsilon([(1.3, 0.1, 5)], 1e-5) < want
    assert acc.epsilon([(1.3, 0.1, 10)], 1e-5) > acc.epsilon([(1.3, 0.1, 5)], 1e-5)
    z = acc.calibrate(4.0, 1e-5, 0.1, 50)
    assert acc.epsilon([(z, 0.1, 50)], 1e-5) <= 4.0 < acc.epsilon([(z * 0.99, 0.1, 50)], 1e-5)


def test_dropouts_are_charged_at_the_fewest_shares():
    assert shares_for(min_clients=8, colluding=0) == 8
    assert shares_for(min_clients=8, colluding=3) == 5
    assert shares_for(min_clients=1, colluding=0) == 2  # SecAgg+ never releases a sum of one
    with pytest.raises(ConfigError, match="colluding"):
        shares_for(min_clients=4, colluding=4)
    few = DDGaussMechanism(clip_norm=1.0, dim=100, noise_multiplier=1.0, shares=4, max_clients=50)
    many = DDGaussMechanism(clip_norm=1.0, dim=100, noise_multiplier=1.0, shares=16, max_clients=50)
    # each client adds more noise when fewer shares must carry the whole of it
    assert few.sigma * few.gamma == pytest.approx(2 * many.sigma * many.gamma, rel=1e-6)


def test_bit_width_wrap_bound_and_refusal():
    m = DDGaussMechanism(clip_norm=1.0, dim=5000, noise_multiplier=1.0, shares=10, max_clients=100, bits=20)
    assert m.wrap_probability() <= 1e-9
    assert m.wrap_probability(m.scale * 2) > 1e-9  # the finest grid that meets the bound
    assert m.rounding_inflation < 1.2
    with pytest.raises(ConfigError, match="raise bits"):
        DDGaussMechanism(clip_norm=1.0, dim=5000, noise_multiplier=1.0, shares=10, max_clients=1000, bits=10)
    with pytest.raises(ConfigError, match="bits"):
        DDGaussMechanism(clip_norm=1.0, dim=10, noise_multiplier=1.0, shares=2, max_clients=2, bits=64)


# ------------------------------------------------------------------ encoding, the modular sum, decoding


def test_hadamard_rotation_is_orthogonal_and_inverts():
    x = np.random.default_rng(0).normal(size=64)
    h = fwht(np.eye(8)[3])
    assert set(np.abs(h)) == {1.0}
    r = Rotation(64, seed=7)
    y = r.forward(x)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    assert np.allclose(r.inverse(y), x)
    assert np.array_equal(Rotation(64, seed=7).signs, r.signs)  # public seed: the server rebuilds it


@pytest.mark.parametrize("rotate", [True, False])
def test_modular_sum_decodes_to_the_clear_sum_within_the_noise(rotate):
    d, n, c = 3000, 6, 0.5
    m = DDGaussMechanism(clip_norm=c, dim=d, noise_multiplier=0.8, shares=n, max_clients=n, bits=24, rotate=rotate)
    rot = m.rotation(11)
    rng = np.random.default_rng(1)
    xs = [v / np.linalg.norm(v) * c for v in rng.normal(size=(n, d))]
    rings = [m.encode(x, rot) for x in xs]
    assert rings[0].dtype == np.uint32 and int(rings[0][:-1].max()) < 2**24  # reduced mod 2^bits
    acc = np.zeros(m.padded_dim + 1, dtype=np.uint32)
    for r in rings:
        acc += r  # the 2^32 ring of SecAgg+ (wraps freely)
    total, count = m.decode(acc, rot)
    assert count == n and total.shape == (d,)
    err = total - np.sum(xs, axis=0)
    want = math.sqrt(n) * m.sigma * m.gamma  # = z Delta_2 gamma ~ z c
    # OS noise: >= 6 standard errors (the std's relative SE is 1 / sqrt(2 d) = 0.013 at d = 3000)
    assert err.std() == pytest.approx(want, rel=0.08)
    assert abs(err.mean()) < 6 * want / math.sqrt(d)


def _ctx(d: int, drops=None, state=None, round_=1) -> RoundContext:
    return RoundContext(round=round_, seed=0, spec=ParamSpec(("w",), ((d,),)), global_weights=torch.zeros(d),
                        cohort=[], num_clients=8, sample_rate=None, expected_cohort=0.0,
                        dropouts=DropoutPlan(drops or {}), state=state if state is not None else {})


@pytest.mark.parametrize("active", [False, True])
def test_secagg_plus_sums_ddgauss_ring_elements_with_dropouts(active):
    d, c, n, z = 2000, 1.0, 8, 1.0
    drops = {"masked_input": {103}, "unmask": {105}}  # 103 never sends its input; 105's is in the sum already
    ctx = _ctx(d, drops)
    round_info(ctx).clip_norm = c
    stage = DDGaussNoise(noise_multiplier=z, min_clients=4, num_clients=n, bits=32)
    g = torch.Generator().manual_seed(0)
    ups = []
    for i in range(n):
        delta = torch.randn(d, generator=g)
        ups.append(stage(ClientUpdate(100 + i, delta / delta.norm() * c, 1), ctx))
    res = SecAggPlus(active=active, min_clients=4).aggregate(ups, ctx)
    assert res.metrics["secagg_ring_input"] == "ddgauss" and res.metrics["secagg_ring_bits"] == 32
    assert 103 not in res.client_ids and 105 in res.client_ids and res.total_weight == n - 1
    clear = sum(u.delta.double() for u in ups if u.client_id in res.client_ids)
    err = res.total.double() - clear
    mech = round_info(ctx).ddgauss_codec.mechanism
    assert mech.shares == 4
    want = math.sqrt(n - 1) * mech.sigma * mech.gamma  # 7 shares in the sum: more than the 4 charged
    # OS noise: the std's relative SE over d = 2000 is 1 / sqrt(2 d) = 0.016 (0.017 measured over 40 runs);
    # 0.11 is 7 SE (false failure ~3e-12; it was 0.1, 6.3 SE: 3e-10)
    assert float(err.std()) == pytest.approx(want, rel=0.11)
    assert want == pytest.approx(z * c * math.sqrt(7 / 4), rel=0.01)


def test_stage_refusals():
    ctx = _ctx(10)
    with pytest.raises(ConfigError, match="clip"):
        DDGaussNoise(noise_multiplier=1.0)(ClientUpdate(1, torch.zeros(10), 1), ctx)
    round_info(ctx).clip_norm = 1.0
    with pytest.raises(ConfigError, match="uniform"):
        DDGaussNoise(noise_multiplier=1.0)(ClientUpdate(1, torch.zeros(10), 1, weight=3.0), ctx)
    with pytest.raises(ConfigError, match="noise multiplier"):
        DDGaussNoise()(ClientUpdate(1, torch.zeros(10), 1), ctx)
    round_info(ctx).accounted = Accounted(noise_multiplier=1.0, sample_rate=1.0, min_clients=1, expected_cohort=1.0)
    with pytest.raises(ConfigError, match="does not account for ddgauss"):
        DDGaussNoise(noise_multiplier=1.0)(ClientUpdate(1, torch.zeros(10), 1), ctx)


# ------------------------------------------------------------------ end to end: engine, ledger


def _ddgauss_digits(**over):
    sections = {
        "run": {"rounds": 2},
        "client": {"weighting": "uniform", "pipeline": [{"name": "clip", "clip_norm": 1.0}, "ddgauss"], "local_steps": 2},
        "server": {"sampling": "poisson", "sample_rate": 0.8, "aggregator": {"name": "mean", "denominator": "expected"},
                   "stages": [], "min_clients": 2, "secure_sum": {"name": "secagg+", "clip_range": 8.0},
                   "privacy": {"name": "dp-fedavg", "epsilon": 20.0, "delta": 1e-5}},
    }
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return digits_config(**sections)


def test_engine_run_charges_ddgauss_in_the_ledger(tmp_path, full_secret_cohort):
    eng = Engine(_ddgauss_digits(), tmp_path / "r", progress=False)
    s = eng.run()
    recs = read_rounds(tmp_path / "r")
    ok = [r for r in recs if r["status"] == "ok"]
    assert ok and all(r["dp_mechanism"] == "ddgauss" for r in ok)
    assert all(r["secagg_ring_input"] == "ddgauss" for r in ok)
    ledger = [json.loads(line) for line in (tmp_path / "r" / "privacy_ledger.jsonl").read_text().splitlines()]
    entries = [e for e in ledger if e.get("mechanism") == "dp-fedavg"]
    assert entries and all(e["noise"] == "ddgauss" and e["accountant"] == "ddgauss-rdp" for e in entries)
    guard = eng.privacy
    z = guard.z
    acc = DDGaussAccountant(clip_norm=1.0, dim=eng.spec.numel, shares=2, max_clients=5)
    assert entries[-1]["epsilon"] == pytest.approx(acc.epsilon([(z, 0.8, len(entries))], 1e-5), rel=1e-9)
    assert s["epsilon"] <= 20.0
    assert acc.epsilon([(z, 0.8, 2)], 1e-5) <= 20.0 < acc.epsilon([(z * 0.99, 0.8, 2)], 1e-5)  # calibrated to it
    assert entries[-1]["ddgauss"]["shares"] == 2 and entries[-1]["ddgauss"]["wrap_probability_bound"] <= 1e-9
    assert "distributed discrete Gaussian" in s["guarantee"]["sentence"] and "distributed noise" in s["guarantee"]["short"]
    # against the server (it knows the cohort): no amplification
    assert s["epsilon_vs_server"] == pytest.approx(acc.epsilon([(z, 1.0, len(entries))], 1e-5), rel=1e-9)


def test_engine_refuses_ddgauss_without_secagg(tmp_path):
    cfg = _ddgauss_digits(server={"secure_sum": {"name": "plain"}})
    with pytest.raises(ConfigError, match="secagg"):
        Engine(cfg, tmp_path / "r", progress=False).run()


def test_engine_refuses_ddgauss_with_central_noise(tmp_path):
    cfg = _ddgauss_digits(server={"stages": ["central-gaussian"]})
    with pytest.raises(ConfigError, match="drop 'central-gaussian'"):
        Engine(cfg, tmp_path / "r", progress=False)


@pytest.mark.parametrize("active", [False, True])
def test_ddgauss_ring_sessions_over_flower_messages_give_the_inprocess_sum(active):
    """Over Flower each node keeps its ring elements in its client session (saved to and restored from its own
    ``context.state`` between messages) and the server decodes with the round's codec: the same ring sum as the
    in-process SecAgg+ on the same ring inputs, bit for bit (the masks cancel; the noise is in the inputs)."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from secfed.flower.client import node_step, save_session
    from secfed.flower.server import Received, SessionSum

    d, c, n = 700, 1.0, 5
    ctx = _ctx(d, {"unmask": {102}})
    round_info(ctx).clip_norm = c
    stage = DDGaussNoise(noise_multiplier=1.0, min_clients=3, num_clients=n, bits=32)
    g = torch.Generator().manual_seed(1)
    ups = [stage(ClientUpdate(100 + i, torch.randn(d, generator=g) * 0.01, 1), ctx) for i in range(n)]
    ss = SecAggPlus(active=active, min_clients=3)
    ref = ss.aggregate(ups, ctx)
    states = {u.client_id: RecordDict() for u in ups}
    received = []
    for u in ups:
        session = ss.client_session(u.client_id, 1, 0, u.delta, u.weight)
        session.use_ring(u.ring.values)
        save_session(states[u.client_id], session)
        received.append(Received(u.client_id, b"", {}, session.reason))
    assert all("ring" in json.loads(st["secfed-session"]["json"]) for st in states.values())

    class Nodes:
        def exchange(self, step, outgoing, ctx):
            return {u: node_step(ss, states[u], ConfigRecord({"step": step, "round": 1, "client": u, "payload": p}), u)
                    for u, p in outgoing.items()}, {}

    got = SessionSum(ss, Nodes()).aggregate(received, ctx)
    assert got.metrics["secagg_ring_input"] == "ddgauss" and 102 in got.client_ids
    assert torch.equal(got.total, ref.total) and got.total_weight == ref.total_weight == n
    clear = sum(u.delta.double() for u in ups)
    assert float((got.total.double() - clear).abs().max()) < 8 * math.sqrt(n) * stage.mechanism(
        round_info(ctx), c, d).sigma * round_info(ctx).ddgauss_codec.mechanism.gamma * 3


def test_a_saved_ring_session_with_an_unknown_width_is_refused():
    from secfed.errors import MalformedMessage

    ss = SecAggPlus(active=False, min_clients=2)
    s = ss.client_session(1, 1, 0, torch.zeros(4), 1.0)
    s.use_ring(np.arange(5, dtype=np.uint32))
    state = json.loads(json.dumps(s.to_state()))
    assert np.array_equal(ss.restore_session(state).ring, np.arange(5, dtype=np.uint32))
    state["ring_bits"] = 16
    with pytest.raises(MalformedMessage, match="ring input"):
        ss.restore_session(state)


def test_resume_refuses_a_ledger_charged_with_other_noise():
    from defenses.privacy.guard import DPFedAvgGuard
    from secfed.errors import CheckpointError

    g = DPFedAvgGuard(noise_multiplier=1.0, sample_rate=0.5, dim=100, min_clients=2)
    g.validate_config(_ddgauss_digits(server={"sample_rate": 0.5}))
    assert g.ddgauss is not None and g.noise_placement == "distributed"
    with pytest.raises(CheckpointError, match="accounted differently"):
        g.load([{"mechanism": "dp-fedavg", "z": 1.0, "q": 0.5, "steps": 1, "noise": "distributed", "seq": 0}])
    g.load([{"mechanism": "dp-fedavg", "z": 1.0, "q": 0.5, "steps": 1, "noise": "ddgauss", "seq": 0}])
    assert g.epsilon() == pytest.approx(g.ddgauss.epsilon([(1.0, 0.5, 1)], 1e-5))


def test_stage_refuses_a_guard_mechanism_on_another_grid():
    """max_clients sets the encoding grid (gamma): a node whose mechanism differs from the guard's in it alone
    would encode on another grid and the server would decode garbage; the stage refuses in one line."""
    d, c = 50, 1.0
    ctx = _ctx(d)
    info = round_info(ctx)
    info.clip_norm = c
    stage = DDGaussNoise(min_clients=2, num_clients=8)
    info.ddgauss = DDGaussMechanism(clip_norm=c, dim=d, noise_multiplier=1.0, shares=2, max_clients=8)
    assert stage.mechanism(info, c, d) is info.ddgauss
    info.ddgauss = DDGaussMechanism(clip_norm=c, dim=d, noise_multiplier=1.0, shares=2, max_clients=1000)
    assert info.ddgauss.gamma != DDGaussMechanism(clip_norm=c, dim=d, noise_multiplier=1.0, shares=2, max_clients=8).gamma
    with pytest.raises(ConfigError, match="max_clients"):
        stage.mechanism(info, c, d)
