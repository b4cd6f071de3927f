"""Regression tests of the outside review (issue 16): secure sums, Flower, deployment.

One test (or more) per finding, named ``test_finding_NN_...``; each reproduces the
finding against the old code and pins the fix. SECURITY.md names them next to the
guarantee they protect; ``benchmarks/hardening.py`` counts the passing ones.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from defenses.secure_aggregation.quantize import OUT_OF_RANGE, Quantizer, choose_bits
from defenses.secure_aggregation.secagg import SecAggPlus
from secfed.errors import ConfigError, RoundAborted
from secfed.interfaces import ClientUpdate, DropoutPlan, RoundContext
from secfed.spec import ParamSpec

from conftest import tiny_config


def _ctx(d: int, drops: dict[str, set[int]] | None = None, round_: int = 1) -> RoundContext:
    return RoundContext(round=round_, seed=0, spec=ParamSpec(("w",), ((d,),)), global_weights=torch.zeros(d), cohort=[],
                        num_clients=0, sample_rate=None, expected_cohort=0.0, dropouts=DropoutPlan(drops or {}), state={})


def _ups(n: int, d: int = 6, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, (torch.rand(d, generator=g) - 0.5) * 0.2, 10, 1.0) for i in range(n)]


# ============================================================================ finding 11: the quantiser wraps
def test_finding_11_float32_delta_at_plus_R_never_wraps():
    """Old code: float32 * scale in float32 gave level 2^(q-1) (one above the bound); two clients at +R decoded
    to -2.0."""
    q, b = choose_bits(2, 1)
    quant = Quantizer(1.0, q, b)
    acc = np.zeros(2, dtype=f"<u{b // 8}")
    for seed in range(2):
        x = quant.encode(np.array([1.0], dtype=np.float32), 1, torch.Generator().manual_seed(seed))
        assert int(x[:1].view(np.int32 if b == 32 else np.int64)[0]) <= quant.max_level
        acc += x
    total, w = quant.decode(acc)
    assert total[0] == pytest.approx(2.0) and w == 2


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 64), signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=64, max_size=64),
       r=st.sampled_from([1.0, 0.1, 3.0, 1e-3, 1024.0]), seed=st.integers(0, 2**31))
def test_finding_11_sum_of_n_clients_at_plus_minus_R_decodes_exactly(n, signs, r, seed):
    """Property: n clients at exactly +-R (float32 inputs) decode to the exact sum, never wrapped."""
    q, b = choose_bits(n, 1)
    quant = Quantizer(r, q, b)
    acc = np.zeros(3, dtype=f"<u{b // 8}")
    want = np.zeros(2)
    for i in range(n):
        x = np.array([signs[i] * r, -signs[i] * r], dtype=np.float32)
        assert quant.check(x, 1.0, 1) is None
        acc += quant.encode(x, 1, torch.Generator().manual_seed(seed + i))
        want += x.astype(np.float64)
    total, w = quant.decode(acc)
    assert w == n
    assert np.allclose(total, want, rtol=0, atol=n / quant.scale + 1e-6 * abs(r))  # at most one grid step each


# ============================================================================ finding 5: sums of one
def test_finding_05_group_size_one_is_refused():
    with pytest.raises(ConfigError, match="group_size"):
        tiny_config(server={"group_size": 1})
    assert tiny_config(server={"group_size": 0}).server.group_size == 0  # 0 keeps meaning "no groups"


def test_finding_05_remainder_joins_another_group():
    from secfed.secure_sum import partition_groups

    for n, g in ((5, 2), (7, 3), (4, 2), (9, 4), (2, 2)):
        groups = partition_groups(n, g, torch.Generator().manual_seed(0))
        assert sorted(i for grp in groups for i in grp) == list(range(n))
        assert all(g <= len(grp) < 2 * g for grp in groups)
    assert sorted(len(x) for x in partition_groups(5, 2, torch.Generator().manual_seed(0))) == [2, 3]
    assert partition_groups(1, 2, torch.Generator().manual_seed(0)) == []


@pytest.mark.parametrize("kind", ["secagg+", "ckks"])
def test_finding_05_single_client_cohort_is_never_released(kind):
    """Old code: min_clients = 1 let CKKS decrypt (and SecAgg+ was right) a sum of one."""
    if kind == "ckks":
        pytest.importorskip("tenseal")
        from defenses.secure_aggregation.ckks import CKKSSum

        s = CKKSSum(min_clients=1)
    else:
        s = SecAggPlus(min_clients=1)
    with pytest.raises(RoundAborted):
        s.aggregate(_ups(1), _ctx(6))
    if kind == "ckks":  # the key holder itself refuses, whatever the server asks
        from defenses.secure_aggregation.ckks import KeyHolder

        with pytest.raises(RoundAborted, match="at least 2"):
            KeyHolder().decrypt_sum(b"", d=6, round_=1, n=1)


@pytest.mark.parametrize("kind", ["secagg+", "ckks"])
def test_finding_05_configured_minimum_is_enforced_inside_the_secure_sum(kind):
    if kind == "ckks":
        pytest.importorskip("tenseal")
        from defenses.secure_aggregation.ckks import CKKSSum

        s = CKKSSum(min_clients=4)
    else:
        s = SecAggPlus(min_clients=4)
    with pytest.raises(RoundAborted):
        s.aggregate(_ups(3), _ctx(6))
    assert len(s.aggregate(_ups(4), _ctx(6)).client_ids) == 4


def test_finding_05_secagg_never_unmasks_fewer_than_the_minimum_after_dropouts():
    """Three clients, two vanish after sharing keys: the survivor's input must not be unmasked alone."""
    s = SecAggPlus(min_clients=1)
    with pytest.raises(RoundAborted):
        s.aggregate(_ups(3), _ctx(6, {"masked_input": {1, 2}}))


