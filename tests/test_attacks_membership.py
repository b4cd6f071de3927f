"""Membership inference: logit confidence, offline LiRA, TPR at low FPR, engine-trained models."""

import math

import numpy as np
import pytest
import torch

from attacks.membership.mia import attack_metrics, lira_offline, logit_confidence, loss_scores, tpr_at_fpr


def test_logit_confidence_golden_and_stable():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 50.0, -50.0]])
    conf = logit_confidence(logits, torch.tensor([0, 1]))
    p = math.exp(2) / (math.exp(2) + 2)
    assert float(conf[0]) == pytest.approx(math.log(p / (1 - p)))
    assert float(conf[1]) == pytest.approx(50.0 - math.log(1 + math.exp(-50)), rel=1e-9)  # p -> 1 without inf


def test_loss_scores_are_negated_cross_entropy():
    logits = torch.tensor([[0.0, 0.0]])
    assert loss_scores(logits, torch.tensor([0]))[0] == pytest.approx(-math.log(2))


def test_lira_offline_golden():
    # two examples, three OUT shadows each: mu = (1, 0), pooled sd over 6 residuals with ddof 1
    shadows = np.array([[0.0, -1.0], [1.0, 0.0], [2.0, 1.0]])
    sd = math.sqrt((1 + 0 + 1 + 1 + 0 + 1) / 5)
    s = lira_offline(np.array([3.0, 0.0]), shadows)
    assert s == pytest.approx([2 / sd, 0.0])
    # per-example variance and OUT masks
    mask = np.array([[True, False], [True, True], [False, True]])
    s2 = lira_offline(np.array([3.0, 0.0]), shadows, mask, fixed_variance=False)
    assert s2 == pytest.approx([(3 - 0.5) / math.sqrt(0.5), (0 - 0.5) / math.sqrt(0.5)])


def test_tpr_at_fpr_golden():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    members = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    assert tpr_at_fpr(scores, members, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(scores, members, 0.34) == pytest.approx(1.0)
    m = attack_metrics(scores, members)
    assert m["auc"] == pytest.approx(8 / 9)


def test_random_scores_are_near_chance():
    rng = np.random.default_rng(0)
    m = attack_metrics(rng.normal(size=4000), rng.random(4000) < 0.5)
    assert abs(m["auc"] - 0.5) < 0.05 and m["tpr_at_0.1pct_fpr"] < 0.02


def test_engine_trained_models_leak_membership():
    from conftest import digits_config
    from attacks.membership.experiment import evaluate, train_models

    cfg = digits_config(run={"rounds": 1}, data={"num_clients": 1, "test_size": 300},
                        client={"local_steps": 0, "local_epochs": 15, "batch_size": 32, "lr": 3e-3},
                        server={"cohort_size": 1})
    conf, neg_loss, member, accs = train_models(cfg, num_models=3, pool_size=200)
    assert conf.shape == member.shape == (3, 200) and min(accs) > 0.5
    res = evaluate(conf, neg_loss, member)
    assert res["lira_offline"]["auc"] > 0.55 and res["loss_threshold"]["auc"] > 0.55
