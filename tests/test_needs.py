"""Declared needs (issue 21): every plug-in says what it needs, every secure sum what it reveals; one
build-time check; DP stages, trainers and guards recognised by declared properties, never by names."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from defenses.privacy.clipping import ClipUpdate
from defenses.privacy.dpfedavg import DistributedGaussianNoise
from defenses.privacy.dpsgd import DPSGDTrainer
from secfed import registry
from secfed.errors import ConfigError
from secfed.needs import DPRole, Need, call_aggregator, check_needs, dp_role, needs_of, reveals_of
from secfed.secure_sum import PlainSum


# ------------------------------------------------------------------ test plug-ins (found as "test_needs:Class")
class Declared:
    needs = Need.ROWS | Need.REFERENCE


class Undeclared:  # a plug-in from before the flags: refused, not guessed
    def __call__(self, X, weights=None, **kw):
        return X.mean(0)


class SumOnlyWithoutFromSum:
    needs = Need.SUM

    def __call__(self, X, weights=None, **kw):
        return X.mean(0)


class Hidden:
    reveals = Need.SUM


class NeedsSecretSample:
    """An observer whose figure is only meaningful when no one holding the config can rebuild the cohort."""

    needs = Need.SECRET_SAMPLE

    def __call__(self, view, ctx):
        return {"secret_observer_ran": 1}


class NeedsReference:
    needs = Need.REFERENCE

    def __call__(self, view, ctx):
        return {}


class MyDPSGD(DPSGDTrainer):
    pass


class MyClip(ClipUpdate):
    """A subclass of the clipping stage (old code matched the class path string, and refused it)."""


class MyShare(DistributedGaussianNoise):
    pass


class MyPlain(PlainSum):
    pass


def _engine(tmp_path, name="a", **sections):
    from secfed.engine import Engine

    return Engine(tiny_config(**sections), tmp_path / name, progress=False)


# ------------------------------------------------------------------ declarations
def test_shipped_plugins_declare_what_they_need_and_reveal():
    from defenses.robust.aggregators import CenteredClipping, FLTrust, Krum
    from defenses.robust.preagg import NNM
    from defenses.secure_aggregation.ckks import CKKSSum
    from defenses.secure_aggregation.secagg import SecAggPlus
    from attacks.poisoning import ALIE, Adaptive, LabelFlip, Mimic
    from secfed.aggregation import Mean

    assert needs_of(Mean()) == Need.SUM
    assert needs_of(CenteredClipping()) == Need.ROWS | Need.CENTRE
    assert needs_of(FLTrust()) == Need.ROWS | Need.REFERENCE
    assert needs_of(Krum()) == needs_of(NNM()) == Need.ROWS
    assert needs_of(None) == Need.NONE
    assert reveals_of(PlainSum()) == Need.SUM | Need.ROWS
    assert SecAggPlus.reveals == CKKSSum.reveals == Need.SUM
    assert needs_of(Mimic()) == needs_of(Adaptive()) == needs_of(ALIE()) == Need.HONEST_ROWS
    assert needs_of(ALIE(omniscient=False)) == needs_of(LabelFlip()) == Need.NONE
    assert dp_role(ClipUpdate) == DPRole.CLIP and dp_role(MyShare) == DPRole.SHARE and dp_role(PlainSum) == DPRole.NONE


def test_a_plugin_that_declares_nothing_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"server.aggregator.*declares no `needs`") as e:
        _engine(tmp_path, server={"aggregator": "test_needs:Undeclared"})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="declares no `reveals`"):
        reveals_of(object())
    with pytest.raises(ConfigError, match="from_sum"):  # a sum-only aggregator must compute from the sum
        _engine(tmp_path, "b", server={"aggregator": "test_needs:SumOnlyWithoutFromSum"})


# ------------------------------------------------------------------ the one check
def test_one_check_refuses_what_the_round_cannot_serve():
    kw = dict(aggregator_name="x", secure_sum_name="secagg+", pre_aggregators=[], has_root=True)
    with pytest.raises(ConfigError, match="needs individual updates"):
        check_needs(aggregator=Declared(), secure_sum=Hidden(), group_size=0, **kw)
    check_needs(aggregator=Declared(), secure_sum=Hidden(), group_size=2, **kw)  # group mode: group means are rows
    with pytest.raises(ConfigError, match="root dataset"):
        check_needs(aggregator=Declared(), secure_sum=Hidden(), group_size=2, **{**kw, "has_root": False})
    from attacks.poisoning import Mimic

    with pytest.raises(ConfigError, match="omniscient"):
        check_needs(aggregator=Declared(), secure_sum=PlainSum(), group_size=0, adversary=Mimic(), honest_rows=False, **kw)


def test_rows_behind_secagg_without_group_mode_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="'median' needs individual updates") as e:
        _engine(tmp_path, server={"secure_sum": "secagg+", "aggregator": "median"})
    assert "\n" not in str(e.value) and "group_size" in str(e.value)
    from defenses.robust.preagg import NNM
    from secfed.aggregation import Mean

    with pytest.raises(ConfigError, match="needs individual updates"):  # a pre-aggregator needs rows too
        check_needs(aggregator=Mean(), aggregator_name="mean", pre_aggregators=[NNM()], secure_sum=Hidden(),
                    secure_sum_name="s", group_size=0, has_root=True)
    with pytest.raises(ConfigError, match=r"server.pre_aggregators\[0\].*declares no"):
        check_needs(aggregator=Mean(), aggregator_name="mean", pre_aggregators=[Undeclared()], secure_sum=Hidden(),
                    secure_sum_name="s", group_size=0, has_root=True)


def test_an_observer_needing_a_secret_sample_runs_only_under_a_privacy_guard(tmp_path):
    obs = {"observers": ["test_needs:NeedsSecretSample"]}
    with pytest.raises(ConfigError, match=r"server.observers\[0\].*secret cohort"):
        _engine(tmp_path, "a", server=obs)
    priv = {"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}}
    _engine(tmp_path, "b", client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}}, server={**obs, **priv})
    with pytest.raises(ConfigError, match="root dataset"):
        _engine(tmp_path, "c", server={"observers": ["test_needs:NeedsReference"]})


def test_call_aggregator_passes_only_what_is_declared():
    got = {}

    class Agg:
        needs = Need.ROWS | Need.CENTRE

        def __call__(self, X, weights=None, **kw):
            got.update(kw)
            return X.mean(0)

    def no_reference():
        raise AssertionError("the reference update is computed only when declared")

    X = torch.ones(3, 2)
    call_aggregator(Agg(), [], X, None, center=lambda: torch.zeros(2), reference=no_reference)
    assert set(got) == {"center"}


def test_adaptive_attack_aggregates_as_the_engine_does():
    """The adaptive attacker calls the engine's helper: CenteredClipping gets the engine's carried center."""
    from types import SimpleNamespace

    from attacks.poisoning import Adaptive

    ctx = SimpleNamespace(state={"center": torch.tensor([5.0, 5.0])})  # the engine's state (the carried center)
    adv = Adaptive(aggregator={"name": "centered-clipping", "tau": 0.1}, directions=["unit"], gammas=[0.0])
    X = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # tau = 0.1 around the carried center (5, 5): the output stays near it, which only the center explains
    out = adv._aggregate(X, ctx, X.mean(0))
    assert float(torch.linalg.vector_norm(out - torch.tensor([5.0, 5.0]))) <= 0.1 + 1e-6


# ------------------------------------------------------------------ declared properties, not strings
def test_dpsgd_guard_accepts_a_subclass_of_the_dpsgd_trainer(tmp_path):
    """Old code matched the trainer's class path string, so a subclass of DPSGDTrainer was refused."""
    priv = {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}
    _engine(tmp_path, "a", client={"trainer": {"name": "test_needs:MyDPSGD", "max_grad_norm": 1.0}},
            server={"privacy": priv})
    with pytest.raises(ConfigError, match="client.trainer"):
        _engine(tmp_path, "b", server={"privacy": priv})


