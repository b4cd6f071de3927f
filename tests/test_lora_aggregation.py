"""LoRA-aware aggregation (issue 18 part 1, secfed.lora): fedit, ffa, stack, heterogeneous ranks, refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from secfed.errors import ConfigError
from secfed.lora import (LORA_A, FedIT, Stack, fedit_mean, product_mean, rel_error, stack_factors, svd_factors,
                         zero_pad)

from conftest import digits_config, tiny_config

T = torch.tensor


def close(x: torch.Tensor, y: list) -> bool:
    return torch.allclose(x.double(), T(y, dtype=torch.float64), atol=1e-12)


# ============================================================================ hand-built examples
# Two clients, rank 1, 2x2 updates (B: 2x1, A: 1x2), equal weights:
#   client 1: A1 = [1 0], B1 = [1 0]^T  ->  B1 A1 = [[1, 0], [0, 0]]
#   client 2: A2 = [0 1], B2 = [0 1]^T  ->  B2 A2 = [[0, 0], [0, 1]]
#   mean of products = [[.5, 0], [0, .5]]
A1, B1 = T([[1.0, 0.0]]), T([[1.0], [0.0]])
A2, B2 = T([[0.0, 1.0]]), T([[0.0], [1.0]])


def test_fedit_averages_the_factors_and_misses_the_mean_of_products_by_hand():
    A, B = fedit_mean([A1, A2], [B1, B2])
    assert close(A, [[0.5, 0.5]]) and close(B, [[0.5], [0.5]])
    # B A = [[.25, .25], [.25, .25]]; minus the mean of products = [[-.25, .25], [.25, -.25]]
    # ||.||_F = sqrt(4 * 1/16) = 1/2; ||mean of products||_F = sqrt(1/4 + 1/4) = 1/sqrt(2); error = 1/sqrt(2)
    assert close(B @ A, [[0.25, 0.25], [0.25, 0.25]])
    assert close(product_mean([A1, A2], [B1, B2]), [[0.5, 0.0], [0.0, 0.5]])
    assert rel_error([(B @ A, product_mean([A1, A2], [B1, B2]))]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_ffa_with_a_shared_frozen_a_is_exact_by_hand():
    # A = [1 1] on both clients; B1 = [1 0]^T, B2 = [0 2]^T -> mean B = [.5 1]^T
    # mean(B) A = [[.5, .5], [1, 1]] = mean(B1 A, B2 A) = mean([[1,1],[0,0]], [[0,0],[2,2]])
    A = T([[1.0, 1.0]])
    Bs = [T([[1.0], [0.0]]), T([[0.0], [2.0]])]
    _, B = fedit_mean([A, A], Bs)
    A = A.double()
    assert close(B @ A, [[0.5, 0.5], [1.0, 1.0]])
    assert rel_error([(B @ A, product_mean([A, A], Bs))]) == 0.0


def test_stack_equals_the_weighted_mean_of_products_by_hand():
    # weights 1 and 3: A = [[1, 0], [0, 1]], B = [[1*1, 0], [0, 3*1]] / 4 = [[.25, 0], [0, .75]]
    # B A = [[.25, 0], [0, .75]] = (1 * B1 A1 + 3 * B2 A2) / 4
    A, B = stack_factors([A1, A2], [B1, B2], T([1.0, 3.0]))
    assert close(A, [[1.0, 0.0], [0.0, 1.0]]) and close(B, [[0.25, 0.0], [0.0, 0.75]])
    assert close(B @ A, [[0.25, 0.0], [0.0, 0.75]])
    assert torch.equal(B @ A, product_mean([A1, A2], [B1, B2], T([1.0, 3.0])))


def test_stack_with_different_ranks_stacks_to_the_sum_of_ranks():
    # client 1 rank 1 (A1, B1 above), client 2 rank 2: A = I, B = [[2, 0], [0, 2]] -> B2 A2 = 2 I
    # stacked rank 3; B A = (B1 A1 + 2 I) / 2 = [[1.5, 0], [0, 1]]
    A, B = stack_factors([A1, torch.eye(2)], [B1, 2 * torch.eye(2)])
    assert A.shape == (3, 2) and B.shape == (2, 3)
    assert close(B @ A, [[1.5, 0.0], [0.0, 1.0]])


def test_zero_padding_keeps_the_product_and_pads_by_hand():
    # A = [1 2], B = [3 4]^T -> rank 2: A = [[1, 2], [0, 0]], B = [[3, 0], [4, 0]]; B A = [[3, 6], [4, 8]] both ways
    A, B = zero_pad(T([[1.0, 2.0]]), T([[3.0], [4.0]]), 2)
    assert close(A, [[1.0, 2.0], [0.0, 0.0]]) and close(B, [[3.0, 0.0], [4.0, 0.0]])
    assert close(B @ A, [[3.0, 6.0], [4.0, 8.0]])


def test_hetlora_padding_then_fedit_by_hand():
    # client 1 rank 1 padded: A1' = [[1, 0], [0, 0]], B1' = [[1, 0], [0, 0]]; client 2 rank 2: A2 = B2 = I
    # mean A = mean B = [[1, 0], [0, .5]] -> B A = [[1, 0], [0, .25]]; mean of products = [[1, 0], [0, .5]]
    # error = ||[[0, 0], [0, -.25]]|| / ||[[1, 0], [0, .5]]|| = .25 / sqrt(1.25)
    Ap, Bp = zero_pad(A1, B1, 2)
    A, B = fedit_mean([Ap, torch.eye(2)], [Bp, torch.eye(2)])
    assert close(B @ A, [[1.0, 0.0], [0.0, 0.25]])
    target = product_mean([A1, torch.eye(2)], [B1, torch.eye(2)])
    assert close(target, [[1.0, 0.0], [0.0, 0.5]])
    assert rel_error([(B @ A, target)]) == pytest.approx(0.25 / math.sqrt(1.25), abs=1e-12)


def test_flexlora_svd_redistribution_by_hand():
    # P = [[3, 0], [0, 1]]: singular values 3, 1. Rank 1: B A = [[3, 0], [0, 0]] (the top component), with
    # B = U_1 sqrt(3), A = sqrt(3) V_1^T, so |A| = |B^T| = [sqrt(3), 0]; rank 2 gives P back exactly.
    P = T([[3.0, 0.0], [0.0, 1.0]])
    A, B = svd_factors(P, 1)
    assert close(B @ A, [[3.0, 0.0], [0.0, 0.0]])
    assert close(A.abs(), [[math.sqrt(3), 0.0]]) and close(B.abs(), [[math.sqrt(3)], [0.0]])
    A2, B2 = svd_factors(P, 2)
    assert close(B2 @ A2, [[3.0, 0.0], [0.0, 1.0]])
    # a client of rank 1 takes the first component of the rank-2 redistribution: the best rank-1 part
    assert close(B2[:, :1] @ A2[:1], [[3.0, 0.0], [0.0, 0.0]])
    # rank above the matrix's: zero-padded
    A3, B3 = svd_factors(P, 3)
    assert A3.shape == (3, 2) and close(B3 @ A3, [[3.0, 0.0], [0.0, 1.0]])


# ============================================================================ engine
def _engine(tmp_path, name="run", **sections):
    from secfed.engine import Engine

    return Engine(tiny_config(**sections), tmp_path / name, progress=False)


def _records(tmp_path, name="run"):
    return [json.loads(l) for l in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["fedit", "ffa", "stack"])
def test_each_method_runs_end_to_end_on_the_tiny_encoder_and_records_its_error(tmp_path, method):
    s = _engine(tmp_path, lora={"aggregation": method}).run()
    assert s["rounds_aggregated"] == 2 and s["final_accuracy"] is not None
    errs = [r["lora_agg_rel_error"] for r in _records(tmp_path)]
    if method == "fedit":
        assert all(e > 1e-3 for e in errs)  # separate averages are not the mean of products
    else:
        assert all(e < 1e-5 for e in errs)  # ffa: float32 rounding only; stack: exact in float64


def test_ffa_leaves_a_unchanged_and_sends_fewer_numbers(tmp_path):
    fedit = _engine(tmp_path, "fedit")
    ffa = _engine(tmp_path, "ffa", lora={"aggregation": "ffa"})
    a_names = [n for n, _ in ffa.model.named_parameters() if LORA_A in n]
    a_numel = sum(p.numel() for n, p in ffa.model.named_parameters() if LORA_A in n)
    assert a_names and not any(LORA_A in n for n in ffa.spec.names)
    assert ffa.spec.numel == fedit.spec.numel - a_numel  # the update (codec, clip, DP noise) loses every A
    A0 = {n: p.detach().clone() for n, p in ffa.model.named_parameters() if LORA_A in n}
    ffa.run()
    fedit.run()
    assert all(torch.equal(A0[n], p) for n, p in ffa.model.named_parameters() if LORA_A in n)
    # the frozen A is the seeded initialisation every client rebuilds: the same as fedit's initial A
    fresh = _engine(tmp_path, "fresh").model
    assert all(torch.equal(A0[n], p) for n, p in fresh.named_parameters() if LORA_A in n)
    up = lambda name: _records(tmp_path, name)[0]["bytes_up"]
    assert up("ffa") < up("fedit")


def test_stack_merges_exactly_the_mean_of_products_into_the_base(tmp_path):
    eng = _engine(tmp_path, lora={"aggregation": "stack"})
    lora: Stack = eng.lora
    g = torch.Generator().manual_seed(0)
    X = 0.1 * torch.randn(2, eng.spec.numel, generator=g)
    w = T([1.0, 3.0])
    m = lora.layout.modules[0]
    base = eng.model.get_submodule(m.path).base_layer.weight.detach().clone()
    agg = lora.aggregate_rows(X, w, eng.global_w, eng.model)
    lora.commit(eng.model, eng.state)
    At, Bt = lora.layout.factors(m, eng.global_w, eng.model)
    assert not Bt.any()  # the adapter starts every round from (A_0, 0)
    As = [At + X[i, m.a_slice].reshape(m.a_shape) for i in range(2)]
    Bs = [X[i, m.b_slice].reshape(m.b_shape) for i in range(2)]
    expect = m.scale * (Bs[0].double() @ As[0].double() + 3 * Bs[1].double() @ As[1].double()) / 4
    got = eng.model.get_submodule(m.path).base_layer.weight.detach().double() - base.double()
    assert torch.allclose(got, expect, atol=1e-6)
    # the factors go back to (A_0, 0); the head is the weighted mean
    new = eng.global_w + agg
    assert torch.equal(new[m.b_slice], torch.zeros(m.b_slice.stop - m.b_slice.start))
    assert torch.allclose(new[m.a_slice], lora.initial_a[m.a_name].reshape(-1))
    head = ~lora.layout.lora_mask
    assert torch.allclose(agg[head], (X[0, head] + 3 * X[1, head]) / 4)


def test_stack_resumes_with_the_merged_base(tmp_path):
    from secfed.engine import Engine

    cfg = tiny_config(lora={"aggregation": "stack"}, run={"rounds": 2})
    full = Engine(cfg, tmp_path / "a", progress=False).run()
    Engine(tiny_config(lora={"aggregation": "stack"}, run={"rounds": 1}), tmp_path / "b", progress=False).run()
    resumed = Engine(cfg, tmp_path / "b", progress=False, resume=True).run()
    assert resumed["final_accuracy"] == full["final_accuracy"] and resumed["final_loss"] == full["final_loss"]


def test_stack_export_folds_the_merged_updates_back_into_the_adapter_on_the_original_base(tmp_path):
    eng = _engine(tmp_path, lora={"aggregation": "stack"})
    s = eng.run()
    assert 0 <= s["lora_stack_export_rel_error"] < 1
    fresh = _engine(tmp_path, "fresh").model
    for m in eng.lora.layout.modules:  # the base is the original again; the adapter carries the updates
        w = eng.model.get_submodule(m.path).base_layer.weight
        assert torch.allclose(w, fresh.get_submodule(m.path).base_layer.weight, atol=1e-6)
        assert eng.model.get_parameter(m.b_name).abs().sum() > 0
    assert "lora_stack_export_rel_error" not in _engine(tmp_path, "ffa", lora={"aggregation": "ffa"}).run()


def test_heterogeneous_ranks_train_only_the_first_r_i_components(tmp_path):
    eng = _engine(tmp_path, lora={"client_ranks": [2, 4]})
    ctx = eng.context(1, [0, 1])
    u0 = eng.local_update(0, ctx)  # rank 2
    u1 = eng.local_update(1, ctx)  # rank 4 = model.lora_r
    for m in eng.lora.layout.modules:
        A0, B0 = eng.lora.layout.factors(m, eng.global_w + u0.delta, eng.model)
        assert not A0[2:].any() and not B0[:, 2:].any() and A0[:2].any()  # zero-padded rank-2 factors
        A1_, B1_ = eng.lora.layout.factors(m, eng.global_w + u1.delta, eng.model)
        assert A1_[2:].any() and B1_[:, 2:].any()


def test_ffa_heterogeneous_ranks_restore_the_shared_frozen_a(tmp_path):
    eng = _engine(tmp_path, lora={"aggregation": "ffa", "client_ranks": [1]})
    A0 = {n: p.detach().clone() for n, p in eng.model.named_parameters() if LORA_A in n}
    u = eng.local_update(0, eng.context(1, [0]))
    assert all(torch.equal(A0[n], p) for n, p in eng.model.named_parameters() if LORA_A in n)
    for m in eng.lora.layout.modules:
        _, B = eng.lora.layout.factors(m, eng.global_w + u.delta, eng.model)
        assert not B[:, 1:].any() and B[:, :1].any()


def test_flexlora_svd_with_heterogeneous_ranks_runs_and_keeps_rank_r(tmp_path):
    s = _engine(tmp_path, lora={"client_ranks": [2, 4], "hetero": "svd"}).run()
    assert s["rounds_aggregated"] == 2
    errs = [r["lora_agg_rel_error"] for r in _records(tmp_path)]
    assert all(0 <= e < 1 for e in errs)


def test_the_error_is_hidden_under_a_secure_sum(tmp_path):
    _engine(tmp_path, lora={"aggregation": "ffa"}, server={"secure_sum": "secagg+", "cohort_size": 4}).run()
    r = _records(tmp_path)[0]
    assert "lora_agg_rel_error" not in r and "lora_agg_error_hidden" in r


def test_ffa_with_heterogeneous_ranks_under_secagg_is_the_same_run_over_flower(tmp_path):
    """The node code (secfed.flower.client via the parity grid) builds the same frozen A and the same rank view."""
    pytest.importorskip("flwr")
    from secfed.engine import Engine
    from _flower_fake import run_flower
    from test_parity_matrix import _weights

    cfg = tiny_config(lora={"aggregation": "ffa", "client_ranks": [2, 4]}, server={"secure_sum": "secagg+"})
    Engine(cfg, tmp_path / "a", progress=False).run()
    run_flower(cfg, tmp_path / "b")
    assert _weights(tmp_path / "a").numel() == 611 and torch.equal(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


# ============================================================================ refusals
@pytest.mark.parametrize("sections, key", [
    ({"lora": {"aggregation": "stack"}, "server": {"secure_sum": "secagg+"}}, "server.secure_sum"),
    ({"lora": {"aggregation": "stack"}, "server": {"secure_sum": "ckks"}}, "server.secure_sum"),
    ({"lora": {"hetero": "svd"}, "server": {"secure_sum": "secagg+"}}, "server.secure_sum"),
    ({"lora": {"aggregation": "stack"}, "server": {"aggregator": "median"}}, "server.aggregator"),
    ({"lora": {"aggregation": "stack"}, "server": {"optimizer": "fedadam"}}, "server.optimizer"),
    ({"lora": {"aggregation": "stack"}, "privacy": {"preset": "user-level", "epsilon": 8.0}}, "server.privacy"),
    ({"lora": {"aggregation": "ffa", "hetero": "svd"}}, "lora.hetero"),
    ({"lora": {"aggregation": "stack"}, "deploy": {"transport": "flower-ray"}}, "deploy.transport"),
])
def test_impossible_combinations_are_refused_in_one_line(tmp_path, sections, key):
    sections.setdefault("data", {}).update({"num_clients": 20})
    with pytest.raises(ConfigError) as e:
        _engine(tmp_path, **sections)
    msg = str(e.value)
    assert f"config key '{key}'" in msg and "\n" not in msg


@pytest.mark.parametrize("sections", [
    {"lora": {"aggregation": "ffa"}, "server": {"secure_sum": "secagg+"}},
    {"lora": {"aggregation": "ffa"}, "server": {"aggregator": "median"}},
    {"lora": {"aggregation": "stack"}, "client": {"trainer": "dp-sgd"}, "server": {"privacy": "dp-sgd"}},
])
def test_possible_combinations_are_built(tmp_path, sections):
    if "privacy" in sections.get("server", {}):
        sections = {"lora": {"aggregation": "stack"},
                    "privacy": {"preset": "record-level", "epsilon": 8.0}}
    _engine(tmp_path, **sections)


def test_ranks_above_the_model_rank_and_lora_methods_without_lora_are_refused(tmp_path):
    from secfed.engine import Engine

    with pytest.raises(ConfigError, match=r"^config: config key 'lora.client_ranks': \[2, 8\] go above model.lora_r"):
        tiny_config(lora={"client_ranks": [2, 8]})
    with pytest.raises(ConfigError, match="lora.client_ranks"):
        tiny_config(lora={"client_ranks": [0]})
    with pytest.raises(ConfigError, match="lora.aggregation"):
        Engine(digits_config(lora={"aggregation": "ffa"}), tmp_path / "d", progress=False)


@pytest.mark.slow  # a CLI subprocess (about 12 s); the refusals themselves are tested in-process above
def test_the_cli_refuses_stack_under_secagg_in_one_line(tmp_path):
    (tmp_path / "c.toml").write_text("""
