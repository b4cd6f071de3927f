"""Instruction data (secfed.instruct): templates, response-only labels, truncation, errors, offline sets."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from secfed.data import partition
from secfed.errors import DataError
from secfed.instruct import (FAQ_SHA256, PLAIN_TEMPLATE, Record, encode_records, faq_path, faq_records, records_from_rows,
                             render_prompt, response_ids, tweets_records)
from secfed.lm_models import load_causal_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_causal_tokenizer("tiny-llama")  # the MiniLM (BERT) tokenizer: no chat template


def _cols(**kw):
    d = dict(instruction_column="instruction", input_column="input", response_column="output",
             messages_column="messages", category_column=None)
    d.update(kw)
    return types.SimpleNamespace(**d)


def test_plain_template_is_the_documented_alpaca_layout(tok):
    assert not getattr(tok, "chat_template", None)
    rec = records_from_rows([{"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}], _cols(), "t")[0]
    text = render_prompt(tok, rec.messages, system="Be brief.")
    assert text == "Be brief.\n\n" + PLAIN_TEMPLATE.format(instruction="Say hi", input_block="### Input:\nto Bob\n\n")
    no_input = records_from_rows([{"instruction": "Say hi", "output": "hi"}], _cols(), "t")[0]
    assert render_prompt(tok, no_input.messages) == "### Instruction:\nSay hi\n\n### Response:\n"


def test_chat_template_is_used_when_the_tokenizer_has_one(tok):
    chat_tok = load_causal_tokenizer("tiny-llama")
    chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<assistant>{% endif %}")
    rec = records_from_rows([{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}],
                            _cols(), "t")[0]
    assert rec.response == "4"
    assert render_prompt(chat_tok, rec.messages, system="sys") == "<system>sys</s><user>2+2?</s><assistant>"


def test_loss_covers_the_response_and_eos_only(tok):
    recs = [Record([{"role": "user", "content": "what colour is the sky"}], "blue today")]
    d = encode_records(recs, tok, 32)
    ids, lm, plen = d.tensors["input_ids"][0], d.tensors["lm_labels"][0], int(d.tensors["prompt_len"][0])
    resp = response_ids(tok, "blue today")
    assert resp[-1] == tok.sep_token_id  # eos of the tiny models
    assert (lm[:plen] == -100).all() and lm[plen: plen + len(resp)].tolist() == resp
    assert (lm[plen + len(resp):] == -100).all()
    assert ids[plen: plen + len(resp)].tolist() == resp
    assert int(d.tensors["attention_mask"][0].sum()) == plen + len(resp)


def test_long_prompts_are_cut_from_the_start_never_the_response(tok):
    long_input = " ".join(f"word{i}" for i in range(200))
    rec = records_from_rows([{"instruction": "Summarise", "input": long_input, "output": "a short summary"}], _cols(), "t")
    d = encode_records(rec, tok, 48)
    resp = response_ids(tok, "a short summary")
    plen = int(d.tensors["prompt_len"][0])
    assert plen + len(resp) == 48
    lm = d.tensors["lm_labels"][0]
    assert lm[lm != -100].tolist() == resp
    kept = tok.decode(d.tensors["input_ids"][0][:plen])
    assert kept.replace(" ", "").endswith("###response:") and "summarise" not in kept  # the start went, the end stayed


@pytest.mark.parametrize("rows,msg", [
    ([{"instruction": "x", "answer": "y"}], "no field 'output'"),
    ([{"prompt": "x", "output": "y"}], "no field 'instruction'"),
    ([{"instruction": "x", "output": "   "}], "empty response"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "last message must be the assistant"),
])
def test_bad_records_are_one_clear_line(rows, msg):
    with pytest.raises(DataError, match=msg):
        records_from_rows(rows, _cols(), "data.jsonl")


def test_a_response_that_leaves_no_room_for_the_prompt_is_refused(tok):
    rec = records_from_rows([{"instruction": "Repeat", "output": " ".join(["word"] * 60)}], _cols(), "t")
    with pytest.raises(DataError, match="no room for the prompt.*data.max_length"):
        encode_records(rec, tok, 32)


def test_categories_index_records_and_drive_a_dirichlet_split(tok):
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "topic": ["x", "y", "z"][i % 3]} for i in range(60)]
    recs = records_from_rows(rows, _cols(category_column="topic"), "t")
    d = encode_records(recs, tok, 24)
    assert d.label_names == ("x", "y", "z") and d.labels.tolist()[:4] == [0, 1, 2, 0]
    iid = partition(d.labels, 3, "iid", 0.5, 0)
    skew = partition(d.labels, 3, "dirichlet", 0.1, 0)
    qty = partition(d.labels, 3, "quantity", 0.5, 0)
    for parts in (iid, skew, qty):
        assert sorted(np.concatenate(parts).tolist()) == list(range(60))

    def purity(parts):
        return np.mean([np.bincount(d.labels[p].numpy(), minlength=3).max() / max(len(p), 1) for p in parts])

    assert purity(skew) > purity(iid) + 0.2


def test_tweets_as_instructions_answer_with_the_label_word():
    recs = tweets_records(None)
    assert len(recs) > 30000
    assert {r.response for r in recs} == {"negative", "neutral", "positive"}
    assert all(r.category == r.response for r in recs[:100])
    assert "Classify the sentiment of this tweet" in recs[0].messages[0]["content"]


def test_construction_faq_is_the_pinned_english_set():
    import hashlib

    assert hashlib.sha256(faq_path().read_bytes()).hexdigest() == FAQ_SHA256
    recs = faq_records()
    assert len(recs) == 503
    assert len({r.category for r in recs}) == 39
    assert recs[0].messages[0]["content"].startswith("What is a bygglov")
    assert all(r.response for r in recs)


def test_csv_and_jsonl_sources_read_alpaca_and_chat_rows(tmp_path):
    from secfed.config import parse_config
    from secfed.instruct import load_records

    p = tmp_path / "d.jsonl"
    rows = [{"instruction": "a", "output": "b"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "r"}]}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = parse_config({"data": {"source": "jsonl", "path": str(p), "task": "instruct"}, "model": {"name": "tiny-llama"}})
    recs = load_records(cfg.data, 0)
    assert [r.response for r in recs] == ["b", "r"] and recs[1].messages[0]["role"] == "system"
    c = tmp_path / "d.csv"
    c.write_text("instruction,input,output\nsay,hello,world\n")
    cfg = parse_config({"data": {"source": "csv", "path": str(c), "task": "instruct"}, "model": {"name": "tiny-llama"}})
    assert load_records(cfg.data, 0)[0].messages[0]["content"] == "say\n\nhello"
    torch.manual_seed(0)
