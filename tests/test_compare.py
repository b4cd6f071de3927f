"""secfed compare / secfed audit: grid expansion, resumable runner (kill and rerun), report, audit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attacks.dp_audit.threshold import clopper_pearson, epsilon_lower_bound
from secfed.compare.post_run import (audit_markdown, audit_run, membership_attack,
                                  verdicts)
from secfed.compare.grid import apply_overrides, parse_grid
from secfed.compare.metrics import aggregate
from secfed.compare.report import pareto_front, write_report
from secfed.compare.runner import GridRunner, run_cell
from secfed.data import TensorData
from secfed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "run": {"name": "t", "rounds": 1},
    "data": {"source": "digits", "num_clients": 3, "test_size": 200},
    "model": {"name": "cnn"},
    "client": {"batch_size": 32, "lr": 1e-2, "local_steps": 2},
}


# ---------------------------------------------------------------------------- grid
def test_overrides_dotted_nested_plugin_and_append():
    cfg = {"server": {"observers": ["dp-audit"], "aggregator": {"name": "krum", "f": 1}}, "client": {"lr": 1.0}}
    apply_overrides(cfg, {"server.aggregator": {"name": "median"}, "client": {"batch_size": 8},
                          "+server.observers": ["dlg"], "run.seed": 3}, "t")
    assert cfg["server"]["aggregator"] == {"name": "median"}  # a plug-in table replaces, no stale 'f'
    assert cfg["client"] == {"lr": 1.0, "batch_size": 8}  # a plain table merges
    assert cfg["server"]["observers"] == ["dp-audit", "dlg"]
    assert cfg["run"]["seed"] == 3
    with pytest.raises(ConfigError, match="appends to a list"):
        apply_overrides(cfg, {"+client.lr": [1]}, "t")


def test_studies_union_dedupe_order_and_ids():
    g = parse_grid({"grid": {"name": "g", "seeds": [0, 1]}, "base": BASE,
                    "axes": {"defence": {"none": {}, "med": {"server.aggregator": "median"}},
                             "attack": {"none": {}, "alie": {"attack.adversary": {"name": "alie", "fraction": 0.2}}}},
                    "study": [{"defence": ["none", "med"]}, {"defence": ["none"], "attack": ["none", "alie"]}]})
    ids = [c.id for c in g.cells()]
    assert ids == ["defence=none__attack=none__seed=0", "defence=none__attack=none__seed=1",
                   "defence=med__attack=none__seed=0", "defence=med__attack=none__seed=1",
                   "defence=none__attack=alie__seed=0", "defence=none__attack=alie__seed=1"]
    c = g.cells()[-1]
    assert c.config["attack"]["adversary"]["name"] == "alie" and c.config["run"]["seed"] == 1
    assert c.setup == "defence=none,attack=alie"


@pytest.mark.parametrize("bad, msg", [
    ({"axes": {"a": {"x": {}}}, "study": [{"b": ["x"]}]}, "no such axis"),
    ({"axes": {"a": {"x": {}}}, "study": [{"a": ["y"]}]}, "not a value of axes.a"),
    ({"axes": {"a": {"x__y": {}}}}, "names a folder"),
    ({"axes": {"a": {"x": {"client.batch_sise": 3}}}}, "client.batch_sise"),
    ({"grid": {"seeds": []}}, "grid.seeds"),
    ({"grid": {"base": "/nonexistent.toml"}}, "not found"),
])
def test_grid_errors_are_one_line_config_errors(bad, msg):
    data = {"base": BASE, **bad}
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        parse_grid(data)


def test_shipped_grids_parse():
    from secfed.compare import load_grid

    for name in ("tradeoffs_digits", "tradeoffs_text"):
        g = load_grid(ROOT / "experiments" / f"{name}.toml")
        assert len(g.cells()) >= 10


# ---------------------------------------------------------------------------- statistics
def test_clopper_pearson_and_epsilon_bound_by_hand():
    # k = 0 of n = 10: upper end 1 - (alpha/2)^(1/n)
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == (pytest.approx(0.025 ** 0.1), 1.0)
    # 100/100 members flagged, 0/100 non-members: log(TPR_lo / FPR_hi)
    lo = 0.025 ** 0.01
    assert epsilon_lower_bound(100, 100, 0, 100, 0.0) == pytest.approx(math.log(lo / (1 - lo)))
    assert epsilon_lower_bound(50, 100, 50, 100, 1e-5) == 0.0  # a coin flip proves nothing


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 60), st.integers(0, 60), st.integers(1, 60))
def test_epsilon_bound_monotone_in_true_positives(tp, fp, n):
    tp, fp = min(tp, n), min(fp, n)
    e = epsilon_lower_bound(tp, n, fp, n, 1e-5)
    assert e >= 0
    if tp < n:
        assert epsilon_lower_bound(tp + 1, n, fp, n, 1e-5) >= e - 1e-12


def test_pareto_front_time_tolerance_makes_near_equal_times_a_tie():
    pts = [(-0.36, 2.9, 54.7), (-0.36, 2.9, 54.0), (-0.36, 2.9, 40.0)]
    assert pareto_front(pts) == [2]  # exact: the fastest dominates both
    assert pareto_front(pts[:2]) == [1]  # 54.0 < 54.7 decides without a tolerance ...
    assert pareto_front(pts[:2], (0.0, 0.0, 0.05)) == [0, 1]  # ... and is a tie within 5%
    assert pareto_front(pts, (0.0, 0.0, 0.05)) == [2]  # 40 s is more than 5% faster


def test_pareto_front_by_hand():
    pts = [(0, 0, 0), (1, 1, 1), (0, 1, -1), (0, 0, 0), (2, -1, 5)]
    assert pareto_front(pts) == [0, 2, 3, 4]  # (1,1,1) is dominated by (0,0,0)


def test_seed_aggregation_mean_and_sample_std():
    rows = [{"setup": "s", "axis.d": "x", "status": "done", "accuracy": a, "adversary": None, "secure_sum": "plain",
             "inversion_attack": False} for a in (0.5, 0.7)]
    rows.append({"setup": "s", "axis.d": "x", "status": "failed", "error": "boom", "adversary": None,
                 "secure_sum": "plain", "inversion_attack": False})
    (g,) = aggregate(rows)
    assert g["accuracy"] == pytest.approx(0.6) and g["accuracy_sd"] == pytest.approx(math.sqrt(0.02))
    assert (g["done"], g["failed"], g["errors"]) == (2, 1, ["boom"])


# ---------------------------------------------------------------------------- audit
class _Lookup(torch.nn.Module):
    """logits = [10 f, 0]: confident 'class 0' wherever f = 1."""

    def forward(self, pixels):
        return torch.stack([10 * pixels[:, 0], torch.zeros(len(pixels))], 1)


def test_membership_attack_separates_a_memorising_model():
    n = 200
    members = TensorData({"pixels": torch.ones(n, 1), "labels": torch.zeros(n, dtype=torch.long)}, 2)
    non = TensorData({"pixels": torch.ones(n, 1), "labels": torch.ones(n, dtype=torch.long)}, 2)
    task = SimpleNamespace(train=members, test=non, forward=lambda m, b: m(pixels=b["pixels"]))
    r = membership_attack(_Lookup(), task, delta=1e-5)
    assert r["membership_auc"] == 1.0 and r["membership_tpr_at_1pct_fpr"] == 1.0
    lo = 0.025 ** (1 / 100)  # 100 of 100 in the held-out half
    assert r["membership_eps_lower_bound"] == pytest.approx(math.log((lo - 1e-5) / (1 - lo)), rel=1e-6)


def test_plant_canaries_wrong_labels_coins_and_layout():
    from secfed.data import plant_canaries

    n = 400
    train = TensorData({"pixels": torch.arange(n, dtype=torch.float32)[:, None],
                        "labels": torch.arange(n) % 10}, 10)
    out, can, coin = plant_canaries(train, 100, seed=3)
    ids = can.tensors["pixels"][:, 0].long()  # pixel value = original row
    assert len(can) == 100 and len(ids.unique()) == 100
    assert bool((can.labels != train.labels[ids]).all())  # every canary carries a wrong label
    assert 30 < coin.sum() < 70  # coin of probability 1/2 each
    k = int(coin.sum())
    assert len(out) == n - 100 + k
    # included canaries are the last rows, with their wrong labels; excluded ones are gone
    assert torch.equal(out.tensors["pixels"][-k:, 0].long(), ids[torch.as_tensor(coin)])
    assert torch.equal(out.labels[-k:], can.labels[torch.as_tensor(coin)])
    clean = out.tensors["pixels"][:-k, 0].long()
    assert not set(clean.tolist()) & set(ids.tolist())
    assert torch.equal(out.labels[:-k], train.labels[clean])  # the other rows are untouched
    again = plant_canaries(train, 100, seed=3)  # the audit rebuilds the same canaries from the config
    assert torch.equal(again[1].labels, can.labels) and (again[2] == coin).all()
    with pytest.raises(Exception, match="data.canaries"):
        plant_canaries(train, 201, seed=3)


def test_canary_membership_of_a_model_that_memorised_the_included_canaries():
    n, m = 100, 40
    coin = torch.arange(m) % 2 == 0
    natural = TensorData({"pixels": torch.zeros(n, 1), "labels": torch.zeros(n, dtype=torch.long)}, 2)
    # canary pixel = 1 where included: _Lookup answers "class 0" confidently there, the canary's wrong label
    can = TensorData({"pixels": coin.float()[:, None], "labels": torch.zeros(m, dtype=torch.long)}, 2)
    inside = can.subset(torch.nonzero(coin)[:, 0])
    train = TensorData({k: torch.cat([natural.tensors[k], inside.tensors[k]]) for k in ("pixels", "labels")}, 2)
    task = SimpleNamespace(train=train, test=natural, canaries=can, canary_in=coin.numpy(),
                           forward=lambda mdl, b: mdl(pixels=b["pixels"]))
    r = membership_attack(_Lookup(), task, delta=1e-5)
    assert r["canary_auc"] == 1.0 and r["canaries"] == m
    assert r["membership_auc"] == 0.5 and r["membership_examples"] == 2 * n  # included canaries are not natural members
    lo = 0.025 ** (1 / 10)  # 10 of 10 included canaries in the held-out half, 0 of 10 excluded
    assert r["canary_eps_lower_bound"] == pytest.approx(math.log((lo - 1e-5) / (1 - lo)), rel=1e-6)


def test_verdict_red_when_lower_bound_exceeds_claim():
    rep = {"run": "r", "round": 3, "claimed": {"epsilon": 1.0, "delta": 1e-5, "privacy": "dp-fedavg", "trainer": "sgd",
                                               "pipeline": ["clip"], "secure_sum": "plain", "aggregator": "mean",
                                               "stages": [], "adversary": None},
           "results": {"membership": {"membership_eps_lower_bound": 2.5}},
           "during_run": {"audit_eps_lower_bound": {"last": 0.4, "max": 0.5, "mean": 0.3, "rounds": 3}}}
    rep["verdicts"] = verdicts(rep)
    assert [v["verdict"] for v in rep["verdicts"]] == ["contradicts", "consistent"]
    md = audit_markdown(rep)
    assert "color:red" in md and "1 empirical figure(s) contradict" in md
    # an auditing observer's bound is judged against the claim of the mechanism it audits
    rep["during_run"]["audit_claimed_eps"] = {"last": 0.2, "max": 0.2, "mean": 0.2, "rounds": 3}
    assert [v["verdict"] for v in verdicts(rep)] == ["contradicts", "contradicts"]
    rep["claimed"]["epsilon"] = None  # no guard, no observer claim: nothing to contradict
    del rep["during_run"]["audit_claimed_eps"]
    assert [v["verdict"] for v in verdicts(rep)] == ["no claim", "no claim"]


def test_audit_a_finished_run_with_membership_and_replayed_observer(tmp_path):
    from secfed.config import parse_config
    from secfed.engine import Engine

    cfg = parse_config({**BASE, "run": {"name": "a", "rounds": 2}, "data": {**BASE["data"], "canaries": 40},
                        "server": {"observers": [{"name": "dp-audit", "m": 50, "canary_dim": 64}]}})
    run = tmp_path / "run"
    Engine(cfg, run, progress=False).run()
    ckpt = (run / "checkpoint" / "tensors.safetensors").read_bytes()
    rep = audit_run(run, ["membership", "dp-audit"], progress=False)
    assert 0.0 <= rep["results"]["membership"]["membership_auc"] <= 1.0
    assert 0.0 <= rep["results"]["membership"]["canary_auc"] <= 1.0  # the audit rebuilt the run's canaries
    assert rep["results"]["membership"]["canaries"] == 40
    assert rep["results"]["replay"]["replay_round"] == 3  # one more round of the run's own protocol
    assert "audit_eps_lower_bound" in rep["results"]["replay"]
    assert "audit_eps_lower_bound" in rep["during_run"]
    assert (run / "audit" / "audit.md").exists()
    assert (run / "checkpoint" / "tensors.safetensors").read_bytes() == ckpt  # the run itself is untouched
    assert len((run / "rounds.jsonl").read_text().splitlines()) == 2


def test_audit_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        audit_run(tmp_path, ["membership"])


# ---------------------------------------------------------------------------- runner
def test_cell_killed_mid_run_resumes_from_its_checkpoint(tmp_path):
    from secfed.config import parse_config
    from secfed.engine import Engine

    cfg = {**BASE, "run": {"name": "c", "rounds": 3}}
    d = tmp_path / "cell"
    (d / "run").mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"id": "c", "config": cfg, "audit": []}))

    def crash(t):
        if t == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Engine(parse_config(cfg), d / "run", progress=False, on_round_end=crash).run()
    first = (d / "run" / "rounds.jsonl").read_text()
    assert run_cell(d) == 0
    recs = (d / "run" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(r)["round"] for r in recs] == [1, 2, 3] and recs[0] + "\n" == first
    assert not list(tmp_path.glob("cell/run.prev-*"))  # resumed, not restarted


def _grid_file(tmp_path: Path) -> Path:
    p = tmp_path / "grid.toml"
    p.write_text("""
