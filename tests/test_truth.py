"""A run tells its user the truth (issue 22): whether it trained, what it protected and against whom,
on what data; every inconsistency at once; no silent overwrite, no misleading 0."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from secfed.config import parse_config
from secfed.describe import failure, guarantee
from secfed.engine import Engine, read_rounds
from secfed.errors import CheckpointError, ConfigError, DataError

from conftest import digits_config, tiny_config

DIGITS_TOML = """
[run]
name = "nothing"
rounds = 2
[data]
source = "digits"
num_clients = 5
test_size = 300
[model]
name = "cnn"
[client]
local_steps = 1
[server]
min_clients = 6
"""


def secfed(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secfed", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------- 1. false success
@pytest.mark.slow  # a whole CLI run in a subprocess (about 15 s)
def test_run_that_aggregated_no_round_exits_non_zero_with_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(DIGITS_TOML)
    res = secfed("run", str(cfg), "--out", str(tmp_path / "r"), "--quiet", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    err = [l for l in res.stderr.splitlines() if l.strip() and not l.startswith("warning:")]
    assert len(err) == 1 and "failed: no round was aggregated" in err[0], res.stderr
    assert "0 of 2 rounds aggregated" in res.stdout
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["rounds_completed"] == 2 and s["rounds_aggregated"] == 0 and s["failed"]
    assert "after 0 of 2 rounds aggregated" in (tmp_path / "r" / "report.md").read_text()
    assert "This run failed" in (tmp_path / "r" / "report.md").read_text()


def test_poisson_sampling_that_draws_nobody_fails(tmp_path):
    cfg = digits_config(server={"sampling": "poisson", "sample_rate": 0.001}, client={"local_steps": 1})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    assert s["rounds_aggregated"] == 0
    assert s["failed"].startswith("no round was aggregated")
    assert any("draws no client" in w for w in s["warnings"])


def test_non_finite_final_figures_fail(tmp_path):
    assert "not finite" in failure([{"status": "ok"}], {"final_loss": float("nan"), "final_accuracy": 0.1})
    assert failure([{"status": "ok"}], {"final_loss": 0.5, "final_accuracy": 0.1}) is None
    # a model whose weights are NaN (e.g. a corrupted checkpoint) cannot end as a success
    e = Engine(digits_config(run={"rounds": 1}, client={"local_steps": 1}), tmp_path / "r", progress=False)
    e.global_w = torch.full_like(e.global_w, float("nan"))
    s = e.run()
    assert s["failed"] and ("not finite" in s["failed"] or "no round" in s["failed"])


# ---------------------------------------------------------------------------- 2. the guarantee
def _report(run: Path) -> str:
    return (run / "report.md").read_text()


def test_guarantee_dp_sgd_record_level(tmp_path):
    cfg = tiny_config(run={"rounds": 1}, client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}, "local_steps": 2},
                      server={"privacy": {"name": "dp-sgd", "epsilon": 4.0, "delta": 1e-5}})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    g = s["guarantee"]
    assert g["level"] == "record-level" and "one record" in g["protected_unit"]
    assert g["noise_multiplier"] > 0 and g["accountant"] == "rdp"
    assert "the server" in g["holds_against"]
    text = _report(tmp_path / "r")
    for part in ("Record-level differential privacy", "one record (training example) of one organisation",
                 f"epsilon = {s['epsilon']:.3g}", "delta = 1e-05", "DP-SGD", "RDP accountant", "z = ",
                 "per-example gradient clipping to L2 norm 1"):
        assert part in text, part
    assert g["sentence"] in text


def test_guarantee_dp_fedavg_central_from_the_user_level_preset(tmp_path, full_secret_cohort):
    cfg = digits_config(privacy={"preset": "user-level", "epsilon": 8.0, "delta": 1e-5, "sample_rate": 0.8},
                        client={"local_steps": 1})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    g = s["guarantee"]
    assert s["failed"] is None and s["rounds_aggregated"] >= 1
    assert g["level"] == "user-level" and g["protected_unit"] == "one organisation's whole data"
    assert "central Gaussian noise added by the server" in g["sentence"]
    assert "not against the server" in g["sentence"]
    assert "clipping of each organisation's update to L2 norm 0.5" in g["sentence"]
    assert "client sampling rate q = 0.8" in g["sentence"] and "budget of 8" in g["sentence"]
    assert g["sentence"] in _report(tmp_path / "r")
    assert "central noise, not vs server" in g["short"]  # what the progress bar shows


def test_guarantee_distributed_dp_under_secagg_and_robust_group_sums(tmp_path):
    pytest.importorskip("defenses.secure_aggregation.secagg")
    cfg = digits_config(run={"rounds": 1}, privacy={"preset": "user-level", "epsilon": 8.0, "noise": "distributed",
                                                    "sample_rate": 1.0},
                        server={"secure_sum": {"name": "secagg+", "clip_range": 8.0}, "min_clients": 3},
                        client={"local_steps": 1})
    s = Engine(cfg, tmp_path / "r", progress=False).run()
    g = s["guarantee"]
    # under SecAgg+ the preset picks the distributed discrete Gaussian (ddgauss), accounted for the ring
    assert [p.name for p in cfg.client.pipeline] == ["clip", "ddgauss"]
    assert "distributed discrete Gaussian" in g["sentence"] and "SecAgg+" in g["sentence"]
    assert "against the server alone (no colluding organisation): epsilon = " in g["sentence"]
    assert "not against the server colluding with any organisation" in g["sentence"]
    assert any("SecAgg+" in d for d in g["defences"])
    assert g["sentence"] in _report(tmp_path / "r")

    cfg = digits_config(run={"rounds": 1}, client={"local_steps": 1},
                        server={"secure_sum": {"name": "secagg+", "clip_range": 8.0}, "group_size": 2,
                                "aggregator": "median", "min_clients": 2})
    s = Engine(cfg, tmp_path / "r2", progress=False).run()
    text = _report(tmp_path / "r2")
    assert "claims no formal privacy guarantee" in text
    for part in ("SecAgg+ secure sum", "groups of 2 organisations", "robust aggregation rule 'median'"):
        assert part in text, part


# ---------------------------------------------------------------------------- 3. data you can see
def test_data_summary_and_clamp_warnings(tmp_path):
    cfg = digits_config(run={"rounds": 1}, data={"test_size": 800}, server={"cohort_size": 50},
                        client={"local_steps": 1})
    e = Engine(cfg, tmp_path / "r", progress=False)
    assert any("data.test_size = 800" in w for w in e.warnings)
    assert any("server.cohort_size = 50 > data.num_clients = 5" in w for w in e.warnings)
    s = e.run()
    d = s["data"]
    assert d["test_size"] == len(e.task.test) < 800
    assert sum(c["train"] for c in d["classes"]) == d["train_size"]
    assert sum(c["test"] for c in d["classes"]) == d["test_size"]
    assert sum(d["shard_sizes"]) == d["train_size"] and len(d["shard_sizes"]) == 5
    text = _report(tmp_path / "r")
    assert "## Data" in text and "| class | train | test |" in text and "## Warnings" in text


def test_nearly_unique_label_column_is_refused(tmp_path):
    csv = tmp_path / "notes.csv"
    csv.write_text("text,note_id\n" + "".join(f"patient note number {i} says fine,id{i}\n" for i in range(60)))
    cfg = tiny_config(data={"source": "csv", "path": str(csv), "label_column": "note_id", "test_size": 10,
                            "num_clients": 2})
    with pytest.raises(DataError, match="data.label_column 'note_id' has .* distinct values"):
        Engine(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- 4. round trips
def test_hand_written_dp_fedavg_lists_every_violation_at_once():
    cfg = digits_config(server={"privacy": {"name": "dp-fedavg", "epsilon": 8.0, "delta": 1e-5}})
    with pytest.raises(ConfigError) as e:
        Engine(cfg, None, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    for key in ("server.sampling", "client.weighting", "server.aggregator", "client.pipeline", "server.stages"):
        assert key in msg, key
    assert 'preset = "user-level"' in msg


def test_presets_fill_in_a_consistent_setup_and_refuse_contradictions():
    base = {"data": {"source": "digits", "num_clients": 10}, "model": {"name": "cnn"}}
    u = parse_config({**base, "privacy": {"preset": "user-level", "epsilon": 2.0, "delta": 1e-6}})
    assert u.server.sampling == "poisson" and u.client.weighting == "uniform"
    assert u.server.aggregator.params == {"denominator": "expected"}
    assert [p.name for p in u.client.pipeline] == ["clip"] and [p.name for p in u.server.stages] == ["central-gaussian"]
    assert u.server.privacy.name == "dp-fedavg" and u.server.privacy.params["epsilon"] == 2.0
    assert u.server.privacy.params["delta"] == 1e-6
    r = parse_config({**base, "privacy": {"preset": "record-level", "epsilon": 8.0, "clip": 0.7}})
    assert r.client.trainer.name == "dp-sgd" and r.client.trainer.params["max_grad_norm"] == 0.7
    assert r.server.privacy.name == "dp-sgd" and r.server.privacy.params["calibration"] == "per-client"
    shared = parse_config({**base, "privacy": {"preset": "record-level", "epsilon": 8.0, "calibration": "shared"}})
    assert shared.server.privacy.params["calibration"] == "shared"
    fixed = parse_config({**base, "privacy": {"preset": "record-level", "noise_multiplier": 1.1}})
    assert "calibration" not in fixed.server.privacy.params and fixed.client.trainer.params["noise_multiplier"] == 1.1
    for bad, what in (({"preset": "record-level", "noise_multiplier": 1.1, "calibration": "per-client"}, "a fixed noise_multiplier"),
                      ({"preset": "user-level", "epsilon": 8.0, "calibration": "per-client"}, "applies to preset")):
        with pytest.raises(ConfigError, match=f"privacy.calibration = 'per-client' \\({what}"):
            parse_config({**base, "privacy": bad})
    # re-reading the expanded config (config.json, --resume, audit) changes nothing
    for c in (u, r):
        again = parse_config(json.loads(json.dumps(c.model_dump(mode="json"))))
        assert again.fingerprint() == c.fingerprint()
    # explicit keys agreeing with the preset are fine; contradicting ones are listed together
    parse_config({**base, "privacy": {"preset": "user-level", "epsilon": 2.0}, "client": {"weighting": "uniform"}})
    with pytest.raises(ConfigError) as e:
        parse_config({**base, "privacy": {"preset": "user-level", "epsilon": 2.0},
                      "client": {"weighting": "examples"}, "server": {"sampling": "cohort", "aggregator": "median"}})
    msg = str(e.value)
    assert "contradicts 3" in msg and "client.weighting" in msg and "server.sampling" in msg and "server.aggregator" in msg
    with pytest.raises(ConfigError, match="privacy.preset"):
        parse_config({**base, "privacy": {"preset": "both", "epsilon": 1.0}})
    # distributed noise: the discrete Gaussian in SecAgg+'s ring (the default secure sum, or named), continuous
    # shares under a homomorphic sum or adaptive clipping (ddgauss needs the fixed clip); a share already there stays
    dist = {"preset": "user-level", "epsilon": 8.0, "noise": "distributed"}
    for server, want in (({}, "ddgauss"), ({"secure_sum": "secagg+"}, "ddgauss"), ({"secure_sum": "ckks"}, "gaussian-share")):
        c = parse_config({**base, "privacy": dist, "server": server})
        assert [p.name for p in c.client.pipeline] == ["clip", want], server
        assert c.server.secure_sum.name in ("secagg+", "ckks")
    c = parse_config({**base, "privacy": dist, "client": {"pipeline": ["adaptive-clip"]}})
    assert [p.name for p in c.client.pipeline] == ["adaptive-clip", "gaussian-share"]
    c = parse_config({**base, "privacy": dist, "client": {"pipeline": ["clip", "gaussian-share"]}})
    assert [p.name for p in c.client.pipeline] == ["clip", "gaussian-share"]


def _finished_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    Engine(digits_config(run={"rounds": 1}, client={"local_steps": 1}), run, progress=False).run()
    return run


def test_audit_validates_attack_names_first_and_never_overwrites(tmp_path):
    from secfed.compare.post_run import audit_run

    run = _finished_run(tmp_path)
    with pytest.raises(ConfigError, match="unknown attack 'membrship'.*did you mean 'membership'"):
        audit_run(run, ["membrship"], progress=False)
    assert not (run / "audit").exists()
    audit_run(run, ["membership"], progress=False)
    first = (run / "audit" / "audit.json").read_text()
    audit_run(run, ["membership"], progress=False)
    assert (run / "audit.prev-1" / "audit.json").read_text() == first
    assert (run / "audit" / "audit.json").exists()


def test_audit_cli_rejects_a_typo_before_running_anything(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(DIGITS_TOML.replace("min_clients = 6", "min_clients = 1"))
    res = secfed("audit", str(cfg), "--attacks", "membrship", "--quiet", cwd=tmp_path)
    assert res.returncode != 0 and "unknown attack 'membrship'" in res.stderr
    assert not (tmp_path / "runs").exists()


REAL_RUN_ROUND = Engine.run_round


def _cli_run(tmp_path: Path, monkeypatch, interrupt_in_round: int, resume: bool = False):
    from typer.testing import CliRunner

    from secfed.cli import app

    real = REAL_RUN_ROUND

    def run_round(self, t, bar=None):
        if t == interrupt_in_round:
            raise KeyboardInterrupt
        return real(self, t, bar)

    monkeypatch.setattr(Engine, "run_round", run_round)
    cfg = tmp_path / "c.toml"
    cfg.write_text(DIGITS_TOML.replace("min_clients = 6", "min_clients = 1").replace("rounds = 2", "rounds = 3"))
    args = ["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"] + (["--resume"] if resume else [])
    return CliRunner().invoke(app, args)


def test_sigint_says_what_was_saved_and_how_to_continue(tmp_path, monkeypatch):
    res = _cli_run(tmp_path, monkeypatch, interrupt_in_round=2)
    assert res.exit_code == 130
    assert "rounds 1-1 are saved" in res.output and "--resume" in res.output
    res = _cli_run(tmp_path, monkeypatch, interrupt_in_round=-1, resume=True)
    assert res.exit_code == 0, res.output
    assert [r["round"] for r in read_rounds(tmp_path / "r")] == [1, 2, 3]


def test_sigint_in_round_one_then_resume_says_rerun_without_resume(tmp_path, monkeypatch):
    res = _cli_run(tmp_path, monkeypatch, interrupt_in_round=1)
    assert res.exit_code == 130
    assert "nothing to resume" in res.output and "without --resume" in res.output
    cfg = digits_config(run={"rounds": 3})
    with pytest.raises(CheckpointError, match="nothing to resume: rerun without --resume"):
        Engine(cfg, tmp_path / "r", resume=True, progress=False).run()


def test_resume_after_a_config_change_names_the_key(tmp_path):
    Engine(digits_config(run={"rounds": 1}, client={"local_steps": 1}), tmp_path / "r", progress=False).run()
    cfg = digits_config(run={"rounds": 2}, client={"local_steps": 1, "lr": 0.5})
    with pytest.raises(CheckpointError, match=r"different config: changed client\.lr \(0\.01 -> 0\.5\)"):
        Engine(cfg, tmp_path / "r", resume=True, progress=False).run()


def test_pinned_hub_id_is_refused_before_any_network_attempt(monkeypatch):
    import socket

    attempts: list[str] = []  # any name lookup or connection is a network attempt (no wall-clock assertion)

    def refuse(name):
        def f(*a, **k):
            attempts.append(name)
            raise OSError(f"test: network attempt via {name}")
        return f

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, refuse(name))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    with pytest.raises(ConfigError, match="model.sha256 pins a local folder only"):
        parse_config({"model": {"name": "some-org/some-model", "sha256": "0" * 64}})
    assert attempts == []


@pytest.mark.slow  # a whole CLI run in a subprocess (about 15 s)
def test_quiet_is_quiet(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[run]\nname = "q"\nrounds = 1\n[data]\nsource = "synthetic-text"\nnum_clients = 2\ntest_size = 50\n'
                   '[model]\nname = "tiny-bert"\nlora_r = 2\n[client]\nlocal_steps = 1\n')
    res = secfed("run", str(cfg), "--out", str(tmp_path / "r"), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "", res.stderr
    assert len(res.stdout.strip().splitlines()) == 2  # the summary line and the report path


def test_an_attack_that_did_not_run_says_not_run_never_zero(tmp_path):
    from secfed.compare.post_run import audit_markdown

    cfg = tiny_config(run={"rounds": 1}, client={"optimizer": "adam", "local_steps": 1},
                      server={"observers": [{"name": "text-inversion", "attack_rounds": [1]}]})
    Engine(cfg, tmp_path / "r", progress=False).run()
    rec = read_rounds(tmp_path / "r")[0]
    assert rec["text_status"].startswith("not run") and "client.optimizer = sgd" in rec["text_status"]
    assert rec["text_token_recall"] is None and rec["text_token_precision"] is None
    report = {"run": "r", "round": 1, "claimed": {"epsilon": None, "delta": None, "privacy": None, "trainer": "sgd",
                                                  "pipeline": [], "secure_sum": "plain", "aggregator": "mean",
                                                  "stages": [], "adversary": None},
              "results": {"replay": {"text_token_recall": None,
                                     "text_status": "not run: span check needs client.optimizer = sgd"}},
              "during_run": {}, "verdicts": []}
    md = audit_markdown(report)
    assert "| replay | text_token_recall | not run: span check needs client.optimizer = sgd |" in md


def test_guarantee_without_a_guard_claims_nothing():
    g = guarantee(digits_config())
    assert g["mechanism"] is None and "claims no formal privacy guarantee" in g["sentence"]


def test_the_user_level_preset_equals_the_hand_written_dp_quickstart():
    from secfed.config import load_config

    root = Path(__file__).resolve().parent.parent / "experiments"
    hand, preset = load_config(root / "dp_quickstart.toml"), load_config(root / "dp_preset_quickstart.toml")
    for sec in ("client", "server"):
        assert getattr(preset, sec).model_dump(mode="json") == getattr(hand, sec).model_dump(mode="json"), sec


def test_a_compare_cell_that_trained_nothing_is_failed_not_done(tmp_path):
    from secfed.compare.metrics import cell_metrics

    cell = tmp_path / "cell"
    (cell / "run").mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"id": "c", "setup": "s", "axes": {}, "seed": 0, "config": {}}))
    (cell / "status.json").write_text(json.dumps({"status": "done"}))
    (cell / "run" / "summary.json").write_text(json.dumps({"final_accuracy": 0.1, "failed": "no round was aggregated"}))
    row = cell_metrics(cell)
    assert row["status"] == "failed" and "no round was aggregated" in row["error"]
