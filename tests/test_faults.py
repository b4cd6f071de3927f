"""Fault injection in the engine: every failed party is dropped, the round completes or
aborts cleanly, and ``--resume`` finishes the run.

Protocol-level faults (each SecAgg+ step, CKKS) live beside their protocols'
tests; crash points around the privacy ledger live in the DP tests.
"""

from __future__ import annotations

import pytest
import torch

from secfed.engine import Engine, read_rounds

from conftest import tiny_config

STAGES = ["train", "pipeline", "upload"]


@pytest.mark.parametrize("stage", STAGES)
def test_client_crash_at_each_stage_is_a_dropout(tmp_path, stage):
    cfg = tiny_config(faults={"dropouts": {stage: [1]}}, server={"min_clients": 2})
    s = Engine(cfg, tmp_path / stage, progress=False).run()
    recs = read_rounds(tmp_path / stage)
    assert s["rounds_completed"] == 2
    for r in recs:
        assert r["status"] == "ok" and r["completed"] == 3 and r["dropped"] == 1


def test_crash_of_every_client_aborts_cleanly_without_update(tmp_path):
    cfg = tiny_config(faults={"dropouts": {"upload": [0, 1, 2, 3]}})
    e = Engine(cfg, tmp_path / "all", progress=False)
    before = e.global_w.clone()
    e.run()
    assert torch.equal(e.global_w, before)
    assert all(r["status"].startswith("aborted") for r in read_rounds(tmp_path / "all"))


def test_slow_client_misses_deadline(tmp_path):
    cfg = tiny_config(faults={"slow_clients": {"2": 1000.0}}, server={"round_deadline_s": 600.0})
    Engine(cfg, tmp_path / "slow", progress=False).run()
    for r in read_rounds(tmp_path / "slow"):
        assert r["completed"] == 3 and r["dropped"] == 1


def test_exception_in_client_code_is_contained(tmp_path):
    e = Engine(tiny_config(), tmp_path / "boom", progress=False)
    real = e.trainer.train

    def flaky(model, task, data, gen, client_id=0):
        if client_id == 0:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, task, data, gen, client_id=client_id)

    e.trainer.train = flaky
    e.run()
    assert all(r["completed"] == 3 for r in read_rounds(tmp_path / "boom"))


def test_nan_update_rejected_before_aggregation(tmp_path):
    e = Engine(tiny_config(), tmp_path / "nan", progress=False)

    class NaNStage:
        def __call__(self, u, ctx):
            if u.client_id == 3:
                u.delta = u.delta.clone()
                u.delta[0] = float("nan")
            return u

    e.pipeline.append(NaNStage())
    e.run()
    for r in read_rounds(tmp_path / "nan"):
        assert r["status"] == "ok" and r["rejected"] == 1 and r["completed"] == 3
    assert bool(torch.isfinite(e.global_w).all())
