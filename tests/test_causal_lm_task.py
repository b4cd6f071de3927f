"""Tasks as classes, and the causal-LM instruction-tuning task on the tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from secfed.errors import ConfigError
from secfed.spec import ParamSpec
from secfed.task import CausalLMTask, ImageClassificationTask, Task, TextClassificationTask, make_task

from conftest import digits_config, lm_config, tiny_config  # noqa: F401  (lm_config: other tests import it here)

GOOD = "good great excellent happy love best fast nice fine superb".split()
BAD = "bad awful terrible poor sad angry broken hate worst slow".split()


def write_instruct_jsonl(path, n: int = 150, seed: int = 0, long_answers: bool = False):
    """A label-as-text set: the answer (good / bad) is carried by the words of the input."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(rng.integers(2))
        words = list(rng.choice(GOOD if y else BAD, 3)) + list(rng.choice(["the", "a", "it", "was", "this"], 3))
        rng.shuffle(words)
        out = ("good" if y else "bad") if not long_answers else " ".join(["very"] * int(rng.integers(1, 8)) + ["good" if y else "bad"])
        rows.append({"instruction": "Is this good or bad?", "input": " ".join(words), "output": out})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_instruct_jsonl(tmp_path_factory.mktemp("instruct") / "good_bad.jsonl")


@pytest.fixture(scope="module")
def llama(data_file):
    task = Task(lm_config(data_file))
    return task, task.build_model()


# ----------------------------------------------------------------------------- the factory
def test_task_factory_picks_one_class_per_kind(data_file):
    assert type(Task(tiny_config())) is TextClassificationTask
    assert type(make_task(digits_config())) is ImageClassificationTask
    t = Task(lm_config(data_file))
    assert type(t) is CausalLMTask and isinstance(t, Task) and t.label_task
    assert t.train.label_names == ("bad", "good")
    # capabilities, not kind strings
    assert ImageClassificationTask.image_inputs and not CausalLMTask.image_inputs
    assert TextClassificationTask.text_encoder_inputs and not CausalLMTask.text_encoder_inputs
    with pytest.raises(ConfigError, match="data.task"):
        Task(digits_config(data={"task": "instruct"}))
    with pytest.raises(ConfigError, match="data.task"):
        Task(tiny_config(model={"name": "tiny-llama"}, data={"task": "classification"}))


def test_device_and_dtype_are_checked(data_file):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="run.device"):
            Task(lm_config(data_file, run={"device": "cuda"}))
    with pytest.raises(ConfigError, match="run.dtype"):
        Task(lm_config(data_file, run={"device": "cpu", "dtype": "bfloat16"}))
    assert Task(tiny_config(run={"device": "auto"})).device in ("cpu", "cuda")


