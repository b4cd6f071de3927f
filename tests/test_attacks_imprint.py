"""The imprint / trap-weights attack of a malicious server (issue 17, part 3) and what stops it.

Case built to be found: fc-imprint on digits, 4 clients with batches of 2, one plain-SGD step,
SecAgg+: the server holds only the sum and still gets every image back (PSNR > 30 dB).
Cases built to be safe: the same cohort under client-side DP-SGD, and clients that refuse a
model they cannot recompute (``client.verify_model``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from attacks.inversion.imprint import EXACT_DB, craft_imprint, recover_images, score
from secfed.config import parse_config
from secfed.engine import Engine, read_rounds
from secfed.errors import ConfigError
from secfed.models import ImprintMLP
from secfed.spec import ParamSpec


def _cfg(secure_sum: str = "secagg", batch: int = 2, clients: int = 4, client: dict | None = None,
         attack: bool = True, rounds: int = 1, model: str = "fc-imprint") -> object:
    c = {"optimizer": "sgd", "lr": 0.1, "batch_size": batch, "local_steps": 1, **(client or {})}
    raw = {"run": {"name": "imprint", "rounds": rounds}, "model": {"name": model}, "client": c,
           "data": {"source": "digits", "num_clients": clients, "test_size": 300, "image_size": 8},
           "server": {"secure_sum": secure_sum}}
    if attack:
        raw["attack"] = {"server": {"name": "imprint", "save_images": False}}
    return parse_config(raw)


def _run(cfg, tmp_path: Path, spy: bool = False) -> list[dict]:
    eng = Engine(cfg, tmp_path / "run", progress=False)
    if spy:  # the attack reads what the server saw: under SecAgg+ no per-client update
        seen = []
        orig = eng.server_adversary.recover

        def recover(view, ctx):
            seen.append(view.updates)
            return orig(view, ctx)

        eng.server_adversary.recover = recover
    eng.run()
    if spy:
        assert seen and all(u is None for u in seen)
    return read_rounds(tmp_path / "run")


def test_trap_weights_invert_a_sum_of_gradients_exactly():
    """Two clients' weighted gradient sums; every image alone in its bin comes back to float precision."""
    torch.manual_seed(0)
    model = ImprintMLP(10, 8)
    spec = ParamSpec.from_module(model)
    public = torch.rand(500, 1, 8, 8)
    spec.assign(model, craft_imprint(spec.flatten(model), spec, public))
    h = public.flatten(1).mean(1)
    at = torch.quantile(h, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]))  # brightness in five distinct bins
    x = 0.4 * torch.rand(5, 1, 8, 8)  # pixels stay inside [0, 1] after the shift
    x = x - x.flatten(1).mean(1)[:, None, None, None] + at[:, None, None, None]
    xs = [x[:3], x[3:]]
    ys = [torch.tensor([1, 4, 7]), torch.tensor([0, 9])]
    total = torch.zeros(spec.numel)
    for a, x, y in zip((3.0, 2.0), xs, ys):  # examples-weighted sum, as FedAvg's secure sum releases it
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        total += a * torch.cat([p.grad.flatten() for p in model.parameters()])
    rec = recover_images(total, spec, (1, 8, 8))
    s = score(rec, torch.cat(xs))
    hits = {m for p, m in zip(s["psnr"], s["match"]) if p >= EXACT_DB}
    assert len(hits) == 5  # each image alone in its bin comes back
    assert min(p for p in s["psnr"]) > 60


def test_imprint_recovers_the_cohorts_images_through_secagg(tmp_path):
    rec = _run(_cfg("secagg"), tmp_path, spy=True)[0]
    assert rec["status"] == "ok" and rec["completed"] == 4
    assert rec["imprint_status"] == "ok"
    # 4 clients x batch 2 = 8 images on 256 bins: the ones alone in their bin (all but a collision) come back exactly
    assert rec["imprint_psnr"] > 30 and rec["imprint_exact"] >= 6
    assert rec["server_crafted_model"] is True


