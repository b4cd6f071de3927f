"""DP-FedAvg stages and guard: clipping, central / distributed noise, adaptive clipping, budgets."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.privacy.analysis import adaptive_update_noise, rdp_epsilon
from defenses.privacy.clipping import clip_to_norm, round_info
from defenses.privacy.dpfedavg import AdaptiveClipClient, AdaptiveClipServer, CentralGaussianNoise, DistributedGaussianNoise
from defenses.privacy.guard import DPFedAvgGuard
from secfed.engine import Engine, read_rounds
from secfed.errors import BudgetExhausted, CheckpointError, ConfigError
from secfed.interfaces import ClientUpdate, RoundContext, SumResult
from secfed.ledger import PrivacyLedger
from secfed.spec import ParamSpec

from conftest import digits_config


def _ctx(round_=1, expected=10.0, cohort=None, state=None):
    spec = ParamSpec(("w",), ((4,),))
    return RoundContext(round=round_, seed=0, spec=spec, global_weights=torch.zeros(4), cohort=cohort or list(range(10)),
                        num_clients=20, sample_rate=0.5, expected_cohort=expected, state=state if state is not None else {})


def dp_digits(**over):
    """Digits CNN with DP-FedAvg (central noise); fast enough for subprocess crash tests."""
    sections = {
        "client": {"weighting": "uniform", "pipeline": [{"name": "clip", "clip_norm": 1.0}], "local_steps": 2},
        "server": {"sampling": "poisson", "sample_rate": 0.6, "aggregator": {"name": "mean", "denominator": "expected"},
                   "stages": ["central-gaussian"],
                   "privacy": {"name": "dp-fedavg", "noise_multiplier": 1.0, "delta": 1e-5}},
    }
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return digits_config(**sections)


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(1e-3, 1e3), c=st.floats(1e-2, 10.0), seed=st.integers(0, 1000))
def test_clip_bounds_the_norm_and_keeps_direction(scale, c, seed):
    x = torch.randn(50, generator=torch.Generator().manual_seed(seed)) * scale
    y, norm = clip_to_norm(x, c)
    assert float(y.norm()) <= c * (1 + 1e-6)
    assert norm == pytest.approx(float(x.double().norm()), rel=1e-6)
    if norm <= c:
        assert torch.equal(x, y)
    else:
        assert torch.nn.functional.cosine_similarity(x, y, dim=0) > 1 - 1e-5


def test_central_noise_std_is_zC_over_expected_cohort():
    ctx = _ctx(expected=5.0)
    round_info(ctx).update(clip_norm=0.5, noise_multiplier=2.0)
    agg = torch.zeros(200_000)
    out = CentralGaussianNoise()(agg, SumResult([], agg, 0.0), ctx)
    # the released std is zC / qN times the grid's rounding term (1 + gamma sqrt(d) / C <= 1 + 2^-10): exact
    released = ctx.metrics["dp_noise_std_released"]
    assert released == pytest.approx(2.0 * 0.5 / 5.0, rel=2e-3)
    # OS noise: the sample std's relative SE over 2e5 draws is 1 / sqrt(4e5) = 0.0016; 0.012 is 7.6 SE
    # (false failure 3e-14; it was rel 0.01 around zC / qN, 5.8 SE on the high side: 3e-9)
    assert float(out.std()) == pytest.approx(released, rel=0.012)
    assert ctx.metrics["dp_noise_std"] == pytest.approx(0.2)


def test_noise_stage_refuses_a_multiplier_other_than_the_guards():
    ctx = _ctx()
    round_info(ctx).update(clip_norm=0.5, noise_multiplier=2.0)
    with pytest.raises(ConfigError, match="differs from the privacy guard"):
        CentralGaussianNoise(noise_multiplier=1.0)(torch.zeros(3), SumResult([], torch.zeros(3), 0.0), ctx)
    with pytest.raises(ConfigError, match="no clip norm"):
        CentralGaussianNoise(noise_multiplier=1.0)(torch.zeros(3), SumResult([], torch.zeros(3), 0.0), _ctx())


def test_distributed_shares_sum_to_the_target_noise():
    z, c, h = 1.5, 0.4, 4
    stage = DistributedGaussianNoise(noise_multiplier=z, clip_norm=c, min_clients=h, noise="seeded")
    ctx = _ctx()
    shares = [stage(ClientUpdate(i, torch.zeros(100_000), 1), ctx).delta for i in range(h)]
    # relative SE of a std over 1e5 draws: 0.0022; 0.015 is 6.7 SE
    assert float(shares[0].std()) == pytest.approx(z * c / math.sqrt(h), rel=0.015)
    assert float(torch.stack(shares).sum(0).std()) == pytest.approx(z * c, rel=0.015)  # h honest survivors suffice
    with pytest.raises(ConfigError, match="colluding"):
        DistributedGaussianNoise(min_clients=2, colluding=2)
    # one colluder: the shares grow so that h - 1 honest ones still carry z C
    assert DistributedGaussianNoise(min_clients=4, colluding=1).share_divisor == 3


def test_distributed_noise_refuses_the_plain_sum():
    cfg = dp_digits(client={"pipeline": [{"name": "clip", "clip_norm": 1.0}, "gaussian-share"]},
                    server={"stages": []})
    with pytest.raises(ConfigError, match=r"client.pipeline\[1\].*secagg"):
        Engine(cfg, None, progress=False)  # at build time, whatever the (secret, maybe empty) cohort
    allowed = dp_digits(client={"pipeline": [{"name": "clip", "clip_norm": 1.0},
                                             {"name": "gaussian-share", "allow_plain": True}]}, server={"stages": []})
    Engine(allowed, None, progress=False)  # the test-only escape hatch still builds


def test_an_empty_secret_cohort_is_an_aborted_round_not_a_crash(tmp_path, monkeypatch):
    """A Poisson cohort can be empty (q = 0.6 over 5 clients: 1% of rounds); force it, deterministically."""
    eng = Engine(dp_digits(run={"rounds": 1}), tmp_path / "r", progress=False)
    with pytest.raises(RuntimeError, match="call run"):
        eng.run_round(1)  # before run(): one clear error, not an AttributeError on the ledger
    monkeypatch.setattr(eng, "sample_cohort", lambda t: [])
    s = eng.run()
    rec = read_rounds(tmp_path / "r")[0]
    assert s["rounds_completed"] == 1
    assert rec["sampled"] == 0 and rec["completed"] == 0 and rec["status"].startswith("aborted")
    led = PrivacyLedger(tmp_path / "r" / "privacy_ledger.jsonl").entries
    assert [e["round"] for e in led] == [1]  # the round is still charged: the (secret) sample was drawn


def test_adaptive_clip_tracks_the_target_quantile():
    """Andrew et al. 2021: with norms uniform on [0, 2] and gamma = 0.5, C converges near the median 1."""
    g = torch.Generator().manual_seed(0)
    client, server = AdaptiveClipClient(initial_clip_norm=0.1), AdaptiveClipServer(initial_clip_norm=0.1, clip_lr=0.2,
                                                                                   count_noise_std=2.0, noise="seeded")
    state: dict = {}
    for t in range(1, 121):
        ctx = _ctx(round_=t, expected=100.0, state=state)
        round_info(ctx).noise_multiplier = 1.0
        ids = list(range(100))
        for i in ids:
            norm = 2 * float(torch.rand(1, generator=g))
            d = torch.zeros(4)
            d[0] = norm
            client(ClientUpdate(i, d, 1), ctx)
        c_before = server.clip_norm
        agg = server(torch.zeros(4), SumResult(ids, torch.zeros(4), 100.0), ctx)
        b = ctx.metrics["dp_unclipped_estimate"]
        assert server.clip_norm == pytest.approx(c_before * math.exp(-0.2 * (b - 0.5)))  # the geometric rule
        assert torch.equal(agg, torch.zeros(4))
        out = CentralGaussianNoise(noise="seeded")(torch.zeros(1000), SumResult(ids, torch.zeros(1000), 100.0), ctx)
        # the update is noised at z_Delta so that (z_Delta, sigma_b) together cost z
        assert ctx.metrics["dp_noise_std"] == pytest.approx(adaptive_update_noise(1.0, 2.0) * c_before / 100.0)
        assert out.shape == (1000,)
    assert 0.85 < server.clip_norm < 1.15
    assert state["dp_clip_norm"] == server.clip_norm
    s2 = AdaptiveClipServer()
    s2.load_state_dict(server.state_dict())
    assert s2.clip_norm == server.clip_norm


def test_adaptive_server_stage_must_come_before_the_noise():
    ctx = _ctx()
    round_info(ctx).update(noise_multiplier=1.0)
    AdaptiveClipClient()(ClientUpdate(0, torch.ones(4), 1), ctx)
    with pytest.raises(ConfigError, match="before 'central-gaussian'"):
        CentralGaussianNoise()(torch.zeros(4), SumResult([0], torch.zeros(4), 1.0), ctx)


def test_guard_calibrates_and_matches_the_accountant():
    g = DPFedAvgGuard(epsilon=8.0, delta=1e-5, sample_rate=0.5, rounds=8)
    assert rdp_epsilon([(g.z, 0.5, 8)], 1e-5) <= 8.0 < rdp_epsilon([(g.z * 0.99, 0.5, 8)], 1e-5)
    g2 = DPFedAvgGuard(epsilon=8.0, noise_multiplier=1.0, sample_rate=0.5, rounds=100)
    assert rdp_epsilon([(1.0, 0.5, g2.max_rounds)], 1e-5) <= 8.0 < rdp_epsilon([(1.0, 0.5, g2.max_rounds + 1)], 1e-5)


def test_guard_refuses_what_its_accounting_does_not_cover():
    with pytest.raises(ConfigError, match="server.sampling"):
        DPFedAvgGuard(epsilon=8.0, sample_rate=None)
    with pytest.raises(ConfigError, match="single round"):
        DPFedAvgGuard(epsilon=0.05, noise_multiplier=0.5, sample_rate=1.0)
    bad = [
        ({"client": {"weighting": "examples"}}, "client.weighting"),
        ({"server": {"aggregator": "mean"}}, "server.aggregator"),
        ({"server": {"stages": []}}, "noise"),
        ({"client": {"pipeline": []}}, "clipping stage"),
    ]
    for over, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            Engine(dp_digits(**over), None, progress=False)  # refused at build time


def test_budget_stops_the_run_with_the_last_model_inside_it(tmp_path):
    rounds_fit = DPFedAvgGuard(epsilon=8.0, noise_multiplier=1.0, sample_rate=0.6).max_rounds
    assert rounds_fit >= 1
    cfg = dp_digits(run={"rounds": rounds_fit + 2},
                    server={"privacy": {"name": "dp-fedavg", "noise_multiplier": 1.0, "epsilon": 8.0, "delta": 1e-5}})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    assert s["rounds_completed"] == rounds_fit and "privacy budget" in s["stopped"]
    assert s["epsilon"] <= 8.0
    recs = read_rounds(tmp_path / "r")
    assert [r["epsilon"] for r in recs] == sorted(r["epsilon"] for r in recs)
    led = PrivacyLedger(tmp_path / "r" / "privacy_ledger.jsonl").entries
    assert [e["round"] for e in led] == list(range(1, rounds_fit + 1))
    assert led[-1]["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 0.6, rounds_fit)], 1e-5))


def test_load_replays_every_entry_and_refuses_foreign_ones():
    g = DPFedAvgGuard(noise_multiplier=1.0, sample_rate=0.5)
    entries = [{"mechanism": "dp-fedavg", "z": 1.0, "q": 0.5, "steps": 1, "round": r} for r in (1, 2, 2)]  # round 2 re-run
    g.load(entries)
    assert g.epsilon() == pytest.approx(rdp_epsilon([(1.0, 0.5, 3)], 1e-5))  # over-counts, never under-counts
    with pytest.raises(CheckpointError, match="mechanism"):
        g.load([{"mechanism": "dp-sgd", "z": 1.0, "clients": {}}])
    with pytest.raises(BudgetExhausted):
        g2 = DPFedAvgGuard(epsilon=1.0, noise_multiplier=3.0, sample_rate=0.5)
        g2.load([{"mechanism": "dp-fedavg", "z": 3.0, "q": 0.5, "steps": g2.max_rounds}])
        g2.check(_ctx())


def test_adaptive_clipping_runs_and_its_clip_norm_is_checkpointed(tmp_path, full_secret_cohort):
    cfg = dp_digits(run={"rounds": 2},
                    client={"pipeline": [{"name": "adaptive-clip", "initial_clip_norm": 0.05}]},
                    server={"stages": [{"name": "adaptive-clip", "initial_clip_norm": 0.05, "count_noise_std": 1.0},
                                       "central-gaussian"]})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    s = eng.run()
    assert s["rounds_completed"] == 2
    recs = read_rounds(tmp_path / "r")
    assert recs[0]["dp_clip_norm"] == pytest.approx(0.05)
    # Andrew et al. Alg. 1: C_1 = C_0 exp(-eta_C (b~_0 - gamma)), from the noisy estimate the round recorded
    # (the count noise comes from the OS, so b~ can land exactly on gamma and leave C unchanged: test the rule)
    import math

    assert recs[1]["dp_clip_norm"] == pytest.approx(0.05 * math.exp(-0.2 * (recs[0]["dp_unclipped_estimate"] - 0.5)))
    state = __import__("json").loads((tmp_path / "r" / "checkpoint" / "state.json").read_text())
    assert state["state"]["dp_clip_norm"] == pytest.approx(eng.stages[0].clip_norm)


def test_prv_guard_reports_the_prv_epsilon():
    from defenses.privacy.analysis import prv_epsilon

    g = DPFedAvgGuard(noise_multiplier=1.0, sample_rate=0.5, accountant="prv")
    for t in (1, 2):
        g.check(_ctx(round_=t))
        g.record(_ctx(round_=t))
    assert g.epsilon() == pytest.approx(prv_epsilon([(1.0, 0.5, 2)], 1e-5))
    assert g.epsilon() <= rdp_epsilon([(1.0, 0.5, 2)], 1e-5)  # PRV is the tighter accountant


def test_distributed_noise_under_secagg_plus(tmp_path, full_secret_cohort):
    pytest.importorskip("defenses.secure_aggregation.secagg")
    # every client sampled (full_secret_cohort): an OS-drawn Poisson cohort can fall below min_clients = 2
    cfg = dp_digits(run={"rounds": 1}, data={"num_clients": 12},
                    client={"pipeline": [{"name": "clip", "clip_norm": 1.0}, "gaussian-share"]},
                    server={"stages": [], "secure_sum": {"name": "secagg+", "clip_range": 8.0}, "min_clients": 2})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    rec = read_rounds(tmp_path / "r")[0]
    assert s["rounds_completed"] == 1 and rec["status"] == "ok"
    assert rec["dp_share_std"] == pytest.approx(1.0 * 1.0 / math.sqrt(2))
    assert s["epsilon"] == pytest.approx(rdp_epsilon([(1.0, 0.6, 1)], 1e-5))