@pytest.mark.parametrize("kind", ["secagg+", "ckks"])
def test_finding_05_group_that_loses_a_member_is_left_out(kind):
    from secfed.secure_sum import group_sums

    if kind == "ckks":
        pytest.importorskip("tenseal")
        from defenses.secure_aggregation.ckks import CKKSSum

        s, step = CKKSSum(), "encrypt"
    else:
        s, step = SecAggPlus(), "masked_input"
    ups = _ups(6)
    ctx = _ctx(6, {step: {0}})
    r = group_sums(s, ups, ctx, 3, 1)  # groups of 3; client 0's group drops below its size
    assert len(r.update_ids) == 1 and len(r.client_ids) == 3 and 0 not in r.client_ids
    assert all(c in r.dropped for c in range(6) if c not in r.client_ids)
    # 5 clients in groups of 2: 2 + 3, never a group of one
    r5 = group_sums(s, _ups(5), _ctx(6), 2, 1)
    assert len(r5.client_ids) == 5 and len(r5.update_ids) == 2


# ============================================================================ finding 8: predictable graph
def test_finding_08_graph_is_fresh_randomness_not_the_seed():
    """Two runs with the same seed and round draw different graphs (old code: identical)."""
    s = SecAggPlus()
    ids = list(range(100))
    k, _ = s.parameters(len(ids))
    assert k < 99
    g1, g2 = s.draw_graph(ids, k), s.draw_graph(ids, k)
    assert g1 != g2
    r1 = s.aggregate(_ups(40), _ctx(6))
    r2 = s.aggregate(_ups(40), _ctx(6))
    assert r1.metrics["secagg_graph_sha256"] != r2.metrics["secagg_graph_sha256"]  # the server commits to each graph


