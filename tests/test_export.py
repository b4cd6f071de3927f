"""Adapter export in PEFT format; ``secfed generate`` and ``secfed predict`` on finished runs."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from secfed.cli import app
from secfed.engine import Engine
from secfed.export import export_adapter, load_causal_run
from secfed.lm_models import build_causal_lm
from secfed.models import SmallCNN, build_text_model

from conftest import lm_config, tiny_config

WORDS = {"good": "good great nice happy fine".split(), "bad": "bad awful sad poor worst".split()}


def _instruct_file(path, n: int = 60):
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        y = "good" if rng.integers(2) else "bad"
        words = list(rng.choice(WORDS[y], 3)) + list(rng.choice(["the", "a", "it", "was"], 2))
        rows.append({"instruction": "Good or bad?", "input": " ".join(words), "output": y})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _lm_config(path, name="tiny-llama"):
    return lm_config(path, name, run={"rounds": 1}, client={"lr": 5e-2}, server={"cohort_size": 2},
                     data={"num_clients": 2, "test_size": 10, "generate_examples": 2, "max_new_tokens": 3})


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls") / "run"
    engine = Engine(tiny_config(run={"name": "tiny", "seed": 0, "rounds": 1}), out, progress=False)
    engine.run()
    return engine


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    engine = Engine(_lm_config(_instruct_file(d / "gb.jsonl")), d / "run", progress=False)
    engine.run()
    return engine


def _one_line_error(result) -> str:
    assert result.exit_code != 0
    msg = result.output.strip()
    assert msg.startswith("error:") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_classifier_adapter_loads_with_peft(cls_run):
    from peft import PeftModel
    from safetensors.torch import load_file

    a = cls_run.out / "adapter"
    for f in ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "labels.json"):
        assert (a / f).is_file(), f
    assert json.loads((a / "labels.json").read_text()) == list(cls_run.task.train.label_names)
    m = cls_run.cfg.model
    fresh = build_text_model(m.name, cls_run.task.num_classes, lora_r=0, lora_alpha=1.0, lora_dropout=0.0,
                             target_modules=[], lora_layers=None, train_embeddings=False, pooling=m.pooling,
                             sha256=None, seed=cls_run.cfg.run.seed)
    batch = cls_run.task.test.batch(torch.arange(16))
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    fresh.head.load_state_dict(load_file(str(a / "head.safetensors")))
    fresh.eval()
    with torch.no_grad():
        without_adapter = fresh(**x)
    fresh.encoder = PeftModel.from_pretrained(fresh.encoder, str(a))
    fresh.eval()
    cls_run.model.eval()
    with torch.no_grad():
        got, want = fresh(**x), cls_run.model(**x)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(without_adapter, want, atol=1e-4), "the adapter must carry the federated training"


def test_causal_adapter_loads_with_peft(lm_run):
    from peft import PeftModel

    a = lm_run.out / "adapter"
    assert (a / "adapter_config.json").is_file() and (a / "adapter_model.safetensors").is_file()
    assert not (a / "head.safetensors").exists()
    base = build_causal_lm("tiny-llama", lora_r=0, lora_alpha=1.0, lora_dropout=0.0, target_modules=[], seed=0)
    ids = lm_run.task.test.tensors["input_ids"][:4]
    mask = lm_run.task.test.tensors["attention_mask"][:4]
    base.eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids, attention_mask=mask).logits
    model = PeftModel.from_pretrained(base, str(a))
    model.eval()
    lm_run.model.eval()
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = lm_run.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(base_logits, want, atol=1e-4), "the adapter must carry the federated training"


def test_image_model_exports_nothing(tmp_path):
    assert export_adapter(SmallCNN(), None, tmp_path / "adapter") is None
    assert not (tmp_path / "adapter").exists()


def test_generate_prompt_and_prompts_file(lm_run, tmp_path):
    r = CliRunner().invoke(app, ["generate", str(lm_run.out), "--prompt", "Good or bad?\n\ngreat nice",
                                 "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"instruction": "Good or bad?", "input": "sad poor"}) + "\n"
                 + json.dumps({"prompt": "hello"}) + "\n")
    r = CliRunner().invoke(app, ["generate", str(lm_run.out), "--prompts", str(f), "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(l) for l in r.output.strip().splitlines() if l.startswith("{")]
    assert [l["prompt"] for l in lines] == ["Good or bad?\n\nsad poor", "hello"]
    # greedy: the CLI's answer is the model's own greedy continuation
    cfg, model, tok = load_causal_run(lm_run.out)
    from secfed.export import generate

    assert generate(model, tok, ["hello"], 2) == [lines[1]["output"]]


def test_generate_refuses_an_adapter_from_another_base(lm_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(lm_run.out, other)
    cj = other / "config.json"
    raw = json.loads(cj.read_text())
    raw["run"]["seed"] = 1  # the tiny base is drawn from the seed: another base model, same architecture
    cj.write_text(json.dumps(raw))
    r = CliRunner().invoke(app, ["generate", str(other), "--prompt", "hi", "--max-new-tokens", "2"])
    assert "another base model" in _one_line_error(r)
    raw["run"]["seed"], raw["model"]["name"] = 0, "tiny-gpt2"
    cj.write_text(json.dumps(raw))
    r = CliRunner().invoke(app, ["generate", str(other), "--prompt", "hi", "--max-new-tokens", "2"])
    assert "tiny-llama" in _one_line_error(r)


def test_generate_missing_files_one_line(lm_run, cls_run, tmp_path):
    r = CliRunner().invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert "config.json" in _one_line_error(r)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(lm_run.out / "config.json", bare / "config.json")
    r = CliRunner().invoke(app, ["generate", str(bare), "--prompt", "hi"])
    assert "adapter" in _one_line_error(r)
    r = CliRunner().invoke(app, ["generate", str(lm_run.out)])
    assert "--prompt" in _one_line_error(r)
    r = CliRunner().invoke(app, ["generate", str(cls_run.out), "--prompt", "hi"])
    assert "secfed predict" in _one_line_error(r)


def test_predict_writes_label_names(cls_run, tmp_path):
    texts = [cls_run.task.tokenizer.decode(ids[m.bool()], skip_special_tokens=True)
             for ids, m in zip(cls_run.task.test.tensors["input_ids"][:12], cls_run.task.test.tensors["attention_mask"][:12])]
    f = tmp_path / "in.csv"
    with f.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["id", "text"])
        w.writeheader()
        w.writerows({"id": i, "text": t} for i, t in enumerate(texts))
    r = CliRunner().invoke(app, ["predict", str(cls_run.out), str(f)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "in.predictions.csv").open()))
    assert [row["id"] for row in rows] == [str(i) for i in range(12)]
    names = list(cls_run.task.train.label_names)
    tok = cls_run.task.tokenizer
    enc = tok(texts, padding=True, truncation=True, max_length=cls_run.cfg.data.max_length, return_tensors="pt")
    cls_run.model.eval()
    with torch.no_grad():
        want = [names[i] for i in cls_run.model(enc["input_ids"], enc["attention_mask"]).argmax(-1).tolist()]
    assert [row["prediction"] for row in rows] == want
    j = tmp_path / "in.jsonl"
    j.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    out = tmp_path / "labelled.jsonl"
    r = CliRunner().invoke(app, ["predict", str(cls_run.out), str(j), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert [json.loads(l)["prediction"] for l in out.read_text().splitlines()] == want


def test_predict_errors_one_line(cls_run, lm_run, tmp_path):
    f = tmp_path / "in.csv"
    f.write_text("id,body\n1,hello\n")
    r = CliRunner().invoke(app, ["predict", str(cls_run.out), str(f)])
    assert "no column 'text'" in _one_line_error(r)
    assert not (tmp_path / "in.predictions.csv").exists(), "nothing half-written"
    r = CliRunner().invoke(app, ["predict", str(cls_run.out), str(tmp_path / "missing.csv")])
    assert "not found" in _one_line_error(r)
    f.write_text("text\nhello\n")
    r = CliRunner().invoke(app, ["predict", str(lm_run.out), str(f)])
    assert "secfed generate" in _one_line_error(r)


def test_trained_embeddings_travel_with_the_adapter(tmp_path):
    cfg = tiny_config(run={"name": "emb", "seed": 0, "rounds": 1}, model={"name": "tiny-bert", "lora_r": 4,
                                                                           "train_embeddings": True})
    engine = Engine(cfg, tmp_path / "run", progress=False)
    engine.run()
    assert (tmp_path / "run" / "adapter" / "trainable_extra.safetensors").is_file()
    from secfed.export import load_classifier_run

    _, model, _, _ = load_classifier_run(tmp_path / "run")
    batch = engine.task.test.batch(torch.arange(8))
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    engine.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**x), engine.model(**x), atol=1e-6)