# ----------------------------------------------------------------------------- the loss
def _manual_losses(model, batch):
    """Per-example mean token NLL on response tokens, from the full logits (no slicing tricks)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["lm_labels"][:, 1:]
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                                      reduction="none").view_as(target)
    mask = target != -100
    return (nll * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_per_example_loss_is_the_mean_over_each_examples_response_tokens(tmp_path, name):
    path = write_instruct_jsonl(tmp_path / "long.jsonl", 40, long_answers=True)
    task = Task(lm_config(path, name, data={"category_column": None}))
    model = task.build_model()
    batch = task.train.batch(torch.arange(6))
    lengths = (batch["lm_labels"] != -100).sum(1)
    assert len(set(lengths.tolist())) > 1  # answers of different lengths
    per = task.per_example_loss(model, batch)
    assert per.shape == (6,)
    torch.testing.assert_close(per, _manual_losses(model, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(task.loss(model, batch), per.mean())
    # not the token-weighted mean (DESIGN.md pitfall: examples would weigh by their answer length)
    token_mean = (per * lengths).sum() / lengths.sum()
    assert not torch.allclose(task.loss(model, batch), token_mean)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_label_likelihood_scores_agree_with_teacher_forcing(data_file, name):
    task = Task(lm_config(data_file, name))
    model = task.build_model()
    g = torch.Generator().manual_seed(0)  # the test's input: seeded
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=g)  # a non-trivial adapter
    model.eval()
    by_labels = task._evaluate_labels(model, task.test, 8)
    forced = task._evaluate_text(model, task.test, 8)  # right-padded full sequences, no cache
    assert by_labels["loss"] == pytest.approx(forced["loss"], rel=1e-4)
    assert by_labels["token_accuracy"] == pytest.approx(forced["token_accuracy"])
    assert 0.0 <= by_labels["accuracy"] <= 1.0 and 0.0 <= by_labels["exact_match"] <= 1.0
    # label accuracy = argmax over the classes' scores, computed here one example at a time without the cache
    prompts = task._prompts(task.test, list(range(5)))
    scores, _, _ = task.label_scores(model, prompts)
    for i, p in enumerate(prompts):
        for c, toks in enumerate(task.label_tokens):
            seq = torch.tensor([p + toks])
            lp = model(input_ids=seq).logits[0, len(p) - 1: -1].log_softmax(-1)
            assert float(lp.gather(1, torch.tensor(toks)[:, None]).sum()) == pytest.approx(float(scores[i, c]), abs=1e-3)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_greedy_decoding_with_left_padding_matches_hf_generate(data_file, name):
    task = Task(lm_config(data_file, name))
    model = task.build_model()
    model.eval()
    prompts = task._prompts(task.test, [0, 1, 2])  # different lengths: left padding in one batch
    ours = task.greedy(model, prompts, 5)
    for p, got in zip(prompts, ours):
        ref = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=5, do_sample=False, eos_token_id=None)[0, len(p):].tolist()
        eos = task.tokenizer.sep_token_id
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert got == ref


def test_an_engine_run_lowers_the_loss_below_zero_shot_and_reports_generations(tmp_path, data_file):
    from secfed.engine import Engine

    cfg = lm_config(data_file, run={"rounds": 3}, client={"local_steps": 8, "lr": 1e-1})
    summary = Engine(cfg, tmp_path / "run", progress=False).run()
    assert summary["zero_shot_accuracy"] is not None and summary["zero_shot_loss"] is not None
    # the tiny random model's frozen head (init std 0.02 after an RMSNorm) bounds its logits to about +-0.6,
    # so its loss cannot fall far below log(vocab) = 10.3: a clear drop is what can be asked of it
    assert summary["final_loss"] < summary["zero_shot_loss"] - 0.4
    assert summary["best_accuracy"] >= summary["zero_shot_accuracy"]
    rows = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert len(rows) == 5 and set(rows[0]) == {"prompt", "reference", "base", "federated"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Sample generations" in report and "Zero-shot base model" in report


def test_free_text_evaluation_reports_perplexity_and_rouge(tmp_path):
    path = write_instruct_jsonl(tmp_path / "long.jsonl", 60, long_answers=True)
    task = Task(lm_config(path, data={"category_column": None}))
    assert not task.label_task and task.majority_baseline() is None
    model = task.build_model()
    res = task.evaluate(model)
    assert {"loss", "perplexity", "token_accuracy", "accuracy", "rougeL", "exact_match"} <= set(res)
    assert res["perplexity"] == pytest.approx(float(np.exp(res["loss"])), rel=1e-6)
    base = task.baseline(model)
    assert base["zero_shot_loss"] == pytest.approx(res["loss"])  # lora_B = 0: the adapter is still the identity


def test_only_the_lora_factors_train_and_the_adapter_changes(llama):
    from secfed.training import SGDTrainer

    task, model = llama
    spec = ParamSpec.from_module(model)
    assert spec.names and all("lora_" in n for n in spec.names)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    w0 = spec.flatten(model)
    m = SGDTrainer(local_steps=3, batch_size=8, lr=1e-2).train(model, task, task.client_data(0), torch.Generator().manual_seed(0))
    assert m["steps"] == 3
    assert (spec.flatten(model) - w0).abs().max() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    spec.assign(model, w0)


# ----------------------------------------------------------------------------- DP-SGD (opacus #820 / #826)
def test_opacus_per_sample_gradients_reach_every_lora_factor_and_match_per_example_backward(llama):
    from opacus.grad_sample import GradSampleModule

    task, model = llama
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)  # the test's input: seeded
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=g)  # B = 0 would make A's gradient zero
    batch = task.train.batch(torch.arange(5))
    rows = []
    for i in range(5):
        one = {k: v[i: i + 1] for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        task.loss(model, one).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
    model.zero_grad(set_to_none=True)
    expected = torch.stack(rows)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        task.per_example_loss(gsm, batch).sum().backward()
        assert all(getattr(p, "grad_sample", None) is not None for p in params)  # every trainable parameter
        got = torch.cat([p.grad_sample.reshape(5, -1) for p in params], dim=1)
    finally:
        gsm._close()
        for p in model.parameters():
            p.grad = None
            for a in ("grad_sample", "_forward_counter", "_current_grad_sample"):
                if hasattr(p, a):
                    delattr(p, a)
    assert expected.abs().sum() > 0 and (expected.abs().sum(1) > 0).all()
    # float32 noise only: a single example runs trimmed to its own length, the batch to the longest row
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max()))
    spec.assign(model, w0)


@pytest.mark.parametrize("ghost", [False, True])
def test_dpsgd_trains_the_causal_lm_adapter(llama, ghost):
    from defenses.privacy.dpsgd import DPSGDTrainer

    task, model = llama
    spec = ParamSpec.from_module(model)
    w0 = spec.flatten(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tr = DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=0.5, ghost_clipping=ghost, noise="seeded", local_steps=3,
                      batch_size=8, lr=1e-2)
    m = tr.train(model, task, task.client_data(0), torch.Generator().manual_seed(1))
    assert m["steps"] == 3 and m["examples_seen"] > 0 and np.isfinite(m["train_loss"])
    delta = spec.flatten(model) - w0
    pieces = dict(zip(spec.names, torch.split(delta, spec.sizes)))
    assert all(float(v.abs().max()) > 0 for v in pieces.values())  # every LoRA factor moved
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())  # Opacus unwrapped cleanly
    spec.assign(model, w0)


# ----------------------------------------------------------------------------- Flower SuperNode
def test_a_supernode_builds_the_causal_lm_task_from_its_partition(tmp_path, data_file):
    from secfed.engine import Engine
    from secfed.flower.runtime import ClientRuntime
    from secfed.partitions import PartitionTask, write_partitions

    cfg = lm_config(data_file)
    paths = write_partitions(cfg, tmp_path)
    full = Task(cfg)
    part = PartitionTask(cfg, paths[1], 1)
    assert isinstance(part, CausalLMTask) and isinstance(part, PartitionTask)
    for k, v in full.client_data(1).tensors.items():
        assert torch.equal(part.client_data(1).tensors[k], v)
    model = part.build_model()
    assert torch.isfinite(part.loss(model, part.client_data(1).batch(torch.arange(4))))
    # the node runs the engine's own client code on its shard: same update as in-process
    eng = Engine(cfg, tmp_path / "e", progress=False)
    ctx = eng.context(1, [0, 1, 2])
    ref = eng.local_update(1, ctx)
    rt = ClientRuntime(cfg, part)
    assert torch.equal(rt.global_w, eng.global_w)
    got = rt.client.local_update(1, rt.context(1, [0, 1, 2]))  # the node's ClientRound (secfed.rounds)
    assert torch.equal(ref.delta, got.delta)
