"""DAGER on decoder LoRA updates (issue 19): attacks/inversion/dager_lm.py on tiny Llamas.

The shipped tiny-llama has 2 layers of width 32: its layer 1 is its *last* layer, whose q_proj
only sees the loss positions and whose v_proj gradient has rank <= heads x loss positions, so the
prompt's prefixes are not in layer 1's span and the sequence step cannot work there (its layer-0
token step does). The "deep" fixture widens the same tiny Llama to 4 layers of width 64 (still
random, still the MiniLM vocabulary of 30,522 tokens), where layer 1 sees every position as in
SmolLM2's 30 layers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attacks.inversion.dager_lm import (FirstLayer, dager_lm, describe_bound, distinct_inputs, llama_body,
                                        match_sequences, summarise)
from secfed.spec import ParamSpec
from secfed.task import Task
from secfed.training import SGDTrainer

from test_causal_lm_task import lm_config

WORDS = ("river stone cloud amber maple violet copper harbor meadow falcon lantern cedar orbit quartz willow ember "
         "glacier saffron tundra velvet").split()


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Short prompts, 8-word answers: ~21 positions, ~14 distinct tokens per record (MiniLM tokenizer)."""
    rng = np.random.default_rng(0)
    rows = [{"instruction": "say", "output": " ".join(rng.choice(WORDS, 8))} for _ in range(24)]
    path = tmp_path_factory.mktemp("dager") / "say.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def deep(monkeypatch):
    """tiny-llama widened to 4 layers x 64 (see the module docstring)."""
    from secfed import lm_models

    orig = lm_models._tiny_config

    def deeper(name, tok):
        cfg = orig(name, tok)
        if name == "tiny-llama":
            cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 4, 64, 128
        return cfg

    monkeypatch.setattr(lm_models, "_tiny_config", deeper)


def _cfg(path, r, **sections):
    base = dict(model={"name": "tiny-llama", "lora_r": r},
                data={"category_column": None, "test_size": 4, "max_length": 24, "num_clients": 3})
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return lm_config(path, **base)


def _one_step(path, r, examples=1, steps=1, warm_b=0.05, noise=0.0):
    """One client's update from a global model whose B is non-zero (round >= 2), plain SGD."""
    task = Task(_cfg(path, r))
    model = task.build_model()
    spec = ParamSpec.from_module(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(warm_b * torch.randn(p.shape, generator=g))
    w0 = spec.flatten(model)
    data = task.train.subset(np.arange(examples))
    SGDTrainer(local_steps=steps, batch_size=examples, lr=0.05, optimizer="sgd").train(
        model, task, data, torch.Generator().manual_seed(0))
    delta = spec.flatten(model) - w0
    if noise:
        delta = delta + noise * torch.randn(delta.shape, generator=torch.Generator().manual_seed(1))
    spec.assign(model, w0)
    truth = [row[m.bool()].tolist() for row, m in zip(data.tensors["input_ids"], data.tensors["attention_mask"])]
    res = dager_lm(model, spec.names, spec.shapes, delta, task.cfg.data.max_length, keep=examples)
    return summarise(res, truth, set(task.tokenizer.all_special_ids)), res, truth, task


def test_first_layer_matches_the_models_own_forward(records):
    """The hand-run layer 0 (prefix + cached extension) equals HF's layer-1 input."""
    task = Task(_cfg(records, 8))
    model = task.build_model()
    g = torch.Generator().manual_seed(0)  # the test's input: seeded
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=g)  # the global adapter of layer 0 must be applied too
    first = FirstLayer(model)
    ids = task.train.tensors["input_ids"][:3, :12]
    out = model(input_ids=ids, output_hidden_states=True)
    ref = llama_body(model).layers[1].input_layernorm(out.hidden_states[1])
    x1, k, v = first.prefix(ids)
    assert torch.allclose(x1, ref, atol=1e-5)
    _, k, v = first.prefix(ids[:, :11])
    ext = first.extend(k, v, torch.tensor([2, 0, 1]), ids[[2, 0, 1], 11])
    assert torch.allclose(ext, ref[[2, 0, 1], 11], atol=1e-5)


def test_match_sequences_and_rank_bound_golden():
    truth = [[1, 5, 6, 7, 2], [1, 8, 9, 2]]
    m = match_sequences(truth, [[1, 5, 6, 7], [8, 4]], special={1, 2})
    assert m["exact"] == 0.5 and m["token_recall"] == pytest.approx(4 / 5) and m["token_precision"] == pytest.approx(4 / 5)
    assert m["rouge1"] == pytest.approx((1 + 0.5) / 2)
    assert distinct_inputs(truth) == (6, 6)  # the final token never reaches the update; [1] is shared
    assert describe_bound(4, 6, 7).startswith("impossible") and describe_bound(6, 6, 7).startswith("tokens only")


