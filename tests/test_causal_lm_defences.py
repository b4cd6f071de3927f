"""Every defence on the causal LM by config (tiny random Llama + LoRA, one small run each)."""

from __future__ import annotations

import pytest
import torch

from secfed.engine import Engine, read_rounds

from test_causal_lm_task import lm_config, write_instruct_jsonl


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_instruct_jsonl(tmp_path_factory.mktemp("lmdef") / "good_bad.jsonl", 120)


def _cfg(data_file, **sections):
    sections.setdefault("run", {}).setdefault("rounds", 1)
    sections["data"] = {"num_clients": 4, "test_size": 20, **sections.get("data", {})}
    sections["server"] = {"cohort_size": 4, **sections.get("server", {})}
    return lm_config(data_file, **sections)


def _run(cfg, out):
    eng = Engine(cfg, out, progress=False)
    w0 = eng.global_w.clone()
    summary = eng.run()
    return eng, w0, summary


@pytest.fixture(scope="module")
def plain(data_file, tmp_path_factory):
    return _run(_cfg(data_file), tmp_path_factory.mktemp("plain") / "run")


def _moved(eng, w0):
    return float((eng.global_w - w0).norm())


def test_plain_run_reports_lm_figures_and_zero_shot(plain):
    eng, w0, s = plain
    assert _moved(eng, w0) > 0
    rec = read_rounds(eng.out)[-1]
    assert {"loss", "perplexity", "accuracy", "exact_match"} <= set(rec)
    assert s["zero_shot_accuracy"] is not None


def test_dp_sgd_on_the_causal_lm(data_file, tmp_path):
    cfg = _cfg(data_file, run={"rounds": 2}, client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
               server={"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}})
    eng, w0, s = _run(cfg, tmp_path / "dpsgd")
    assert s["rounds_completed"] == 2 and 0 < s["epsilon"] <= 8.0
    assert _moved(eng, w0) > 0 and torch.isfinite(eng.global_w).all()


def test_user_level_dp_fedavg_on_the_causal_lm(data_file, tmp_path, full_secret_cohort):
    cfg = _cfg(data_file, run={"rounds": 2},
               client={"weighting": "uniform", "pipeline": [{"name": "clip", "clip_norm": 0.5}]},
               server={"sampling": "poisson", "sample_rate": 0.75, "aggregator": {"name": "mean", "denominator": "expected"},
                       "stages": ["central-gaussian"],
                       "privacy": {"name": "dp-fedavg", "noise_multiplier": 1.0, "delta": 1e-5}})
    eng, w0, s = _run(cfg, tmp_path / "dpfedavg")
    assert s["epsilon"] is not None and s["epsilon"] > 0
    assert _moved(eng, w0) > 0 and torch.isfinite(eng.global_w).all()


def test_secagg_plus_on_the_causal_lm_matches_plain(data_file, tmp_path, plain):
    ref, _, _ = plain
    eng, w0, _ = _run(_cfg(data_file, server={"secure_sum": "secagg+"}), tmp_path / "secagg")
    rec = read_rounds(eng.out)[0]
    assert rec["status"] == "ok" and rec["completed"] == 4
    assert not torch.equal(ref.global_w, eng.global_w)  # it went through the quantiser
    assert torch.allclose(ref.global_w, eng.global_w, atol=1e-5)


def test_homomorphic_sum_on_the_causal_lm_matches_plain(data_file, tmp_path, plain):
    ref, w0, _ = plain
    eng, _, _ = _run(_cfg(data_file, server={"secure_sum": "ckks"}), tmp_path / "he")
    rec = read_rounds(eng.out)[0]
    assert rec["completed"] == 4 and rec["he_clipped"] == 0
    assert float((eng.global_w - ref.global_w).norm()) <= 1e-3 * _moved(ref, w0)


@pytest.mark.parametrize("aggregator", ["median", {"name": "trimmed-mean", "f": 1}])
def test_robust_aggregators_on_the_causal_lm(data_file, tmp_path, aggregator):
    eng, w0, s = _run(_cfg(data_file, server={"aggregator": aggregator}), tmp_path / "robust")
    assert s["rounds_completed"] == 1 and _moved(eng, w0) > 0 and torch.isfinite(eng.global_w).all()


@pytest.mark.slow
def test_flower_ray_run_of_the_causal_lm_equals_inprocess(data_file, tmp_path):
    pytest.importorskip("flwr")
    from secfed.checkpoint import load_checkpoint
    from secfed.flower.simulation import run_ray_simulation

    cfg = _cfg(data_file, run={"threads": 1}, deploy={"ray_num_cpus": 2})
    summary = run_ray_simulation(cfg, tmp_path / "ray")
    Engine(cfg, tmp_path / "inprocess", progress=False).run()
    assert summary["rounds_completed"] == 1
    assert torch.equal(load_checkpoint(tmp_path / "ray")[0]["global"], load_checkpoint(tmp_path / "inprocess")[0]["global"])
