"""SecAgg+ inside the engine: same aggregate as plain up to quantisation, group sums, dropouts."""

from __future__ import annotations

import torch

from secfed.engine import Engine, read_rounds
from secfed.needs import Need

from conftest import tiny_config


def _run(tmp_path, name, **server):
    eng = Engine(tiny_config(run={"rounds": 1}, server=server), tmp_path / name, progress=False)
    eng.run()
    return eng


def test_secagg_matches_plain_up_to_quantisation(tmp_path):
    plain = _run(tmp_path, "plain")
    sec = _run(tmp_path, "secagg", secure_sum="secagg+")
    assert not torch.equal(plain.global_w, sec.global_w)  # it really went through the quantiser
    assert torch.allclose(plain.global_w, sec.global_w, atol=1e-6)
    rec = read_rounds(tmp_path / "secagg")[0]
    assert rec["status"] == "ok" and rec["completed"] == 4 and rec["secagg_ring_bits"] in (32, 64)
    assert rec["bytes_up"] > 4 * 4 * plain.spec.numel  # masked words + key material


def test_secagg_group_sums_with_median_and_mean(tmp_path):
    plain = _run(tmp_path, "plain")
    mean = _run(tmp_path, "gmean", secure_sum="secagg+", group_size=2)
    assert torch.allclose(plain.global_w, mean.global_w, atol=1e-6)
    med = _run(tmp_path, "gmedian", secure_sum={"name": "secagg+", "clip_range": 2.0}, group_size=2, aggregator="median")
    assert read_rounds(tmp_path / "gmedian")[0]["status"] == "ok"
    assert torch.isfinite(med.global_w).all() and not torch.equal(med.global_w, plain.global_w)


class _Recorder:
    """An observer that keeps the ServerView it was given (declares what it reads: secfed.needs)."""

    needs = Need.ROWS | Need.SUM

    def __init__(self, seen: dict) -> None:
        self.seen = seen

    def __call__(self, view, ctx):
        self.seen.update(view=view)
        return {}


def test_secagg_dropout_in_engine_and_observer_view(tmp_path):
    cfg = tiny_config(run={"rounds": 1}, faults={"dropouts": {"masked_input": [1]}})
    cfg.server.secure_sum.name = "secagg+"
    seen = {}
    eng = Engine(cfg, tmp_path / "drop", progress=False)
    eng.observers.append(_Recorder(seen))
    eng.run()
    rec = read_rounds(tmp_path / "drop")[0]
    assert rec["status"] == "ok" and rec["completed"] == 3 and rec["dropped"] == 1
    view = seen["view"]
    assert view.updates is None and {m.step for m in view.transcript} == {"advertise", "share", "masked_input",
                                                                           "consistency", "unmask"}  # active: the default