def test_finding_08_preplaced_coalition_does_not_land_next_to_the_target():
    """A coalition chosen in advance as the target's neighbours under the old seeded graph: with fresh
    randomness it holds t of the target's shares only by chance (here: never, in 20 draws at n = 200)."""
    from defenses.secure_aggregation.graph import neighbour_graph

    s = SecAggPlus()
    ids = list(range(200))
    k, t = s.parameters(len(ids))
    ctx = _ctx(6)
    seeded = neighbour_graph(ids, k, ctx.generator("secagg-graph"))  # what the old code used
    target = 0
    coalition = set(sorted(seeded[target])[:t])
    hits = sum(len(coalition & s.draw_graph(ids, k)[target]) >= t for _ in range(20))
    assert hits == 0


# ============================================================================ finding 10: CKKS error
def test_finding_10_ckks_release_hides_the_decryption_error():
    """Old code released m + e; the same sum encrypted twice decrypted to different values (e visible).
    Now the key holder rounds to a grid 2^10 above the error bound: both releases are identical and on the grid."""
    pytest.importorskip("tenseal")
    from defenses.secure_aggregation.ckks import CKKSSum

    d, ups = 500, _ups(4, 500)
    s = CKKSSum(scheme="ckks", rotate_keys=True)
    a = s.aggregate(ups, _ctx(d)).total.double()
    b = s.aggregate(ups, _ctx(d)).total.double()
    g = s.params.release_step(4)
    assert torch.equal(a, b) or float((a != b).double().mean()) < 0.01  # a boundary case at most, rarely
    assert float(((a / g) - torch.round(a / g)).abs().max()) < 1e-3
    true = sum(u.weight * u.delta.double() for u in ups)
    assert float((a - true).abs().max()) <= s.params.abs_error_bound(4) + 1e-6
    assert s.params.release_step(4) >= 2**10 * s.params.ckks_error_bound(4)


def test_finding_10_bfv_default_is_exact_and_unaffected():
    pytest.importorskip("tenseal")
    from defenses.secure_aggregation.ckks import CKKSSum

    s = CKKSSum()
    assert s.params.scheme == "bfv"
    r = s.aggregate(_ups(3, 50), _ctx(50))
    true = sum(u.weight * u.delta.double() for u in _ups(3, 50))
    assert float((r.total.double() - true).abs().max()) <= s.params.abs_error_bound(3) + 1e-7


# ============================================================================ finding 12: key files
def test_finding_12_existing_key_is_refused_and_force_replaces_it_0600(tmp_path):
    from secfed.flower.deploy import DeployError, make_certs

    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_text("old")
    os.chmod(out / "server.key", 0o644)
    with pytest.raises(DeployError, match="--force"):
        make_certs(out)
    assert (out / "server.key").read_text() == "old"
    p = make_certs(out, force=True)
    for k in ("key", "ca_key"):
        assert stat.S_IMODE(os.lstat(p[k]).st_mode) == 0o600, k
    assert p["ca_key"].parent != p["key"].parent and "OFFLINE" in p["ca_key"].parent.name
    assert stat.S_IMODE(os.stat(p["ca_key"].parent).st_mode) == 0o700


def test_finding_12_symlinked_key_is_never_written_through(tmp_path):
    from secfed.flower.deploy import DeployError, make_node_key

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    node = tmp_path / "node"
    node.mkdir()
    (node / "n0.key").symlink_to(victim)
    with pytest.raises(DeployError):
        make_node_key(node, "n0")
    assert victim.read_text() == "precious"
    priv, _ = make_node_key(node, "n0", force=True)  # replaces the link itself, atomically
    assert victim.read_text() == "precious" and not priv.is_symlink()
    assert stat.S_IMODE(os.lstat(priv).st_mode) == 0o600


def test_finding_12_cli_tells_the_operator_to_keep_the_ca_key_offline(tmp_path):
    from typer.testing import CliRunner

    from secfed.flower.cli import deploy_app

    r = CliRunner().invoke(deploy_app, ["certs", str(tmp_path / "c")])
    assert r.exit_code == 0 and "OFFLINE" in r.output
    r2 = CliRunner().invoke(deploy_app, ["certs", str(tmp_path / "c")])
    assert r2.exit_code == 2 and "--force" in r2.output