def test_an_alias_of_dpsgd_and_of_its_guard_works(tmp_path, monkeypatch):
    """Old code accepted only the literal names "dp-sgd" (trainer, guard and run_is_dp)."""
    from defenses.privacy.dpsgd import resolve_noise_multiplier
    from secfed.rounds import run_is_dp

    monkeypatch.setitem(registry.REGISTRY["trainer"], "private-sgd", "defenses.privacy.dpsgd:DPSGDTrainer")
    monkeypatch.setitem(registry.REGISTRY["privacy"], "record-level-dp", "defenses.privacy.guard:DPSGDGuard")
    cfg = tiny_config(client={"trainer": {"name": "private-sgd", "max_grad_norm": 1.0}},
                      server={"privacy": {"name": "record-level-dp", "epsilon": 8.0, "delta": 1e-5}})
    assert run_is_dp(cfg)
    assert resolve_noise_multiplier(cfg, [40, 40, 40, 40]) > 0  # calibrated by the aliased guard
    e = _engine(tmp_path, "a", client={"trainer": {"name": "private-sgd", "max_grad_norm": 1.0}},
                server={"privacy": {"name": "record-level-dp", "epsilon": 8.0, "delta": 1e-5}})
    assert e.trainer.private
    assert run_is_dp(tiny_config(client={"trainer": {"name": "private-sgd", "max_grad_norm": 1.0,
                                                     "noise_multiplier": 1.0}}))
    assert not run_is_dp(tiny_config())


