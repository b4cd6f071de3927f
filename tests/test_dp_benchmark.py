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


def _search(acc: dict) -> dict:
    """Every run the plan asks for, given the accuracies: the lr lines, then the clips at each line's best lr."""
    rows = {}
    while missing := [k for k in dp.tune_plan(rows) if k not in rows]:
        rows.update(_rows({k: acc.get(k, 0.5) for k in missing}))
    return rows


def test_the_lr_line_climbs_up_while_accuracy_rises():
    assert dp.tune_plan({}) == [dp.tune_key(lr, 1.0, s) for s in dp.TUNE_SETUPS for lr in (3e-3, 1e-2)]
    acc = {"tune_lr0.003_clip1": 0.60, "tune_lr0.01_clip1": 0.62, "tune_lr0.03_clip1": 0.61}
    rows = _rows({k: acc[k] for k in ("tune_lr0.003_clip1", "tune_lr0.01_clip1")})
    assert dp.lr_line(rows, dp.BEST_NAME) == (["tune_lr0.003_clip1", "tune_lr0.01_clip1", "tune_lr0.03_clip1"], None)
    rows = _search(acc)
    assert dp.lr_line(rows, dp.BEST_NAME)[1] == 1e-2  # 3e-2 fell: the climb stops at 1e-2, 1e-3 never runs
    assert "tune_lr0.001_clip1" not in rows and "tune_lr0.01_clip0.5" in rows
    assert set(rows) == set(dp.tune_plan(rows))


def test_the_lr_line_turns_down_when_the_first_step_up_does_not_rise():
    acc = {"tune_lr0.003_clip1_prop": 0.60, "tune_lr0.01_clip1_prop": 0.60, "tune_lr0.001_clip1_prop": 0.61}
    rows = _search(acc)  # a tie is no rise: down to 1e-3, which rose, and the line ends there
    assert dp.lr_line(rows, "ffa_groups_pc_prop") == (
        ["tune_lr0.003_clip1_prop", "tune_lr0.01_clip1_prop", "tune_lr0.001_clip1_prop"], 1e-3)
    assert "tune_lr0.001_clip0.5_prop" in rows and "tune_lr0.03_clip1_prop" not in rows
    acc = {"tune_lr0.003_clip1": 0.60, "tune_lr0.01_clip1": 0.61, "tune_lr0.03_clip1": 0.62, "tune_lr0.1_clip1": 0.63}
    assert dp.lr_line(_search(acc), dp.BEST_NAME)[1] == dp.TUNE_LR[-1]  # rising to the end of TUNE_LR: the end


def test_a_half_done_search_names_its_missing_runs_and_chooses_nothing():
    rows = _rows({k: 0.5 for k in dp.tune_plan({})})  # the first steps up: both tied, so the lines turn down
    t = dp.tune_choice(rows, False)
    assert t["chosen"] is None and t["complete"] is False
    assert t["missing"] == ["tune_lr0.001_clip1", "tune_lr0.001_clip1_prop"]


def test_a_complete_search_chooses_its_best_setup_lr_and_clip():
    acc = {"tune_lr0.001_clip1_prop": 0.60, "tune_lr0.001_clip0.5_prop": 0.62,
           "tune_lr0.001_clip1": 0.60, "tune_lr0.001_clip0.5": 0.62}  # both lines turn down to 1e-3; a tie: the
    # first in plan order (uniform noise) wins
    doc = {"tune": dp.tune_choice(_search(acc), False)}
    assert doc["tune"]["complete"] is True
    assert doc["tune"]["chosen"] == {"lr": 1e-3, "clip": 0.5, "setup": "ffa_groups_pc", "run": "tune_lr0.001_clip0.5"}
    acc["tune_lr0.001_clip0.5"] = 0.61
    doc = {"tune": dp.tune_choice(_search(acc), False)}
    assert dp.recommended(doc) == "ffa_groups_pc_prop"
    runs = dp.headline_runs(dp.SERIES[dp.recommended(doc)])
    assert runs["accuracy_sample_dp_eps8"] == "sample_ffa_eps8_groups_pc_prop"
    assert runs["accuracy_sample_dp_eps1"] == "sample_ffa_eps1_groups_pc_prop"
    assert runs["accuracy_no_dp"] == "sample_ffa_no_dp"  # the same configuration with plain SGD


def test_a_run_off_the_plan_is_kept_and_never_chosen():
    rows = _search({})
    rows.update(_rows({"tune_lr0.03_clip0.5": 0.99}))  # better, but the plan never asked for it
    t = dp.tune_choice(rows, False)
    assert t["off_plan"] == ["tune_lr0.03_clip0.5"]
    assert t["chosen"]["run"] == "tune_lr0.003_clip1"  # all tied at 0.5: the first of the plan


