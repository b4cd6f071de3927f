"""benchmarks/dp.py's selection logic: the validation grid chooses the setup, lr and clip; a partial grid chooses
nothing; the headline's DP pair follows the choice (no tuning on the test split)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dp  # noqa: E402


def _rows(acc: dict) -> dict:
    return {k: {"final_accuracy": a, "lr": dp.TUNE_GRID[k][0], "clip": dp.TUNE_GRID[k][1], "setup": dp.TUNE_GRID[k][2]}
            for k, a in acc.items()}


def test_grid_spans_every_setup_lr_and_clip():
    assert len(dp.TUNE_GRID) == len(dp.TUNE_SETUPS) * len(dp.TUNE_LR) * len(dp.TUNE_CLIP)
    assert dp.tune_key(3e-3, 1.0) == "tune_lr0.003_clip1"  # the uniform-noise keys of earlier result files
    assert dp.tune_key(3e-3, 1.0, "ffa_groups_pc_prop") == "tune_lr0.003_clip1_prop"
    assert all(s in dp.SERIES for s in dp.TUNE_SETUPS)


def test_a_partial_grid_chooses_nothing():
    doc = {"tune": dp.tune_choice(_rows({"tune_lr0.003_clip1": 0.5, "tune_lr0.003_clip1_prop": 0.6}), False)}
    assert doc["tune"]["complete"] is False
    assert dp.recommended(doc) == "ffa_groups_pc"  # the prop run is better, but the grid is not complete
    assert dp.headline_runs(dp.SERIES[dp.recommended(doc)])["accuracy_sample_dp_eps8"] == "sample_ffa_eps8_groups_pc"


def test_a_complete_grid_chooses_its_best_setup_lr_and_clip():
    acc = {k: 0.5 for k in dp.TUNE_GRID}
    acc["tune_lr0.01_clip0.5_prop"] = 0.62
    acc["tune_lr0.001_clip1"] = 0.62  # a tie: the first in grid order (uniform noise is listed first) wins
    doc = {"tune": dp.tune_choice(_rows(acc), False)}
    assert doc["tune"]["complete"] is True
    assert doc["tune"]["chosen"] == {"lr": 1e-3, "clip": 1.0, "setup": "ffa_groups_pc", "run": "tune_lr0.001_clip1"}
    acc["tune_lr0.001_clip1"] = 0.61
    doc = {"tune": dp.tune_choice(_rows(acc), False)}
    assert dp.recommended(doc) == "ffa_groups_pc_prop"
    runs = dp.headline_runs(dp.SERIES[dp.recommended(doc)])
    assert runs["accuracy_sample_dp_eps8"] == "sample_ffa_eps8_groups_pc_prop"
    assert runs["accuracy_sample_dp_eps1"] == "sample_ffa_eps1_groups_pc_prop"
    assert runs["accuracy_no_dp"] == "sample_ffa_no_dp"  # the same configuration with plain SGD
