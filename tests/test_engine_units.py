"""Partitioning, sampling, server optimizers, the plain wire format, the ledger."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from secfed.aggregation import Mean, ServerOptimizer
from secfed.data import partition
from secfed.engine import Engine
from secfed.errors import CheckpointError, MalformedMessage
from secfed.ledger import PrivacyLedger
from secfed.wire import decode_update, encode_update

from conftest import tiny_config


# ------------------------------------------------------------------ partitioning
def test_iid_partition_is_a_disjoint_cover():
    labels = torch.arange(103) % 3
    parts = partition(labels, 10, "iid", 0.5, seed=1)
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == list(range(103))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_small_alpha_skews_labels():
    labels = torch.arange(3000) % 10
    skewed = partition(labels, 10, "dirichlet", 0.05, seed=0)
    mild = partition(labels, 10, "dirichlet", 100.0, seed=0)

    def mean_classes(parts):
        return np.mean([len(np.unique(labels.numpy()[p])) for p in parts])

    assert mean_classes(skewed) < 5 < mean_classes(mild)
    assert sorted(np.concatenate(skewed).tolist()) == list(range(3000))


def test_quantity_skew_varies_sizes_keeps_min():
    labels = torch.zeros(1000, dtype=torch.long)
    parts = partition(labels, 20, "quantity", 0.3, seed=0, min_examples=5)
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 5 and max(sizes) > 3 * np.median(sizes) / 2
    assert sum(sizes) == 1000


# ------------------------------------------------------------------ sampling
def test_poisson_sampling_rate_and_determinism():
    cfg = tiny_config(data={"num_clients": 200}, server={"sampling": "poisson", "sample_rate": 0.1})
    e = Engine.__new__(Engine)
    e.cfg = cfg
    sizes = [len(e.sample_cohort(t)) for t in range(1, 201)]
    assert abs(np.mean(sizes) - 20) < 1.5
    assert e.sample_cohort(7) == e.sample_cohort(7)
    assert len(set(map(len, (e.sample_cohort(t) for t in range(1, 30))))) > 3  # Poisson: variable size


def test_fixed_cohort_size():
    e = Engine.__new__(Engine)
    e.cfg = tiny_config(data={"num_clients": 50}, server={"sampling": "cohort", "cohort_size": 7})
    for t in range(1, 10):
        c = e.sample_cohort(t)
        assert len(c) == 7 == len(set(c))


# ------------------------------------------------------------------ aggregation and optimizers
def test_weighted_mean_golden():
    X = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert torch.allclose(Mean()(X, torch.tensor([1.0, 3.0])), torch.tensor([2.5, 5.0]))
    assert torch.allclose(Mean("expected").from_sum(torch.tensor([4.0]), 2.0, 8.0), torch.tensor([0.5]))


def test_server_optimizers_golden():
    w, d = torch.zeros(2), torch.tensor([1.0, -2.0])
    assert torch.equal(ServerOptimizer("fedavg", 0.5).step(w, d), torch.tensor([0.5, -1.0]))
    m = ServerOptimizer("fedavgm", 1.0, momentum=0.5)
    w1 = m.step(w, d)
    w2 = m.step(w1, d)  # m = 0.5*d + d = 1.5 d
    assert torch.allclose(w2, w1 + 1.5 * d)
    a = ServerOptimizer("fedadam", 0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w1 = a.step(w, d)  # m = 0.1 d, v = 0.01 d^2 -> step = 0.1 * 0.1 d / (0.1 |d| + tau)
    expect = 0.1 * 0.1 * d / (0.1 * d.abs() + 1e-3)
    assert torch.allclose(w1, expect)


def test_fedavgm_and_fedadam_runs(tmp_path):
    for opt in ("fedavgm", "fedadam"):
        s = Engine(tiny_config(server={"optimizer": opt, "lr": 0.1}), tmp_path / opt, progress=False).run()
        assert s["rounds_completed"] == 2


# ------------------------------------------------------------------ wire format
def test_wire_roundtrip():
    v = torch.randn(17)
    dec = decode_update(encode_update(3, 5, 40, 40.0, v), expected_dim=17, round_=3, sender=5)
    assert torch.equal(dec.delta, v) and dec.num_examples == 40 and dec.weight == 40.0


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b[:-1], "length"),
    (lambda b: b + b"\0\0\0\0", "length"),
    (lambda b: b"XXX" + b[3:], "magic"),
    (lambda b: b[:3] + b"\x02" + b[4:], "version"),
])
def test_wire_rejects(mutate, msg):
    buf = encode_update(1, 2, 3, 3.0, torch.ones(8))
    with pytest.raises(MalformedMessage, match=msg):
        decode_update(mutate(buf), expected_dim=8, round_=1, sender=2)


def test_wire_rejects_replay_redirect_nan_and_huge():
    buf = encode_update(1, 2, 3, 3.0, torch.ones(8))
    with pytest.raises(MalformedMessage, match="round"):
        decode_update(buf, expected_dim=8, round_=2, sender=2)
    with pytest.raises(MalformedMessage, match="claims client"):
        decode_update(buf, expected_dim=8, round_=1, sender=3)
    with pytest.raises(MalformedMessage, match="non-finite"):
        decode_update(encode_update(1, 2, 3, 3.0, torch.tensor([1.0, math.nan])), expected_dim=2, round_=1, sender=2)
    with pytest.raises(MalformedMessage, match="norm"):
        decode_update(encode_update(1, 2, 3, 3.0, torch.full((4,), 1e6)), expected_dim=4, round_=1, sender=2, max_norm=1e3)


def test_wire_huge_length_field_does_not_allocate():
    import struct

    from secfed.wire import _HEADER

    buf = _HEADER.pack(b"SFU", 1, 1, 2, 3, 1.0, 2_500_000_000 % (1 << 32))
    with pytest.raises(MalformedMessage, match="dimension"):
        decode_update(buf, expected_dim=8, round_=1, sender=2)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_wire_fuzz_only_documented_error(data):
    try:
        decode_update(data, expected_dim=4, round_=1, sender=2)
    except MalformedMessage:
        pass


# ------------------------------------------------------------------ ledger
def test_ledger_append_replay_and_tamper(tmp_path):
    p = tmp_path / "ledger.jsonl"
    led = PrivacyLedger(p)
    for r in range(3):
        led.append({"round": r + 1, "epsilon": 0.1 * (r + 1)})
    assert [e["round"] for e in PrivacyLedger(p).entries] == [1, 2, 3]
    # torn final write: ignored and cut
    with p.open("ab") as f:
        f.write(b'{"round": 4, "eps')
    again = PrivacyLedger(p)
    assert len(again.entries) == 3
    again.append({"round": 4})
    assert len(PrivacyLedger(p).entries) == 4
    # an edit breaks the chain
    lines = p.read_text().splitlines()
    lines[1] = lines[1].replace('"round":2', '"round":9')
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CheckpointError, match="hash chain"):
        PrivacyLedger(p)


def test_ledger_write_failure_is_reported(tmp_path, monkeypatch):
    import os

    from secfed.ledger import LedgerWriteError

    led = PrivacyLedger(tmp_path / "l.jsonl")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LedgerWriteError, match="not released"):
        led.append({"round": 1})
    monkeypatch.undo()
    assert PrivacyLedger(tmp_path / "l.jsonl").entries == []


def test_group_mode_and_min_clients_abort(tmp_path):
    from secfed.engine import read_rounds

    cfg = tiny_config(faults={"dropouts": {"train": [0, 1, 2]}}, server={"min_clients": 2})
    Engine(cfg, tmp_path / "a", progress=False).run()
    recs = read_rounds(tmp_path / "a")
    assert all(r["status"].startswith("aborted") for r in recs)
    cfg = tiny_config(server={"group_size": 2})
    Engine(cfg, tmp_path / "g", progress=False).run()
    assert all(r["status"] == "ok" for r in read_rounds(tmp_path / "g"))


def test_malformed_client_is_dropped_round_goes_on(tmp_path):
    from secfed.engine import read_rounds

    e = Engine(tiny_config(), tmp_path / "m", progress=False)
    from secfed.rounds import tampering_transport

    e.secure_sum.transport_factory = tampering_transport(lambda cid, p: p[:-3] if cid == 1 else p)
    e.run()
    for r in read_rounds(tmp_path / "m"):
        assert r["status"] == "ok" and r["completed"] == 3 and r["rejected"] == 1


def test_kept_optimizer_state_carries_adam_across_rounds_and_resumes(tmp_path):
    """client.optimizer_state = "keep": a client's Adam moments and step count go on from its last round (the
    second round's step is not a fresh Adam's), the state is checkpointed, and "round" keeps nothing."""
    import torch

    from secfed.engine import Engine
    from secfed.task import Task
    from secfed.training import SGDTrainer

    from conftest import tiny_config

    task = Task(tiny_config())
    model = task.build_model()
    data = task.client_data(0)
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = [p.detach().clone() for p in params]

    def two_rounds(mode):
        for p, w in zip(params, w0):
            p.data.copy_(w)
        tr = SGDTrainer(local_steps=3, batch_size=8, lr=1e-2, optimizer="adam", optimizer_state=mode)
        tr.train(model, task, data, torch.Generator().manual_seed(0), client_id=0)
        for p, w in zip(params, w0):
            p.data.copy_(w)  # the server's next model: here the same start, so only the optimizer state differs
        tr.train(model, task, data, torch.Generator().manual_seed(0), client_id=0)
        return tr, [p.detach().clone() for p in params]

    kept, w_keep = two_rounds("keep")
    fresh, w_round = two_rounds("round")
    assert fresh.state_dict() == {}
    steps = {k: v for k, v in kept.state_dict().items() if k.endswith(".step")}
    assert steps and all(float(v) == 6.0 for v in steps.values())  # 3 steps in each of the two rounds
    assert any(not torch.equal(a, b) for a, b in zip(w_keep, w_round))
    again = SGDTrainer(local_steps=3, batch_size=8, lr=1e-2, optimizer="adam", optimizer_state="keep")
    again.load_state_dict(kept.state_dict())
    assert again.state_dict().keys() == kept.state_dict().keys()
    assert all(torch.equal(again.state_dict()[k], v) for k, v in kept.state_dict().items())

    cfg = tiny_config(run={"rounds": 2}, client={"optimizer_state": "keep", "local_steps": 2})
    eng = Engine(cfg, tmp_path / "r", progress=False)
    eng.run()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r" / "checkpoint" / "tensors.safetensors"))
    kept_keys = [k for k in saved if k.startswith("trainer.o")]
    assert {k.split(".")[1] for k in kept_keys} == {f"o{c}" for c in range(cfg.data.num_clients)}