def test_dpsgd_buries_the_trap(tmp_path):
    cfg = _cfg("secagg", client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 1.0}})
    rec = _run(cfg, tmp_path)[0]
    assert rec["status"] == "ok"
    assert rec["imprint_psnr"] < 15 and rec["imprint_exact"] == 0


def test_clients_refuse_a_model_they_cannot_recompute(tmp_path):
    rec = _run(_cfg("secagg", client={"verify_model": True}), tmp_path)[0]
    assert rec["status"].startswith("aborted") and rec["completed"] == 0
    assert rec["imprint_exact"] == 0 and rec["imprint_psnr"] is None


def test_model_check_accepts_the_honest_server(tmp_path):
    recs = _run(_cfg("plain", client={"verify_model": True}, attack=False, rounds=2), tmp_path)
    assert [r["status"] for r in recs] == ["ok", "ok"] and all(r["completed"] == 4 for r in recs)


def test_imprint_needs_its_architecture_and_the_inprocess_transport(tmp_path):
    with pytest.raises(ConfigError, match="fc-imprint"):  # refused when the run is built, before any disk
        Engine(_cfg("plain", model="cnn"), tmp_path / "cnn", progress=False)
    assert not (tmp_path / "cnn").exists()
    cfg = _cfg("plain")
    cfg.deploy.transport = "flower"
    with pytest.raises(ConfigError, match="attack.server"):
        Engine(cfg, tmp_path / "x", progress=False)


def test_new_keys_keep_old_fingerprints():
    """attack.server / client.verify_model left unset hash as configs did before they existed."""
    import hashlib
    import json

    cfg = _cfg("plain", attack=False)
    d = cfg.model_dump(mode="json")
    d["run"].pop("rounds"), d["run"].pop("out"), d.pop("deploy")
    d["attack"].pop("server"), d["client"].pop("verify_model"), d.pop("lora")
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert _cfg("plain").fingerprint() != cfg.fingerprint()


def _fake_cell(root: Path, cid: str, axes: dict, cfg: dict, rounds: list[dict]) -> None:
    import json

    d = root / "cells" / cid
    (d / "run").mkdir(parents=True)
    (d / "cell.json").write_text(json.dumps({"id": cid, "setup": ",".join(f"{k}={v}" for k, v in axes.items()),
                                             "axes": axes, "seed": 0, "config": cfg}))
    (d / "status.json").write_text(json.dumps({"status": "done"}))
    (d / "run" / "summary.json").write_text(json.dumps({"final_accuracy": 0.8, "final_loss": 0.5,
                                                        "seconds_per_round": 1.0, "peak_rss_mb": 400.0}))
    (d / "run" / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_compare_report_has_curious_and_malicious_server_columns(tmp_path):
    """The first screen: 'curious server' (observer on what the sum reveals) and 'malicious server' (crafted
    model) are separate column groups; SecAgg+ blocks the first, not the second; the model check stops it."""
    import json

    from secfed.compare.report import write_report

    rec = {"round": 1, "sampled": 4, "completed": 4, "bytes_up": 4000, "bytes_down": 8000, "seconds": 1.0}
    imp = {"attack": {"server": {"name": "imprint"}}}
    for d, ss in (("none", "plain"), ("secagg", "secagg+")):
        _fake_cell(tmp_path, f"defence={d}__attack=none__seed=0", {"defence": d, "attack": "none"},
                   {"server": {"secure_sum": ss}}, [rec])
        _fake_cell(tmp_path, f"defence={d}__attack=dlg__seed=0", {"defence": d, "attack": "dlg"},
                   {"server": {"secure_sum": ss, "observers": ["dlg"]}},
                   [{**rec, "dlg_psnr": 25.0 if d == "none" else None,
                     "dlg_status": "ok" if d == "none" else "no per-client update"}])
        _fake_cell(tmp_path, f"defence={d}__attack=imprint__seed=0", {"defence": d, "attack": "imprint"},
                   {"server": {"secure_sum": ss}, **imp},
                   [{**rec, "imprint_psnr": 120.0, "imprint_exact": 16, "imprint_status": "ok"}])
    _fake_cell(tmp_path, "defence=check__attack=none__seed=0", {"defence": "check", "attack": "none"}, {}, [rec])
    _fake_cell(tmp_path, "defence=check__attack=imprint__seed=0", {"defence": "check", "attack": "imprint"}, imp,
               [{**rec, "completed": 0, "status": "aborted: refused", "imprint_psnr": None, "imprint_exact": 0,
                 "imprint_status": "nothing to read: no sum this round (the clients refused the model or dropped)"}])
    (tmp_path / "grid.json").write_text(json.dumps({
        "name": "g", "seeds": [0], "axes": {"defence": ["none", "secagg", "check"], "attack": ["none", "dlg", "imprint"]},
        "cells": sorted(p.name for p in (tmp_path / "cells").iterdir())}))
    text = write_report(tmp_path).read_text()
    header = next(l for l in text.splitlines() if l.startswith("| setup"))
    assert "curious server · dlg: PSNR (dB)" in header and "malicious server · imprint: PSNR (dB)" in header
    assert header.index("curious server") < header.index("malicious server")
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in text.splitlines()
            if l.startswith("| none |") or l.startswith("| secagg |") or l.startswith("| check |")}
    cols = [c.strip() for c in header.split("|")[2:-1]]
    cur, mal = cols.index("curious server · dlg: PSNR (dB)"), cols.index("malicious server · imprint: PSNR (dB)")
    assert rows["none"][cur] == "25.0" and rows["none"][mal] == "120.0"
    assert rows["secagg"][cur].startswith("blocked") and rows["secagg"][mal] == "120.0"  # SecAgg+ does not stop it
    assert rows["check"][mal].startswith("stopped")
    res = {json.loads(l)["cell"]: json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines()}
    assert res["defence=secagg__attack=imprint__seed=0"]["malicious_psnr"] == 120.0
    assert res["defence=secagg__attack=imprint__seed=0"].get("psnr") is None  # not mixed with the curious figure


