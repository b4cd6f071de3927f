"""Declared needs (issue 21): one flag set read in one place, one build-time check."""

from __future__ import annotations

import pytest

from secfed.errors import ConfigError
from secfed.needs import Need, check_needs, needs_of, reveals_of


class Old:  # a plug-in from before the flags: its attributes are read by needs_of
    uses_center = True


class Declared:
    needs = Need.ROWS | Need.REFERENCE


def test_needs_from_declarations_and_from_older_attributes():
    from defenses.robust.aggregators import CenteredClipping, FLTrust
    from secfed.aggregation import Mean
    from secfed.secure_sum import PlainSum

    assert needs_of(Old(), Need.ROWS) == Need.ROWS | Need.CENTRE
    assert needs_of(Declared()) == Need.ROWS | Need.REFERENCE
    assert Need.ROWS not in needs_of(Mean(), Need.ROWS) and Need.SUM in needs_of(Mean(), Need.ROWS)
    assert Need.CENTRE in needs_of(CenteredClipping(), Need.ROWS)
    assert Need.REFERENCE in needs_of(FLTrust(), Need.ROWS)
    assert needs_of(None) == Need.NONE
    assert reveals_of(PlainSum()) == Need.SUM | Need.ROWS
    assert reveals_of(type("Hidden", (), {"reveals_individual": False})()) == Need.SUM


def test_one_check_refuses_what_the_round_cannot_serve():
    hidden = type("Hidden", (), {"reveals_individual": False})()
    kw = dict(aggregator_name="x", secure_sum_name="secagg+", pre_aggregators=[], has_root=True)
    with pytest.raises(ConfigError, match="needs individual updates"):
        check_needs(aggregator=Declared(), secure_sum=hidden, group_size=0, **kw)
    check_needs(aggregator=Declared(), secure_sum=hidden, group_size=2, **kw)  # group mode: group means are rows
    with pytest.raises(ConfigError, match="root dataset"):
        check_needs(aggregator=Declared(), secure_sum=hidden, group_size=2, **{**kw, "has_root": False})


def test_dpsgd_guard_accepts_a_subclass_of_the_dpsgd_trainer(tmp_path):
    """Old code matched the trainer's class path string, so a subclass of DPSGDTrainer was refused."""
    from conftest import tiny_config
    from secfed.engine import Engine

    priv = {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}
    Engine(tiny_config(client={"trainer": {"name": "test_needs:MyDPSGD", "max_grad_norm": 1.0}},
                       server={"privacy": priv}), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="client.trainer"):
        Engine(tiny_config(server={"privacy": priv}), tmp_path / "b", progress=False)


from defenses.privacy.dpsgd import DPSGDTrainer  # noqa: E402


class MyDPSGD(DPSGDTrainer):
    pass