# ============================================================================ finding 13: malicious server
def test_finding_13_security_md_states_the_unmask_guarantee_as_semi_honest_only():
    """A malicious server that sends inconsistent survivor lists (u "survived" to some neighbours, "dropped"
    to others) and a minimal FORWARD set collects both kinds of share of a live client and unmasks it with
    no colluders. The protocol here is the semi-honest one (the active variant is issue #17), so every place
    that claims "the server never learns both shares" must say semi-honest and name the attack."""
    root = os.path.join(os.path.dirname(__file__), "..")
    text = open(os.path.join(root, "SECURITY.md")).read()
    assert "inconsistent survivor lists" in text and "#17" in text
    for line in text.splitlines():
        if "never learns both shares" in line:
            assert "semi-honest" in line, line
    for name in sorted(os.listdir(os.path.join(root, "docs"))):
        if not name.endswith(".md"):
            continue
        body = open(os.path.join(root, "docs", name)).read()
        for line in body.splitlines():
            if "never learns both" in line:
                assert "semi-honest" in line, (name, line)


# ============================================================================ findings 2 and 7: Flower
def _dp_cfg(pipeline, stages=("central-gaussian",), secure_sum="plain", privacy=None, **server):
    priv = None if privacy == "none" else (privacy or {"name": "dp-fedavg", "epsilon": 8.0, "delta": 1e-5})
    return tiny_config(run={"rounds": 1}, client={"weighting": "uniform", "pipeline": list(pipeline), "local_steps": 1},
                       server={"sampling": "poisson", "sample_rate": 1.0, "cohort_size": 0, "secure_sum": secure_sum,
                               "aggregator": {"name": "mean", "denominator": "expected"}, "stages": list(stages),
                               "privacy": priv, **server})


def _flower_round(cfg, out):
    """One round over Flower messages (tests/_flower_fake.NodeGrid) with the engine's own run loop; the round's record."""
    pytest.importorskip("flwr")
    from secfed.engine import read_rounds

    from _flower_fake import run_flower

    eng, grid = run_flower(cfg, out)
    return eng, grid, read_rounds(eng.out)[-1]


def _inprocess_round(cfg, out):
    from secfed.engine import Engine

    eng = Engine(cfg, out, progress=False)
    return eng, eng.run()