def test_audit_replays_a_run_with_the_malicious_server(tmp_path):
    """`secfed audit --attacks imprint`: one more round of the run's own protocol (SecAgg+), crafted by the server."""
    from secfed.compare.post_run import audit_run, validate_attacks

    cfg = _cfg("secagg", attack=False)
    Engine(cfg, tmp_path / "run", progress=False).run()
    with pytest.raises(ConfigError, match="one malicious-server attack"):
        validate_attacks(["imprint", "imprint"])
    rep = audit_run(tmp_path / "run", ["imprint"], tmp_path / "audit", progress=False)
    got = rep["results"]["replay"]
    assert got["replay_round"] == 2 and got["imprint_exact"] >= 6 and got["imprint_psnr"] > 30
    assert "imprint_psnr" in (tmp_path / "audit" / "audit.md").read_text()


@pytest.mark.slow
def test_lora_trap_reads_the_cohorts_tokens_from_the_secagg_sum(tmp_path):
    """A LoRA federation (MiniLM, pinned base): the server ships a random full-rank B; the span check on the
    SecAgg+ sum of 2 clients (batch 1, r = 128) gets back every token of both tweets (about a minute)."""
    raw = {"run": {"name": "lt", "rounds": 1}, "model": {"name": "minilm", "lora_r": 128, "lora_layers": [0]},
           "data": {"source": "tweets", "num_clients": 2, "max_examples": 400, "test_size": 100, "max_length": 32},
           "client": {"optimizer": "sgd", "lr": 0.05, "batch_size": 1, "local_steps": 1},
           "server": {"secure_sum": "secagg"}, "attack": {"server": {"name": "lora-trap"}}}
    rec = _run(parse_config(raw), tmp_path, spy=True)[0]
    assert rec["status"] == "ok" and rec["lora_trap_sequences"] == 2
    assert rec["lora_trap_token_recall"] == 1.0 and rec["lora_trap_token_precision"] == 1.0
