"""Robust aggregation and poisoning inside real engine runs (digits CNN and tiny-bert text)."""

from __future__ import annotations

import torch

from secfed.checkpoint import load_checkpoint
from secfed.engine import Engine, read_rounds

from conftest import digits_config, tiny_config


def _cclip_cfg(rounds):
    return digits_config(
        run={"rounds": rounds},
        client={"trainer": {"name": "momentum-sgd", "beta": 0.9}, "lr": 0.05, "local_steps": 3},
        server={"aggregator": {"name": "centered-clipping", "tau": 0.5}, "pre_aggregators": [{"name": "bucketing", "s": 2}]},
        attack={"adversary": {"name": "alie", "ids": [1]}},
    )


def test_alie_vs_centered_clipping_with_momentum_resumes_bit_identically(tmp_path):
    straight = Engine(_cclip_cfg(3), tmp_path / "a", progress=False)
    straight.run()
    recs = read_rounds(tmp_path / "a")
    assert all(r["malicious"] == 1 and r["status"] == "ok" for r in recs)
    assert recs[0]["alie_z"] > 0
    tensors, state = load_checkpoint(tmp_path / "a")
    assert "state.center" in tensors and any(k.startswith("trainer.m") for k in tensors)
    assert state["plugins"]["pre_aggregator0"]["calls"] == 3
    Engine(_cclip_cfg(2), tmp_path / "b", progress=False).run()
    resumed = Engine(_cclip_cfg(3), tmp_path / "b", progress=False, resume=True)
    resumed.run()
    assert torch.equal(resumed.global_w, straight.global_w)


def test_fltrust_krum_and_group_median_run(tmp_path):
    for i, server in enumerate([
        {"aggregator": "fltrust"},
        {"aggregator": {"name": "krum", "f": 1}},
        {"aggregator": "median", "group_size": 2},
    ]):
        data = {"root_size": 50} if i == 0 else {}
        cfg = digits_config(server=server, data=data, attack={"adversary": {"name": "sign-flip", "ids": [0], "scale": 5.0}})
        s = Engine(cfg, tmp_path / f"r{i}", progress=False).run()
        assert s["rounds_completed"] == 2 and s["final_accuracy"] is not None


def test_pixel_backdoor_reports_asr_and_model_replacement_scales(tmp_path):
    cfg = digits_config(attack={"adversary": {"name": "scaling", "ids": [0], "target": 3}})
    Engine(cfg, tmp_path / "r", progress=False).run()
    last = read_rounds(tmp_path / "r")[-1]
    assert 0.0 <= last["backdoor_asr"] <= 1.0


def test_text_backdoor_with_rare_tokens(tmp_path):
    cfg = tiny_config(attack={"adversary": {"name": "backdoor", "ids": [0, 1], "target": 0, "poison_fraction": 1.0}})
    Engine(cfg, tmp_path / "t", progress=False).run()
    last = read_rounds(tmp_path / "t")[-1]
    assert 0.0 <= last["backdoor_asr"] <= 1.0


def test_adaptive_attack_against_trimmed_mean_runs(tmp_path):
    cfg = digits_config(server={"aggregator": {"name": "trimmed-mean", "f": 1}},
                        attack={"adversary": {"name": "adaptive", "ids": [2], "aggregator": {"name": "trimmed-mean", "f": 1}}})
    Engine(cfg, tmp_path / "r", progress=False).run()
    recs = read_rounds(tmp_path / "r")
    assert all("adaptive_gamma" in r for r in recs)


def test_robust_rules_are_refused_on_secure_sums_unless_group_mode(tmp_path):
    import pytest

    from secfed.errors import ConfigError

    with pytest.raises(ConfigError, match="server.aggregator"):
        Engine(digits_config(server={"secure_sum": "secagg+", "aggregator": {"name": "krum", "f": 1}}), tmp_path / "a",
               progress=False)
    cfg = digits_config(data={"num_clients": 6}, server={"secure_sum": "secagg+", "aggregator": "median", "group_size": 2,
                                                          "cohort_size": 6})
    e = Engine(cfg, tmp_path / "b", progress=False)
    e.run()
    assert all(r["status"] == "ok" for r in read_rounds(tmp_path / "b"))