def test_the_headline_reports_only_runs_at_the_chosen_lr_and_clip():
    o = dp.sample_overrides(False, "ffa", 8.0, 3e-3, 1.0, None, dp.GROUPS, per_client=True)
    row = {"final_accuracy": 0.6, "overrides": o}
    assert dp.figure({"k": row}, "k", 3e-3, 1.0) == 0.6
    assert dp.figure({"k": row}, "k", 1e-2, 1.0) is None  # left from before the search chose lr 1e-2
    assert dp.figure({"k": row}, "k", 3e-3, 0.5) is None
    no_dp = {"final_accuracy": 0.67, "overrides": dp.sample_overrides(False, "ffa", None, 3e-3, 1.0)}
    assert dp.figure({"k": no_dp}, "k", 3e-3, 0.5) == 0.67  # no clipping without DP: only the lr matters
    many = {"final_accuracy": 0.3, "overrides": {"server.privacy.epsilon": 8.0}}
    assert dp.figure({"k": many}, "k", 1e-2, 0.5) == 0.3  # the many-clients runs take neither
    assert dp.figure({}, "k", 3e-3, 1.0) is None


def test_an_unknown_grid_point_is_one_line():
    import subprocess

    r = subprocess.run([sys.executable, str(Path(dp.__file__)), "--part", "tune", "--only", "tune_lr0.5_clip1",
                        "--rows-out", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "'tune_lr0.5_clip1' is not a grid point" in r.stderr and "Traceback" not in r.stderr


def test_the_clip_only_run_follows_the_recommended_setup():
    prop = dp.SERIES["ffa_groups_pc_prop"]
    assert dp.clip_only_key(dp.BEST) != dp.clip_only_key(prop)
    assert dp.headline_runs(prop)["accuracy_clip_only_no_noise"] == dp.clip_only_key(prop)
    o = dp.clip_only_overrides(False, 3e-2, 1.0, prop)
    assert o["client.trainer"]["clip_groups"] == dp.GROUPS_PROP and o["client.trainer"]["noise_multiplier"] == 0.0
    assert o["client.trainer"]["group_noise"] == "proportional" and o["server.privacy"] is None
    keys = [k for k, _, _ in dp.utility_runs(False, 3e-2, 1.0, best=prop)]
    assert dp.clip_only_key(prop) in keys and dp.clip_only_key(dp.BEST) not in keys


def test_a_replaced_row_is_kept_and_the_ablations_read_it_at_their_own_lr():
    untuned = {"final_accuracy": 0.603, "overrides": dp.series_overrides(dp.BEST, False, 8.0, 3e-3, 1.0)}
    tuned = {"final_accuracy": 0.70, "overrides": dp.series_overrides(dp.BEST, False, 8.0, 3e-2, 1.0)}
    ablation = {"final_accuracy": 0.587, "overrides": dp.sample_overrides(False, "ffa", 8.0, 3e-3, 1.0)}
    runs, earlier = {}, {}
    dp.keep_row(runs, earlier, "sample_ffa_eps8_groups_pc", untuned)
    dp.keep_row(runs, earlier, "sample_ffa_eps8", ablation)
    assert earlier == {}
    dp.keep_row(runs, earlier, "sample_ffa_eps8_groups_pc", tuned)  # the run at the choice replaces the untuned one
    assert runs["sample_ffa_eps8_groups_pc"] is tuned and earlier["sample_ffa_eps8_groups_pc"] == [untuned]
    assert dp.figure(runs, "sample_ffa_eps8_groups_pc", 3e-2, 1.0, earlier) == 0.70
    assert dp.figure(runs, "sample_ffa_eps8_groups_pc", 3e-3, 1.0) is None  # the headline never reads earlier rows
    assert dp.figure(runs, "sample_ffa_eps8_groups_pc", 3e-3, 1.0, earlier) == 0.603
    ab = dp.ablations(runs, earlier)
    assert (ab["lr"], ab["clip"]) == (3e-3, 1.0)
    assert ab["accuracy_sample_dp_eps8"] == 0.603 and ab["accuracy_sample_dp_eps8_flat_clip"] == 0.587
    assert "accuracy_no_dp" in ab["not_measured"] and "accuracy_sample_dp_eps8_flat_clip" not in ab["not_measured"]


def test_the_headline_holds_the_recommended_setup_and_the_many_clients_pair_only():
    assert set(dp.headline_runs()) == {"accuracy_no_dp", "accuracy_sample_dp_eps8", "accuracy_sample_dp_eps1",
                                       "accuracy_clip_only_no_noise", "accuracy_central_user_dp_eps8",
                                       "accuracy_distributed_dgauss_eps8"}
    assert not set(dp.headline_runs()) & set(dp._ABLATIONS)