# Each in-process refusal of a DP client stage and its Flower twin (same ConfigError key).
REFUSALS = {
    "share-z-differs-from-guard": (dict(pipeline=[{"name": "clip", "clip_norm": 1.0},
                                                  {"name": "gaussian-share", "noise_multiplier": 0.05}],
                                        stages=(), secure_sum="secagg+", min_clients=2), "noise_multiplier"),
    "share-clip-differs-from-clients": (dict(pipeline=[{"name": "clip", "clip_norm": 1.0},
                                                       {"name": "gaussian-share", "clip_norm": 0.5}],
                                             stages=(), secure_sum="secagg+", min_clients=2), "clip_norm"),
    "share-with-plain-sum": (dict(pipeline=[{"name": "clip", "clip_norm": 1.0}, "gaussian-share"], stages=(),
                                  min_clients=2), "gaussian-share"),
    "two-clip-norms": (dict(pipeline=[{"name": "clip", "clip_norm": 1.0}, {"name": "clip", "clip_norm": 0.5}]),
                       "client.pipeline"),
    "share-without-any-noise-multiplier": (dict(pipeline=[{"name": "clip", "clip_norm": 1.0}, "gaussian-share"],
                                                stages=(), secure_sum="secagg+", min_clients=2, privacy="none"),
                                           "noise_multiplier"),
    "adaptive-clip-with-shares": (dict(pipeline=["adaptive-clip", "gaussian-share"], stages=("adaptive-clip",),
                                       secure_sum="secagg+", min_clients=2), "client.pipeline"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_finding_02_every_inprocess_refusal_has_its_flower_twin(case, tmp_path):
    kw, key = REFUSALS[case]
    with pytest.raises(ConfigError, match=key) as inproc:
        _inprocess_round(_dp_cfg(**kw), tmp_path / "a")
    with pytest.raises(ConfigError, match=key) as flower:
        _flower_round(_dp_cfg(**kw), tmp_path / "b")
    assert inproc.value.__class__ is flower.value.__class__


def test_finding_02_node_refuses_noise_that_differs_from_the_guard():
    """Old code: the codec dropped the guard's z, so a node with gaussian-share noise_multiplier = 0.05 added
    1/43 of the noise the ledger charged. Now the node gets z in the message and refuses the mismatch."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord, RecordDict

    from secfed.flower import codec
    from secfed.flower.client import node_train
    from secfed.flower.runtime import ClientRuntime
    from secfed.task import Task

    cfg = _dp_cfg([{"name": "clip", "clip_norm": 1.0}, {"name": "gaussian-share", "noise_multiplier": 0.05}],
                  stages=(), secure_sum="secagg+", min_clients=2)
    rt = ClientRuntime(cfg, Task(cfg))
    base = {"v": 1, "round": 1, "client": 0, "fingerprint": cfg.fingerprint(), "cohort": codec.encode_ids([0, 1]),
            "weights": codec.encode_weights(1, rt.global_w), "state": "{}"}
    dp = {"noise_multiplier": 2.15, "clip_norm": 1.0, "share_divisor": 2, "distributed": True}
    out = node_train(rt, RecordDict(), ConfigRecord({**base, "dp": codec.encode_dp(dp)}), 0)
    assert "refused" in out and "differs from the privacy guard" in out["refused"]
    out = node_train(rt, RecordDict(), ConfigRecord(base), 0)  # no guard parameters at all
    assert "refused" in out and "guard" in out["refused"]


def test_finding_02_node_applies_the_guards_noise_and_clip():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from secfed.flower import codec
    from secfed.flower.runtime import ClientRuntime
    from secfed.task import Task

    cfg = _dp_cfg([{"name": "clip", "clip_norm": 1.0}, "gaussian-share"], stages=(), secure_sum="secagg+", min_clients=2)
    rt = ClientRuntime(cfg, Task(cfg))
    base = {"v": 1, "round": 1, "client": 0, "fingerprint": cfg.fingerprint(), "cohort": codec.encode_ids([0, 1]),
            "weights": codec.encode_weights(1, rt.global_w), "state": "{}"}
    dp = {"noise_multiplier": 2.0, "clip_norm": 1.0, "share_divisor": 2, "distributed": True}
    _, ctx = rt.update(ConfigRecord({**base, "dp": codec.encode_dp(dp)}), 0)
    assert ctx.metrics["dp_share_std"] == pytest.approx(2.0 * 1.0 / 2**0.5)
    with pytest.raises(ConfigError, match="clip_norm"):
        rt.update(ConfigRecord({**base, "dp": codec.encode_dp({**dp, "clip_norm": 0.5})}), 0)


def test_finding_02_central_gaussian_over_flower_needs_no_explicit_clip_norm(tmp_path):
    """Old code: the server's central-gaussian stage found no clip norm (the clip ran on the nodes) and the
    Flower run stopped with a config error. Now it runs, with the noise the ledger charges."""
    cfg = _dp_cfg([{"name": "clip", "clip_norm": 1.0}])
    eng, grid, rec = _flower_round(cfg, tmp_path)
    assert rec["dp_clip_norm"] == 1.0 and rec["dp_noise_std"] == pytest.approx(eng.privacy.z * 1.0 / 4)


@pytest.mark.parametrize("secure_sum", ["secagg+", "plain"])
def test_finding_07_flower_replies_carry_no_per_client_metrics_under_secure_sum_or_dp(secure_sum, tmp_path):
    """Old code: every reply carried train_loss, the pre-clip update_norm, steps and examples_seen."""
    if secure_sum == "secagg+":
        cfg = tiny_config(run={"rounds": 1}, server={"secure_sum": "secagg+"})
    else:
        cfg = _dp_cfg([{"name": "clip", "clip_norm": 1.0}])
    _, grid, _ = _flower_round(cfg, tmp_path / "a")
    assert grid.train_replies and all(json.loads(r["metrics"]) == {} for r in grid.train_replies)
    plain = tiny_config(run={"rounds": 1})  # no secure sum, no DP: metrics stay (nothing is promised)
    _, grid2, _ = _flower_round(plain, tmp_path / "b")
    assert any("train_loss" in json.loads(r["metrics"]) for r in grid2.train_replies)


def test_finding_07_out_of_range_node_sends_one_bit():
    """Old code: the SecAgg+ reason said 'max |delta| = 3.2 exceeds ...'."""
    pytest.importorskip("flwr")
    sa = SecAggPlus(clip_range=0.5)

    def reason(x: torch.Tensor, w: float = 1.0) -> str:  # what the client session reports to the server
        return sa.client_session(0, 1, 0, x, w).reason

    small, huge, nan = reason(torch.full((4,), 0.75)), reason(torch.full((4,), 1e6)), reason(torch.full((4,), float("nan")))
    assert small == huge == nan == reason(torch.full((4,), 0.25), 2.5) == OUT_OF_RANGE
    assert not any(ch.isdigit() for ch in OUT_OF_RANGE)
    assert reason(torch.full((4,), 0.25)) == ""


def test_finding_02_dpsgd_node_takes_the_guards_z_not_its_own_shard_calibration():
    """A node holds one shard; calibrating DP-SGD's z there would differ from the guard's worst case over all
    shards. The node takes the guard's z from the message, and refuses a trainer z that differs."""
    pytest.importorskip("flwr")
    from secfed.flower.runtime import ClientRuntime
    from secfed.task import Task

    cfg = tiny_config(client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                      server={"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5, "batch_size": 16,
                                          "local_steps": 3}})
    rt = ClientRuntime(cfg, Task(cfg))
    ctx = rt.context(1, [0, 1])
    rt.apply_dp({"dpsgd_noise_multiplier": 1.7, "max_grad_norm": 1.0}, ctx)
    assert rt.trainer.resolved_noise_multiplier(rt.task) == 1.7
    with pytest.raises(ConfigError, match="max_grad_norm"):
        rt.apply_dp({"dpsgd_noise_multiplier": 1.7, "max_grad_norm": 2.0}, ctx)
    with pytest.raises(ConfigError, match="guard"):
        rt.apply_dp({}, ctx)
    fixed = tiny_config(client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0, "noise_multiplier": 0.05}})
    rt2 = ClientRuntime(fixed, Task(fixed))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        rt2.apply_dp({"dpsgd_noise_multiplier": 1.7, "max_grad_norm": 1.0}, rt2.context(1, [0, 1]))


def test_finding_13_a_client_answers_the_unmask_step_once():
    """The cheapest form of the malicious-server attack: ask the same client twice, once with v alive and once
    with v dropped, and collect both of its shares of v. An honest client answers SURVIVORS once per round."""
    from defenses.secure_aggregation import messages as msg
    from defenses.secure_aggregation.protocol import SecAggClient
    from secfed.errors import MalformedMessage

    c = SecAggClient(1, 1)
    c.setup = msg.Setup(2, 16, 32, 1.0, 4, [0, 2])
    c.held = {0: (11, 12), 2: (21, 22)}
    c.own_share = (5, 6)
    c.unmasking(msg.encode_survivors(1, [0, 1, 2], []))
    with pytest.raises(MalformedMessage, match="already answered"):
        c.unmasking(msg.encode_survivors(1, [1, 2], [0]))
