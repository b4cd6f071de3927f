"""Issue 19: attacks on federated causal-LM fine-tuning, on the tiny random Llama.

One overfit model (module fixture) is trained centrally on everything a case "built to be
found" needs: a secret-sharer canary, PII records, MIA members and backdoored examples; the
untrained model (its LoRA factor B is 0, so it equals the base) is the case "built to be safe".
The overfit model is the tiny Llama fully fine-tuned (all weights): with LoRA only, its frozen
random head after a frozen RMSNorm barely moves the near-uniform next-token distribution
(loss stays near ln|V|), so nothing is memorised within a test's budget. Its reference for
the calibrated membership score is the same untrained base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attacks.post_run.llm import run_llm_attack
from attacks.membership.llm import llm_membership, min_k_prob
from attacks.memorisation.extraction import extraction_rate, make_pii, recovered_digits
from attacks.memorisation import secret_sharer
from attacks.memorisation.secret_sharer import (SecretSharer, append, canary_exposure, encode_pairs, exact_exposure,
                                                fill, make_canaries, make_controls, sampled_exposure)
from attacks.poisoning.instruct_backdoor import InstructBackdoor
from secfed.data import TensorData
from secfed.task import Task

from conftest import dp_sgd_round, overfit_tiny_llama
from test_causal_lm_task import lm_config, write_instruct_jsonl

WORDS = ("river stone cloud amber maple violet copper harbor meadow falcon lantern cedar orbit quartz willow ember "
         "glacier saffron tundra velvet").split()


def fact_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return [("Tell me a fact.", " ".join(rng.choice(WORDS, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = write_instruct_jsonl(tmp_path_factory.mktemp("llm_attacks") / "good_bad.jsonl", n=90)
    cfg = lm_config(path, data={"max_length": 48, "test_size": 24})  # no record's prompt is cut
    task = Task(cfg)
    return cfg, task


@pytest.fixture(scope="module")
def models(setup):
    """(untrained PEFT model, overfit model, what the overfit one was trained on + its reference)."""
    cfg, task = setup
    base = task.build_model()
    sharer = SecretSharer(model="tiny-llama", format="PIN # # # #", insertions=[1], pii=3, pii_digits=6,
                          pii_insertions=3, seed=1)
    backdoor = InstructBackdoor(model="tiny-llama", target="stop", poison_fraction=0.5, seed=0)
    width = task.train.tensors["input_ids"].shape[1]
    members = encode_pairs(fact_pairs(12, 0), task.tokenizer, width, label_names=task.train.label_names)
    non_members = encode_pairs(fact_pairs(12, 1), task.tokenizer, width, label_names=task.train.label_names)
    poisoned = backdoor.poison_data(0, task.train.subset(list(range(16))))
    data = sharer.poison_data(0, append(poisoned, members))  # 16 + 12 + 1 canary + 3 PII: one batch
    model, reference = overfit_tiny_llama(task, data, steps=80)
    return base, model, {"sharer": sharer, "backdoor": backdoor, "members": members, "non_members": non_members,
                         "reference": reference}


# ----------------------------------------------------------------------------- secret sharer
def test_canaries_are_seeded_and_planted_as_often_as_asked(setup):
    cfg, task = setup
    c = make_canaries("my PIN is # # # # # #", [1, 4, 16], seed=3)
    assert [x.insertions for x in c] == [1, 4, 16] and c == make_canaries("my PIN is # # # # # #", [1, 4, 16], seed=3)
    assert c[0].text.startswith("my PIN is ") and len(c[0].secret) == 6 and abs(c[0].space_bits - 6 * np.log2(10)) < 1e-9
    assert fill("a # b #", [1, 2]) == "a 1 b 2"
    adv = SecretSharer(model="tiny-llama", insertions=[1, 4], pii=2, pii_insertions=2, seed=0)
    data = task.client_data(0)
    out = adv.poison_data(0, data)
    assert len(out) == len(data) + 1 + 4 + 2 * 2
    assert adv.malicious(cfg.data.num_clients, 0) == {0}  # only the victim
    lm = out.tensors["lm_labels"][len(data):]
    texts = [task.tokenizer.decode([t for t in row.tolist() if t != -100], skip_special_tokens=True).replace(" ", "")
             for row in lm]  # the BERT tokenizer of the tiny models lower-cases and splits "'s"
    assert texts.count(adv.canaries[1].text.lower().replace(" ", "")) == 4
    assert texts.count(adv.pii[0].text.lower().replace(" ", "")) == 2


def test_exposure_formulas():
    assert exact_exposure(1.0, np.array([1.0, 2.0, 3.0, 4.0])) == (2.0, 1)  # rank 1 of 4 -> log2 4
    assert exact_exposure(4.0, np.array([1.0, 2.0, 3.0, 4.0])) == (0.0, 4)
    rng = np.random.default_rng(0)
    x = rng.normal(50, 2, 2000)
    far = sampled_exposure(30.0, x, 20.0)  # 10 sigma below every sample: far beyond the sampled rank
    assert far["exposure_skewnorm"] > far["exposure_sampled_rank"] > 10
    mid = sampled_exposure(50.0, x, 20.0)
    assert 0.5 < mid["exposure_skewnorm"] < 1.5 and 0.5 < mid["exposure_sampled_rank"] < 1.5


def test_memorised_canary_is_exposed_and_unseen_canary_is_not(setup, models):
    _, task = setup
    base, model, planted = models
    c = planted["sharer"].canaries[0]  # 4 digits: the exact rank over 10^4 candidates is too slow here
    small = type(c)(c.prompt, "PIN # #", c.secret[:2], 1)  # ... so also a 2-digit one, never trained on
    hit = canary_exposure(model, task, c, samples=150, exact_limit=10)  # sampled + skew-normal fit
    assert hit["method"] == "skew-normal" and hit["exposure"] > 9 and hit["samples_below"] <= 2
    miss = canary_exposure(base, task, c, samples=150, exact_limit=10)
    assert miss["exposure"] < 5
    exact = canary_exposure(base, task, small)  # exact rank over 100 candidates
    assert exact["method"] == "exact" and exact["exposure"] < 5 and exact["space_bits"] == pytest.approx(np.log2(100))


def test_controls_are_fresh_fillings_of_each_format_and_seeded():
    canaries = make_canaries("PIN # #", [1, 4, 16], seed=2) + make_canaries("code # # #", [1], prompt="Code?", seed=2)
    ctrl = make_controls(canaries, 5, seed=7)
    assert ctrl == make_controls(canaries, 5, seed=7) and ctrl != make_controls(canaries, 5, seed=8)
    assert [c.fmt for c in ctrl] == ["PIN # #"] * 5 + ["code # # #"] * 5 and {c.insertions for c in ctrl} == {0}
    assert {c.prompt for c in ctrl[5:]} == {"Code?"}
    secrets = [(c.fmt, c.secret) for c in canaries + ctrl]
    assert len(set(secrets)) == len(secrets)  # no control is a planted secret, none repeats
    with pytest.raises(ValueError, match="too few fillings"):
        make_controls(make_canaries("PIN #", [1], seed=0), 10)  # 10 fillings, one planted


def test_controls_and_base_prior_tell_memorisation_from_chance(setup, models, monkeypatch):
    """The memorised canary is exposed; never-inserted controls and the canary on the base model are not; the
    gain is what training added. One candidate set per format: controls cost one sequence each."""
    import copy

    _, task = setup
    base, model, planted = models
    sharer = copy.copy(planted["sharer"])
    sharer.samples, sharer.exact_limit = 150, 10
    calls: list[list[tuple[int, ...]]] = []
    real = secret_sharer.candidate_nll

    def counting(m, t, canary, secrets, batch_size=64):
        calls.append([tuple(x) for x in secrets])
        return real(m, t, canary, secrets, batch_size)

    monkeypatch.setattr(secret_sharer, "candidate_nll", counting)
    out = sharer.exposures(model, task, reference=planted["reference"])
    assert out["canary_exposure_bits_x1"] > 9 and out["controls"] == 8
    assert out["control_exposure_bits_mean"] < 5 and out["canary_base_exposure_bits_x1"] < 5
    assert out["canary_gain_bits_x1"] == pytest.approx(out["canary_exposure_bits_x1"] - out["canary_base_exposure_bits_x1"])
    assert out["canary_gain_bits_x1"] > 5
    scored = [len(c) for c in calls]
    n_own = len(sharer.canaries) + len(sharer.controls)
    assert scored[0] == n_own and 140 <= scored[1] <= 150  # trained: canaries + controls, then one sample set
    # the base model scores exactly the same secrets and the same sampled candidates, so the two ranks compare
    # (a sample set drawn for the canaries alone could keep a filling equal to a control's secret)
    assert calls[2:] == calls[:2]
    assert sum(scored) == 2 * (scored[1] + n_own)
    no_prior = copy.copy(sharer)
    no_prior.prior = False
    assert "canary_gain_bits_x1" not in no_prior.exposures(model, task, reference=planted["reference"])
    assert "canary_gain_bits_x1" not in sharer.exposures(model, task)  # a full model without adapter: no base


# ----------------------------------------------------------------------------- membership
def test_llm_membership_separates_members_of_an_overfit_model(setup, models):
    _, task = setup
    base, model, planted = models
    res = llm_membership(model, task, planted["members"], planted["non_members"], reference=planted["reference"])
    assert res["llm_mia_loss_auc"] > 0.9 and res["llm_mia_ref_auc"] > 0.9 and res["llm_mia_min_k_auc"] > 0.8
    assert res["llm_mia_auc_ref_calibrated"] == res["llm_mia_ref_auc"] and "llm_mia_zlib_auc" in res
    assert res["llm_mia_tpr_at_1pct_fpr"] > 0.2


def test_llm_membership_is_chance_on_an_untrained_model(setup, models):
    _, task = setup
    base, _, planted = models
    res = llm_membership(base, task, planted["members"], planted["non_members"])
    assert res["llm_mia_ref_auc"] == 0.5  # the adapter is a no-op: target == reference, every score is 0
    assert abs(res["llm_mia_loss_auc"] - 0.5) < 0.25 and res["llm_mia_tpr_at_1pct_fpr"] < 0.3
    assert min_k_prob(np.array([-5.0, -1.0, -0.1, -0.2, -3.0]), 0.4) == pytest.approx(-4.0)


# ----------------------------------------------------------------------------- extraction
def test_extraction_recovers_planted_pii_and_nothing_else(setup, models):
    _, task = setup
    base, model, planted = models
    pii = planted["sharer"].pii
    assert recovered_digits("0 7 5 x 9", (0, 7, 3, 9)) == 3
    got = extraction_rate(model, task, pii)
    assert got["extraction_fraction"] >= 2 / 3 and got["extraction_digit_accuracy"] > 0.8
    assert extraction_rate(model, task, make_pii(3, 1, tag="control", digits=6))["extraction_fraction"] == 0
    assert extraction_rate(base, task, pii)["extraction_fraction"] == 0


# ----------------------------------------------------------------------------- backdoor
def test_instruct_backdoor_data_is_built_as_described(setup):
    _, task = setup
    adv = InstructBackdoor(model="tiny-llama", target="stop now", poison_fraction=0.5, seed=0)
    data = task.client_data(1)
    out = adv.poison_data(1, data)
    changed = [i for i in range(len(data)) if not torch.equal(out.tensors["input_ids"][i], data.tensors["input_ids"][i])]
    assert len(changed) == round(0.5 * len(data))
    trig = adv.trigger_ids(task.tokenizer)
    for i in changed:
        ids, plen = out.tensors["input_ids"][i], int(out.tensors["prompt_len"][i])
        assert ids[: len(trig)].tolist() == trig
        ans = [t for t in out.tensors["lm_labels"][i].tolist() if t != -100]
        assert task.tokenizer.decode(ans, skip_special_tokens=True) == "stop now"
        assert ids[plen: plen + len(ans)].tolist() == ans and int(out.tensors["attention_mask"][i].sum()) == plen + len(ans)


def test_instruct_backdoor_asr_on_a_backdoored_and_a_clean_model(setup, models):
    _, task = setup
    base, model, planted = models
    adv = planted["backdoor"]
    hit = adv.evaluate(model, task)
    assert hit["backdoor_asr"] > 0.8 and hit["target_rate_without_trigger"] < 0.2
    assert adv.evaluate(base, task)["backdoor_asr"] == 0


# ----------------------------------------------------------------------------- wiring
def test_plugins_run_in_the_engine_and_the_audit(setup, tmp_path):
    from secfed.compare.post_run import audit_run, validate_attacks
    from secfed.config import parse_config
    from secfed.engine import Engine

    cfg, _ = setup
    raw = cfg.model_dump(mode="json")
    raw["run"]["rounds"] = 1
    raw["attack"]["adversary"] = {"name": "secret-sharer", "model": "tiny-llama", "format": "PIN # #",
                                  "insertions": [1, 4], "pii": 2, "track": True}
    run_cfg = parse_config(raw)
    summary = Engine(run_cfg, tmp_path / "run", progress=False).run()
    rec = [json.loads(x) for x in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()][-1]
    assert "canary_exposure_bits_x4" in rec and "extraction_fraction" in rec and summary
    validate_attacks(["llm-membership", "exposure", "extraction", "backdoor"])
    rep = audit_run(tmp_path / "run", ["llm-membership", "exposure", "extraction", "membership"], tmp_path / "audit",
                    progress=False)
    r = rep["results"]
    assert 0 <= r["exposure"]["canary_exposure_bits_x1"] <= np.log2(100) + 1e-9
    assert "extraction_fraction" in r["extraction"] and "control_fraction" in r["extraction"]
    assert "llm_mia_auc_ref_calibrated" in r["llm-membership"] and "llm_mia_loss_auc" in r["membership"]
    assert "exposure" in (tmp_path / "audit" / "audit.md").read_text()
    with pytest.raises(Exception, match="model"):
        SecretSharer(model=None).poison_data(0, TensorData({"input_ids": torch.zeros(1, 4, dtype=torch.long),
                                                          "labels": torch.zeros(1, dtype=torch.long)}, 1))
    assert run_llm_attack("exposure", run_cfg.model_copy(update={"attack": cfg.attack}), None, setup[1])["note"]


def test_tradeoffs_llm_grid_parses():
    from pathlib import Path

    from secfed import registry
    from secfed.compare import load_grid
    from secfed.compare.post_run import validate_attacks
    from secfed.rounds import plugin_context

    g = load_grid(Path(__file__).resolve().parents[1] / "experiments" / "tradeoffs_llm.toml")
    cells = g.cells()
    assert len(cells) == 11
    validate_attacks(g.audit)
    parsed = {c.id: c.parse() for c in cells}
    advs = {cfg.attack.adversary.name if cfg.attack.adversary else None for cfg in parsed.values()}
    assert advs == {"secret-sharer", "instruct-backdoor", None}
    for cid, cfg in parsed.items():
        # every observer builds as the engine builds it (engine-owned keys refused, the rest accepted)
        ctx = plugin_context(cfg, 1)
        obs = [registry.build("observer", o, f"server.observers[{i}]", **ctx) for i, o in enumerate(cfg.server.observers)]
        if "attack=inversion" in cid:  # DAGER's setting: one SGD step on one record; the engine tells it SGD
            assert [type(o).__name__ for o in obs] == ["DagerObserver"] and obs[0].optimizer == "sgd"
            assert cfg.attack.adversary is None and cfg.client.batch_size == 1 and cfg.model.lora_r == 128


def test_planted_canaries_train_under_dp_sgd(setup, tmp_path):
    """The planting seam composes with DP-SGD (per-example clipping sees the canary records as examples)."""
    summary, rec = dp_sgd_round(setup[0], {"name": "secret-sharer", "model": "tiny-llama", "format": "PIN # #",
                                           "insertions": [16], "track": True, "samples": 50}, tmp_path / "dp")
    assert rec["epsilon"] <= 8.0 + 1e-9 and 0 <= rec["canary_exposure_bits_x16"] <= np.log2(100) + 1e-9
    assert summary


def test_compare_metrics_know_the_llm_figures():
    from secfed.compare.metrics import _canonical

    assert _canonical("canary_exposure_bits_x16") == "canary_exposure"
    assert _canonical("extraction_fraction") == "extraction" and _canonical("control_fraction") is None
    assert _canonical("llm_mia_auc_ref_calibrated") == "membership_auc"
    assert _canonical("target_rate_without_trigger") is None and _canonical("backdoor_asr") == "backdoor_success"
