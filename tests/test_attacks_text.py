"""Text inversion: FILM bag of words, DAGER span check, metrics (tiny-bert, generated text)."""

import numpy as np
import pytest
import torch

from attacks.inversion.text import (SpanCheck, bag_of_words, dager, invert_text_update, row_space, rouge_n, score,
                                    span_distance, token_metrics)
from conftest import tiny_config
from secfed.spec import ParamSpec
from secfed.task import Task
from secfed.training import SGDTrainer


def test_rouge_and_token_metrics_golden():
    ref, hyp = [1, 2, 3, 4], [1, 2, 4]
    # unigrams: overlap 3, P = 3/3, R = 3/4 -> F1 = 6/7; bigrams: ref {12,23,34}, hyp {12,24}: overlap 1
    assert rouge_n(ref, hyp, 1) == pytest.approx(6 / 7)
    assert rouge_n(ref, hyp, 2) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert token_metrics({1, 2, 3, 4}, {1, 2, 9}) == {"token_precision": pytest.approx(2 / 3), "token_recall": 0.5}


def test_span_distance_golden():
    basis = row_space(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    d = span_distance(torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 1.0]]), basis)
    assert torch.allclose(d, torch.tensor([0.0, 1.0, 2**-0.5], dtype=torch.float64), atol=1e-12)


def test_bag_of_words_exact_and_under_noise():
    upd = torch.zeros(1000, 64)
    upd[[3, 17, 400]] = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    assert bag_of_words(upd) == [3, 17, 400]
    noisy = upd + 1e-3 * torch.randn(upd.shape, generator=torch.Generator().manual_seed(0))
    assert bag_of_words(noisy, noisy=True) == [3, 17, 400]


def _client_update(task, model, spec, examples, steps, optimizer, warm_b=False):
    if warm_b:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
    w0 = spec.flatten(model)
    data = task.train.subset(np.arange(examples))
    SGDTrainer(local_steps=steps, batch_size=max(1, examples // steps), lr=0.05, optimizer=optimizer).train(
        model, task, data, torch.Generator().manual_seed(0))
    delta = spec.flatten(model) - w0
    spec.assign(model, w0)
    true = [row[m.bool()].tolist() for row, m in zip(data.tensors["input_ids"], data.tensors["attention_mask"])]
    return delta, true


@pytest.mark.parametrize("optimizer,examples,steps", [("sgd", 1, 1), ("adam", 1, 1), ("adam", 4, 2)])
def test_film_recovers_every_token_from_trained_embedding(optimizer, examples, steps):
    task = Task(tiny_config(model={"name": "tiny-bert", "lora_r": 0, "train_embeddings": True}))
    model = task.build_model()
    spec = ParamSpec.from_module(model)
    delta, true = _client_update(task, model, spec, examples, steps, optimizer)
    res = invert_text_update(model, spec.names, spec.shapes, delta, task.cfg.data.max_length, batch_size=examples)
    m = score(res, true, set(task.tokenizer.all_special_ids))
    assert m["token_recall"] == 1.0 and m["token_precision"] == 1.0


def _span_case(rank):
    """A layer-0 LoRA-A update built exactly as DAGER's analysis says: dA = M X, X = the layer's inputs."""
    task = Task(tiny_config(model={"name": "tiny-bert", "lora_r": 16, "lora_layers": [0]}))
    model = task.build_model()
    ids = task.train.tensors["input_ids"][0][task.train.tensors["attention_mask"][0].bool()].tolist()
    check = SpanCheck(model, {}, {})
    X = torch.stack([check.inputs(p, torch.tensor([t]))[0] for p, t in enumerate(ids)])
    dA = torch.randn(rank, len(ids), generator=torch.Generator().manual_seed(0)) @ X
    check = SpanCheck(model, {"query": {"A": dA}}, {})
    seq = dager(model, check, task.cfg.data.max_length)
    res = {"bag": {t for pos in seq for t in pos}, "sequence": seq, "method": "span-check"}
    return score(res, [ids], set(task.tokenizer.all_special_ids)), len(ids)


def test_dager_span_check_recovers_sequence_in_order():
    m, n = _span_case(rank=16)  # 11 tokens, rank 16 >= 11, hidden 32: exact
    assert n < 16
    assert m["token_recall"] == 1.0 and m["token_precision"] == 1.0 and m["exact"] == 1.0 and m["rouge2"] == 1.0


def test_dager_fails_honestly_when_rank_below_token_count():
    m, n = _span_case(rank=3)
    assert n > 3 and m["token_recall"] < 0.5


def test_text_observer_in_engine(tmp_path):
    from secfed.engine import Engine, read_rounds

    cfg = tiny_config(model={"name": "tiny-bert", "lora_r": 0, "train_embeddings": True}, run={"rounds": 1},
                      client={"batch_size": 1, "local_steps": 1},
                      server={"cohort_size": 2, "observers": [{"name": "text-inversion"}]})
    Engine(cfg, tmp_path / "run", progress=False).run()
    rec = read_rounds(tmp_path / "run")[0]
    assert rec["text_token_recall"] == 1.0 and rec["text_token_precision"] == 1.0
    assert list((tmp_path / "run" / "attacks").glob("text_round1_client*.txt"))
