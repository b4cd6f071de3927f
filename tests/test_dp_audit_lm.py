"""Issue 19 item 3: the one-run DP audit (Steinke, Nasr & Jagielski 2023) on the generative task.

Secret-sharer canaries, each in the victim's data with probability 1/2; the score is the drop of the
canary's log-perplexity from the reference model. Built to be found: the tiny Llama fully fine-tuned
on the planted data (with LoRA only the tiny random model memorises nothing within a test's budget;
see tests/test_attacks_llm.py). Built to be safe: the untrained model. Under DP-SGD in the engine the
bound must stay below the epsilon the ledger claims.
"""

from __future__ import annotations

import numpy as np
import pytest

from attacks.dp_audit.lm_canary import LMCanaryAudit, audit_lm_canaries, lm_canaries
from secfed.config import parse_config
from secfed.errors import ConfigError
from secfed.task import Task

from conftest import dp_sgd_round, lm_config, overfit_tiny_llama
from test_causal_lm_task import write_instruct_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_instruct_jsonl(tmp_path_factory.mktemp("lm_audit") / "good_bad.jsonl", n=60)
    cfg = lm_config(path, data={"max_length": 32, "test_size": 12})
    return cfg, Task(cfg)


def test_canaries_are_distinct_seeded_and_half_included():
    c1, inc1 = lm_canaries(200, "PIN # # #", seed=3)
    c2, inc2 = lm_canaries(200, "PIN # # #", seed=3)
    assert c1 == c2 and np.array_equal(inc1, inc2)  # the auditor's coin is reproducible
    assert len({c.secret for c in c1}) == 200  # drawn without replacement: no canary is its own duplicate
    assert 70 < inc1.sum() < 130  # Bernoulli(1/2)
    _, inc3 = lm_canaries(200, "PIN # # #", seed=4)
    assert not np.array_equal(inc1, inc3)
    with pytest.raises(ConfigError, match="m"):
        lm_canaries(2000, "PIN # # #")  # more canaries than fillings
    audit = LMCanaryAudit(m=20, insertions=3, model="tiny-llama", seed=3)
    planted = audit.pairs()
    assert len(planted) == 3 * int(audit.included.sum())  # only the included ones, each `insertions` times
    assert {t for _, t in planted} == {c.text for c, i in zip(audit.audit_canaries, audit.included) if i}


def test_memorised_canaries_give_a_positive_bound_and_an_untrained_model_none(setup):
    cfg, task = setup
    audit = LMCanaryAudit(m=32, insertions=2, model="tiny-llama", seed=1)
    data = audit.poison_data(0, task.train.subset(list(range(8))))  # 8 records + the included canaries
    model, reference = overfit_tiny_llama(task, data, steps=40)
    res, scores = audit_lm_canaries(model, task, audit.audit_canaries, audit.included, 1e-5, reference)
    assert scores[audit.included].mean() > scores[~audit.included].mean()
    assert res.correct > res.guesses * 0.8 and res.eps_lower_bound > 0.5, res  # 30 of 32 right: 1.49
    # the same audit on the untrained model: the scores carry nothing about the coin
    safe, _ = audit_lm_canaries(reference, task, audit.audit_canaries, audit.included, 1e-5)
    assert safe.eps_lower_bound < 0.5, safe


def test_the_bound_stays_below_the_claimed_epsilon_under_dp_sgd(setup, tmp_path):
    _, rec = dp_sgd_round(setup[0], {"name": "lm-dp-audit", "model": "tiny-llama", "m": 16, "delta": 1e-5},
                          tmp_path / "dp")
    assert rec["lm_audit_canaries"] == 16 and rec["lm_audit_records_per_canary"] == 1
    assert 0.0 <= rec["lm_audit_eps_lower_bound"] <= rec["epsilon"] <= 8.0 + 1e-9


def test_classifier_canaries_point_a_generative_run_to_the_lm_audit(setup):
    cfg, _ = setup
    raw = cfg.model_dump(mode="json")
    raw["data"]["canaries"] = 4
    with pytest.raises(ConfigError, match="lm-dp-audit"):
        Task(parse_config(raw))


def test_the_lm_audit_experiment_parses_and_builds_its_adversary():
    from pathlib import Path

    from secfed import registry
    from secfed.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments" / "lm_dp_audit.toml")
    adv = registry.build("adversary", cfg.attack.adversary, "attack.adversary", num_clients=cfg.data.num_clients)
    assert isinstance(adv, LMCanaryAudit) and len(adv.audit_canaries) == 64
    assert adv.model_name == cfg.model.name and adv.system_prompt == cfg.data.system_prompt