[grid]
name = "kill"
seeds = [0]

[base]
run = {name = "k", rounds = 1}
data = {source = "digits", num_clients = 2, test_size = 100}
model = {name = "cnn"}
client = {batch_size = 32, lr = 1e-2, local_steps = 1}

[axes.defence]
none = {}
fedavgm = {"server.optimizer" = "fedavgm"}
missing = {"server.aggregator" = "no_such_module:Agg"}
""")
    return p


@pytest.mark.slow  # kills a grid subprocess mid-run and reruns it (about 25 s)
def test_kill_mid_grid_then_rerun_completes_only_missing_cells(tmp_path):
    grid, out = _grid_file(tmp_path), tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "secfed.cli", "compare", str(grid), "--out", str(out), "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "cells" / "defence=none__seed=0"
    deadline = time.time() + 120
    while not (first / "status.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((first / "status.json").read_text())["status"] == "done"
    assert not (out / "cells" / "defence=fedavgm__seed=0" / "run" / "summary.json").exists()
    stamp = (first / "run" / "summary.json").stat().st_mtime_ns

    from secfed.compare import load_grid

    statuses = GridRunner(load_grid(grid), out, progress=False, fork=False).run()  # the fresh-interpreter path
    assert statuses["defence=none__seed=0"] == {"status": "done", "skipped": True}
    assert statuses["defence=fedavgm__seed=0"]["status"] == "done"
    bad = statuses["defence=missing__seed=0"]
    assert bad["status"] == "failed" and bad["attempts"] == 1 and "no_such_module" in bad["error"]
    assert (first / "run" / "summary.json").stat().st_mtime_ns == stamp
    report = write_report(out).read_text()
    assert "2 of 3 cells done, 1 failed" in report and "no_such_module" in report
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["done", "done", "failed"]
    assert all(r["accuracy"] > 0 and r["bytes_up_per_client"] > 0 for r in rows[:2])
    assert (out / "results.csv").exists() and (out / "pareto.png").exists()


def _fake_cell(root: Path, cid: str, axes: dict, cfg: dict, summary: dict, rounds: list[dict]) -> None:
    d = root / "cells" / cid
    (d / "run").mkdir(parents=True)
    setup = ",".join(f"{k}={v}" for k, v in axes.items())
    (d / "cell.json").write_text(json.dumps({"id": cid, "setup": setup, "axes": axes, "seed": 0, "config": cfg}))
    (d / "status.json").write_text(json.dumps({"status": "done"}))
    (d / "run" / "summary.json").write_text(json.dumps(summary))
    (d / "run" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_report_finds_plugin_figures_and_marks_inversion_blocked(tmp_path):
    summ = {"final_accuracy": 0.8, "final_loss": 0.5, "seconds_per_round": 1.0, "peak_rss_mb": 400.0}
    rec = {"round": 1, "sampled": 4, "completed": 4, "bytes_up": 4000, "bytes_down": 8000, "seconds": 1.0}
    dlg = {"server": {"observers": [{"name": "dlg"}]}}
    _fake_cell(tmp_path, "defence=none__attack=none__seed=0", {"defence": "none", "attack": "none"}, {}, summ, [rec])
    _fake_cell(tmp_path, "defence=none__attack=dlg__seed=0", {"defence": "none", "attack": "dlg"}, dlg, summ,
               [{**rec, "dlg_psnr": 21.5, "dlg_ssim": 0.7, "dlg_status": "ok"}, {**rec, "round": 2, "dlg_psnr": 30.0}])
    _fake_cell(tmp_path, "defence=secagg__attack=none__seed=0", {"defence": "secagg", "attack": "none"},
               {"server": {"secure_sum": "secagg+"}}, summ, [{**rec, "bytes_up": 8000}])
    _fake_cell(tmp_path, "defence=secagg__attack=dlg__seed=0", {"defence": "secagg", "attack": "dlg"},
               {"server": {"secure_sum": "secagg+", "observers": ["dlg"]}}, summ,
               [{**rec, "dlg_psnr": None, "dlg_status": "no per-client update"}])
    (tmp_path / "grid.json").write_text(json.dumps({
        "name": "g", "seeds": [0], "axes": {"defence": ["none", "secagg"], "attack": ["none", "dlg"]},
        "cells": sorted(p.name for p in (tmp_path / "cells").iterdir())}))
    text = write_report(tmp_path).read_text()
    rows = {json.loads(l)["cell"]: json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()}
    r = rows["defence=none__attack=dlg__seed=0"]
    assert (r["psnr"], r["ssim"], r["psnr_key"]) == (30.0, 0.7, "dlg_psnr")  # the attacker's best round
    assert rows["defence=secagg__attack=dlg__seed=0"]["inversion_blocked"]
    assert rows["defence=secagg__attack=none__seed=0"]["bytes_up_per_client"] == 2000.0  # 8000 B / 4 clients
    # columns nobody filled (epsilon, MIA) are dropped; KB = bytes / 1024 per client per round
    assert "| none | 0.800 | 30.0 | 1.000 | 1.0 | 2.0 | 400.0 |" in text
    assert "| secagg | 0.800 | blocked (secagg+: no per-client update) | 1.000 | 2.0 | 2.0 | 400.0 |" in text


@pytest.mark.parametrize("bad", [torch.zeros(7), torch.full((13706,), float("nan")), torch.zeros(13706, dtype=torch.float64)])
def test_audit_rejects_weights_that_do_not_fit_the_model(tmp_path, bad):
    from secfed.checkpoint import save_checkpoint
    from secfed.config import parse_config

    cfg = parse_config(BASE)
    (tmp_path / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    save_checkpoint(tmp_path, {"global": bad}, {"round": 1})
    with pytest.raises(ConfigError, match="do not fit the model"):
        audit_run(tmp_path, ["membership"])


def test_report_canary_column_and_front_leaves_out_setups_that_learnt_nothing(tmp_path):
    rec = {"round": 1, "sampled": 4, "completed": 4, "bytes_up": 4000, "bytes_down": 4000, "seconds": 1.0}
    for name, acc, auc, canary in (("none", 0.9, 0.52, 0.8), ("dp-eps8", 0.6, 0.51, 0.55), ("dp-eps1", 0.12, 0.5, 0.5)):
        summ = {"final_accuracy": acc, "seconds_per_round": 1.0, "peak_rss_mb": 400.0, "majority_baseline": 0.1}
        cid = f"defence={name}__seed=0"
        _fake_cell(tmp_path, cid, {"defence": name}, {}, summ, [rec])
        audit = {"attacks_run": ["membership"], "verdicts": [], "results": {"membership": {
            "membership_auc": auc, "membership_eps_lower_bound": 0.1, "canary_auc": canary,
            "canary_eps_lower_bound": 0.7}}}
        (tmp_path / "cells" / cid / "run" / "audit").mkdir()
        (tmp_path / "cells" / cid / "run" / "audit" / "audit.json").write_text(json.dumps(audit))
    (tmp_path / "grid.json").write_text(json.dumps({"name": "g", "seeds": [0], "axes": {"defence": ["none"]},
                                                   "cells": sorted(p.name for p in (tmp_path / "cells").iterdir())}))
    text = write_report(tmp_path).read_text()
    assert "| setup | accuracy | MIA AUC | canary MIA AUC |" in text
    assert "| none | 0.900 | 0.520 | 0.800 |" in text
    # dp-eps1 leaks least but is within 0.05 of the majority class: not recommended
    assert ("Not dominated on (accuracy, canary MIA AUC, time per round; leakage within 1% and times within 5% count "
            "as equal): **dp-eps8, none** (setups within 0.05 of the majority-class accuracy are left out") in text
    row = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert row["eps_lower_bound"] == 0.7  # the largest of the audit's bounds


def test_report_llm_grid_planted_cell_is_the_setups_run_and_lm_columns(tmp_path):
    """Issue 19 grid shape: no attack value "none"; the secret holder's planted cell (an honest adversary)
    gives utility, membership and memorisation; DAGER's column is blocked under a secure sum; the preamble
    explains the columns that are there and no other."""
    summ = {"final_accuracy": 0.36, "seconds_per_round": 100.0, "peak_rss_mb": 3000.0, "zero_shot_accuracy": 0.321}
    rec = {"round": 1, "sampled": 6, "completed": 6, "bytes_up": 6 * 1843200, "bytes_down": 6 * 1843200, "seconds": 1.0}
    planted = {"attack": {"adversary": {"name": "secret-sharer", "ids": [0]}}}
    backdoor = {"attack": {"adversary": {"name": "instruct-backdoor", "ids": [1, 2]}}}
    dager = {"server": {"observers": [{"name": "dager", "attack_rounds": [2]}]}}
    cells = {
        ("none", "planted"): (planted, {"canary_exposure_bits_x1": 7.3, "canary_exposure_bits_x16": 4.1,
                                        "canary_gain_bits_x1": 0.2, "canary_gain_bits_x16": 2.9,
                                        "control_exposure_bits_mean": 1.5, "extraction_fraction": 0.05,
                                        "control_fraction": 0.0, "llm_mia_auc_ref_calibrated": 0.53}, {}),
        ("none", "backdoor"): (backdoor, {"backdoor_asr": 0.27}, {}),
        ("none", "inversion"): (dager, {}, {"dager_token_recall": 0.9, "dager_exact": 0.0, "dager_status": "ok"}),
        ("secagg", "planted"): ({**planted, "server": {"secure_sum": "secagg+"}}, {"canary_exposure_bits_x16": 4.1,
                                "llm_mia_auc_ref_calibrated": 0.53}, {}),
        ("secagg", "inversion"): ({"server": {"secure_sum": "secagg+", "observers": [{"name": "dager"}]}}, {},
                                  {"dager_exact": None, "dager_status": "blocked: no per-client update (secure sum)"}),
    }
    for (d, a), (cfg, audit, extra) in cells.items():
        cid = f"defence={d}__attack={a}__seed=0"
        _fake_cell(tmp_path, cid, {"defence": d, "attack": a}, cfg,
                   {**summ, "final_accuracy": 0.30 if a == "backdoor" else 0.36}, [{**rec, **extra}])
        (tmp_path / "cells" / cid / "run" / "audit").mkdir()
        (tmp_path / "cells" / cid / "run" / "audit" / "audit.json").write_text(json.dumps(
            {"attacks_run": ["exposure"], "verdicts": [], "results": {"exposure": audit}}))
    (tmp_path / "grid.json").write_text(json.dumps({
        "name": "llm", "seeds": [0], "axes": {"defence": ["none", "secagg"], "attack": ["planted", "backdoor", "inversion"]},
        "cells": sorted(p.name for p in (tmp_path / "cells").iterdir())}))
    text = write_report(tmp_path).read_text()
    rows = {json.loads(l)["cell"]: json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()}
    r = rows["defence=none__attack=planted__seed=0"]
    assert (r["adversary"], r["planted"]) == (None, "secret-sharer")  # an honest secret holder, not an attack
    assert rows["defence=none__attack=backdoor__seed=0"]["adversary"] == "instruct-backdoor"
    assert (r["canary_exposure"], r["canary_gain"], r["control_exposure"], r["extraction"]) == (7.3, 2.9, 1.5, 0.05)
    head = ("| setup | accuracy | MIA AUC | canary exposure (bits) | exposure gain over base (bits) | "
            "control canaries (bits) | PII extracted | curious server · inversion: token recovery | "
            "backdoor: accuracy | backdoor: backdoor success | s/round | KB up/client | KB down/client | peak MB |")
    assert head in text
    # utility from the planted cell (0.36, not the backdoored 0.30); 1,843,200 B = 1800 KB per client per round
    assert "| none | 0.360 | 0.530 | 7.300 | 2.900 | 1.500 | 0.050 | 0.900 | 0.300 | 0.270 | 100 | 1800 | 1800 |" in text
    assert "| secagg | 0.360 | 0.530 | 4.100 | - | - | - | blocked (secagg+: no per-client update) | - | - |" in text
    assert "canary exposure: the secret sharer's exposure" in text and "PII extracted: the fraction" in text
    assert "wrong-label" not in text  # the classification grid's canary column is not there, nor its note
    # the Pareto front's leakage axis is the exposure gain; "learnt nothing" is measured against the base model
    assert ("Not dominated on (accuracy, exposure gain over base (bits), time per round; leakage within 1% and times "
            "within 5% count as equal): **none** (setups within 0.01 of the base model's zero-shot accuracy are left "
            "out") in text


def test_report_of_a_folder_that_is_not_a_grid_is_one_line_and_a_damaged_cell_is_listed(tmp_path):
    from secfed.errors import DataError

    with pytest.raises(DataError, match="no grid.json"):
        write_report(tmp_path)
    (tmp_path / "grid.json").write_text("{not json")
    with pytest.raises(DataError, match="grid.json: unreadable"):
        write_report(tmp_path)
    summ = {"final_accuracy": 0.8, "seconds_per_round": 1.0, "peak_rss_mb": 400.0}
    rec = {"round": 1, "sampled": 4, "completed": 4, "bytes_up": 4000, "bytes_down": 4000, "seconds": 1.0}
    for d in ("a", "b"):
        _fake_cell(tmp_path, f"defence={d}__seed=0", {"defence": d}, {}, summ, [rec])
    (tmp_path / "cells" / "defence=b__seed=0" / "run" / "summary.json").write_text("[1, 2")  # torn write
    (tmp_path / "grid.json").write_text(json.dumps({"name": "g", "seeds": [0], "axes": {"defence": ["a", "b"]},
                                                   "cells": ["defence=a__seed=0", "defence=b__seed=0"]}))
    text = write_report(tmp_path).read_text()
    assert "| a | 0.800 |" in text and "## Unreadable cells" in text and "`defence=b__seed=0: JSONDecodeError" in text