def test_nothing_to_recover_is_undefined_not_a_perfect_or_zero_score():
    """A client whose trainer used no record (an empty Poisson batch under DP-SGD) has nothing to recover: its
    recall is None (once 1.0, which a report read as 'the whole batch recovered'), and the observer's mean
    skips it."""
    from attacks.inversion.text import token_metrics

    m = match_sequences([[1, 2]], [[5, 6]], special={1, 2})  # only special tokens: nothing to recover
    assert (m["exact"], m["rouge1"], m["token_recall"], m["token_precision"]) == (None, None, None, 0.0)
    assert match_sequences([], [], special=set())["token_recall"] is None
    assert token_metrics(set(), {3}) == {"token_precision": 0.0, "token_recall": None}
    assert token_metrics({3, 4}, set()) == {"token_precision": 0.0, "token_recall": 0.0}


def test_dager_recovers_a_sequence_built_to_be_found(records, deep):
    """Batch 1, rank 16 (q+v stacked: 32) >= 21 prefixes: exact, in order."""
    m, res, truth, task = _one_step(records, r=16)
    assert res.layer0.mode == "A" and m["distinct_prefixes"] <= 2 * 16
    assert m["token_recall"] == 1.0 and m["token_precision"] == 1.0
    assert m["exact"] == 1.0 and m["rouge2"] == 1.0
    assert res.sequences[0] == truth[0][:-1]  # everything but the final EOS, which is never in an update


def test_dager_rank_below_prefixes_gets_tokens_but_no_sequence(records, deep):
    """Rank 8 (stacked 16): 14 distinct tokens fit (layer 0 exact), 21 prefixes do not (layer 1)."""
    m, res, _, _ = _one_step(records, r=8)
    assert m["distinct_tokens"] <= 16 < m["distinct_prefixes"]
    assert res.layer1.dim <= 16
    assert m["token_recall"] == 1.0 and m["exact"] == 0.0


def test_dager_rank_below_tokens_finds_nothing_exact(records, deep):
    m, res, _, _ = _one_step(records, r=2)  # stacked 4 << 14 distinct tokens
    assert res.layer0.dim <= 4 and m["exact"] == 0.0 and m["token_recall"] < 0.5


def test_dager_under_dp_sized_noise_finds_nothing(records, deep):
    """Gaussian noise on the update (sigma comparable to DP-SGD's z*C*lr/B): no token, no sequence."""
    m, res, _, _ = _one_step(records, r=16, noise=0.05 * 1.0 * 1.0)
    assert m["exact"] == 0.0 and m["token_recall"] == 0.0


def test_first_step_from_b_zero_uses_the_db_path(records):
    """B = 0 (round 1, one step): dA = 0; dB's rows lie in span{A x}: tokens recovered while < r."""
    m, res, _, _ = _one_step(records, r=32, warm_b=0.0)
    assert res.layer0.mode == "B" and m["distinct_tokens"] < 32
    assert m["token_recall"] == 1.0 and m["token_precision"] == 1.0


def _engine(records, tmp_path, **over):
    from secfed.engine import Engine, read_rounds

    sections = dict(run={"rounds": 2}, client={"batch_size": 1, "local_steps": 1, "optimizer": "sgd", "lr": 1.0},
                    server={"cohort_size": 3, "observers": [{"name": "dager", "attack_rounds": [2]}]})
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    Engine(_cfg(records, 16, **sections), tmp_path / "run", progress=False).run()
    return read_rounds(tmp_path / "run")[1]


def test_dager_observer_in_the_engine_recovers_the_round2_tokens(records, deep, tmp_path):
    """Round 2 of a real run: every token of the attacked client's record, nothing else (layer 0).

    The sequence step needs the layer-1 span to hold every prefix: after one round from B = 0 the
    global B has few strong directions, so ``B^T dY^T`` has a low effective rank and the weaker
    prefixes fall under float32 rounding (span_dim1 < distinct prefixes); the exact sequence case
    (a B of full effective rank, as after longer training) is the direct test above."""
    rec = _engine(records, tmp_path)
    assert rec["dager_status"] == "ok" and rec["dager_token_recall"] == 1.0 and rec["dager_token_precision"] == 1.0
    assert rec["dager_span_dim0"] == rec["dager_distinct_tokens"]
    assert list((tmp_path / "run" / "attacks").glob("dager_round2_client*.txt"))


def test_dager_observer_is_blocked_by_secagg_plus(records, deep, tmp_path):
    rec = _engine(records, tmp_path, server={"secure_sum": "secagg+"})
    assert rec["dager_status"].startswith("blocked") and rec["dager_exact"] is None


@pytest.mark.slow  # ~40 s loaded (Opacus on the 4-layer model); the noise case without the engine is in the default suite
def test_dager_observer_under_dp_sgd_recovers_nothing(records, deep, tmp_path):
    rec = _engine(records, tmp_path, client={"trainer": {"name": "dp-sgd", "max_grad_norm": 1.0}},
                  server={"privacy": {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}})
    assert rec["dager_exact"] == 0.0 and not rec["dager_token_precision"]


def test_dager_observer_refuses_adam_and_encoders(records, tmp_path):
    rec = _engine(records, tmp_path, client={"optimizer": "adam"})
    assert rec["dager_status"].startswith("not run") and rec["dager_exact"] is None