def _user_level(pipeline, stages, secure_sum="plain", **server):
    return dict(client={"weighting": "uniform", "pipeline": pipeline, "local_steps": 2},
                server={"sampling": "poisson", "sample_rate": 1.0, "cohort_size": 0, "secure_sum": secure_sum,
                        "aggregator": {"name": "mean", "denominator": "expected"}, "stages": stages,
                        "privacy": {"name": "dp-fedavg", "epsilon": 8.0, "delta": 1e-5}, **server})


def test_a_subclass_of_the_clipping_stage_under_another_name_is_accepted(tmp_path, monkeypatch):
    from defenses.privacy.guard import dpfedavg_violations

    monkeypatch.setitem(registry.REGISTRY["client_stage"], "my-clip", "test_needs:MyClip")
    for name in ("test_needs:MyClip", "my-clip"):
        cfg = tiny_config(**_user_level([{"name": name, "clip_norm": 1.0}], ["central-gaussian"]))
        assert dpfedavg_violations(cfg) == []
    _engine(tmp_path, "a", **_user_level([{"name": "my-clip", "clip_norm": 1.0}], ["central-gaussian"]))
    # without any clipping stage the guard still refuses, naming the key
    bad = dpfedavg_violations(tiny_config(**_user_level([], ["central-gaussian"])))
    assert any("clipping stage" in b for b in bad)


def test_stage_roles_order_and_noise_placement_are_read_from_the_classes(monkeypatch):
    from defenses.privacy.guard import dpfedavg_violations, validate_dpfedavg_config

    monkeypatch.setitem(registry.REGISTRY["client_stage"], "my-share", "test_needs:MyShare")
    ok = tiny_config(**_user_level([{"name": "test_needs:MyClip", "clip_norm": 1.0}, "my-share"], [],
                                   secure_sum="secagg+", min_clients=2))
    assert validate_dpfedavg_config(ok) == "distributed"  # a subclass of the share stage, under an alias
    wrong_order = tiny_config(**_user_level(["my-share", {"name": "clip", "clip_norm": 1.0}], [],
                                            secure_sum="secagg+", min_clients=2))
    assert any("before the noise stage" in b for b in dpfedavg_violations(wrong_order))


def test_distributed_noise_refuses_a_subclass_of_the_plain_sum(tmp_path, monkeypatch):
    """dpfedavg.py refused only the literal "plain"; now any secure sum that declares it reveals the rows."""
    from defenses.privacy.dpfedavg import _sum_reveals_rows

    monkeypatch.setitem(registry.REGISTRY["secure_sum"], "open", "test_needs:MyPlain")
    assert _sum_reveals_rows(tiny_config(server={"secure_sum": "open"}))
    assert not _sum_reveals_rows(tiny_config(server={"secure_sum": "secagg+"}))