[run]
name = "t"
rounds = 1
[data]
source = "synthetic-text"
num_clients = 4
test_size = 50
[model]
name = "tiny-bert"
lora_r = 2
[server]
secure_sum = "secagg+"
[lora]
aggregation = "stack"
""")
    res = subprocess.run([sys.executable, "-m", "secfed", "run", "c.toml", "--quiet"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "lora.aggregation = 'stack'" in lines[0] and "secagg+" in lines[0]


# ============================================================================ causal LM
@pytest.mark.parametrize("method, ranks", [("fedit", []), ("ffa", []), ("stack", [2, 4])])
def test_each_method_runs_on_tiny_llama(tmp_path, method, ranks):
    from secfed.engine import Engine
    from test_causal_lm_task import lm_config, write_instruct_jsonl

    data = write_instruct_jsonl(tmp_path / "d.jsonl", n=60)
    eng = Engine(lm_config(data, lora={"aggregation": method, "client_ranks": ranks}, run={"rounds": 1},
                           data={"generate_examples": 0}), tmp_path / "run", progress=False)
    if method == "ffa":
        assert not any(LORA_A in n for n in eng.spec.names)
    s = eng.run()
    assert s["rounds_aggregated"] == 1
    err = _records(tmp_path)[0]["lora_agg_rel_error"]
    assert (err > 1e-4) if method == "fedit" else (err < 1e-5)


def test_ffa_trains_under_dp_sgd_with_the_smaller_dimension(tmp_path):
    eng = _engine(tmp_path, lora={"aggregation": "ffa"}, run={"rounds": 1},
                  privacy={"preset": "record-level", "epsilon": 8.0})
    s = eng.run()
    assert s["rounds_aggregated"] == 1 and s["epsilon"] > 0
    assert not any(LORA_A in n for n in eng.spec.names)
    assert "lora_agg_rel_error" not in _records(tmp_path)[0]  # not released under DP


def test_methods_declare_what_they_need_as_flags(tmp_path):
    from secfed.needs import Need, needs_of

    assert needs_of(_engine(tmp_path, "a").lora) == Need.SUM
    assert needs_of(_engine(tmp_path, "b", lora={"aggregation": "ffa"}).lora) == Need.SUM
    assert needs_of(_engine(tmp_path, "c", lora={"aggregation": "stack"}).lora) == Need.ROWS | Need.FACTORS
    assert needs_of(_engine(tmp_path, "d", lora={"hetero": "svd"}).lora) == Need.ROWS | Need.FACTORS
