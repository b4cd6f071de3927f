"""Instruction-tuning data for causal LMs: records, prompt rendering, response-only labels.

Records come in two shapes:

- **Alpaca** (Taori et al. 2023): ``instruction``, optional ``input``, ``output``
  (column names from ``data.instruction_column`` / ``input_column`` / ``response_column``).
- **Chat**: a list of ``{role, content}`` messages (``data.messages_column``); the last
  message must be the assistant's answer, which is the response; everything before it
  is the prompt (earlier assistant turns are context, not trained on).

The prompt is rendered with the tokenizer's chat template when it has one
(``apply_chat_template(..., add_generation_prompt=True)``), else with the plain
template :data:`PLAIN_TEMPLATE` (the Alpaca layout)::

    {system}                      <- only when data.system_prompt is set

    ### Instruction:
    {instruction}

    ### Input:                    <- only when the record has an input
    {input}

    ### Response:
    {response}<eos>

Labels are -100 on prompt tokens and padding: the loss covers the response tokens
and the end-of-sequence token only (as in Alpaca / Vicuna training). A prompt that
does not fit ``data.max_length`` together with the whole response is truncated from
its start (the response is never cut); a response that leaves no room for a prompt
is an error. Every record keeps a category index (``labels``) for partitioning
(Dirichlet over categories) and label-as-text accuracy; the token labels are
``lm_labels``.

Offline sets: ``tweets-instruct`` (the default tweets as "classify the sentiment"
instructions, answers ``negative`` / ``neutral`` / ``positive``) and
``construction-faq`` (the PyPI package ``zaragoza-construction-faq``: English Q&A on
the Swedish construction industry, 39 categories; CC-BY-4.0, by Zaragoza AB).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secfed.data import TensorData, _read_tweets
from secfed.errors import DataError
from secfed.packaged import installed_file

INSTRUCT_SOURCES = ("tweets-instruct", "construction-faq")
TWEETS_INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word."

FAQ_DIST = "zaragoza-construction-faq"
FAQ_FILE = "zaragoza_construction_faq/data/faq-en.jsonl"  # fields: id, category, q, a, sources, related_service
FAQ_SHA256 = "e4a891ff78e0a785a180cdde2d9fa82bc0339d6e1f5297037e44eedb07f9b40b"

# Kept prompt tokens when a long prompt is cut: fewer than this is "no room for the prompt".
MIN_PROMPT_TOKENS = 4

PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


@dataclass
class Record:
    """One training example: the prompt as chat messages, the response text, its category."""

    messages: list[dict[str, str]]
    response: str
    category: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- records
def _text(v: Any) -> str:
    return "" if v is None else str(v)


def records_from_rows(rows: list[dict[str, Any]], d: Any, where: str) -> list[Record]:
    """Alpaca or chat rows -> records. ``d`` is the ``[data]`` config (column names, category)."""
    if not rows:
        raise DataError(f"{where}: no records")
    out: list[Record] = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise DataError(f"{where}: record {i} is not an object")
        if d.messages_column in r and d.instruction_column not in r:
            msgs = r[d.messages_column]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise DataError(f"{where}: record {i}: '{d.messages_column}' must be a non-empty list of "
                                "{role, content} messages")
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: record {i}: the last message must be the assistant's answer "
                                f"(got role '{msgs[-1]['role']}')")
            prompt = [{"role": str(m["role"]), "content": _text(m["content"])} for m in msgs[:-1]]
            if not any(m["role"] == "user" for m in prompt):
                raise DataError(f"{where}: record {i}: no user message before the answer")
            response = _text(msgs[-1]["content"])
        else:
            for col, key in ((d.instruction_column, "data.instruction_column"), (d.response_column, "data.response_column")):
                if col not in r:
                    raise DataError(f"{where}: record {i} has no field '{col}' ({key}); fields are {sorted(r)} "
                                    f"(chat records need '{d.messages_column}', data.messages_column)")
            instruction, inp = _text(r[d.instruction_column]).strip(), _text(r.get(d.input_column)).strip()
            if not instruction:
                raise DataError(f"{where}: record {i} has an empty '{d.instruction_column}'")
            prompt = [{"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}]
            prompt[0]["_instruction"], prompt[0]["_input"] = instruction, inp
            response = _text(r[d.response_column])
        if not response.strip():
            raise DataError(f"{where}: record {i} has an empty response ('{d.response_column}')")
        cat = ""
        if d.category_column:
            if d.category_column not in r:
                raise DataError(f"{where}: record {i} has no field '{d.category_column}' (data.category_column); "
                                f"fields are {sorted(r)}")
            cat = _text(r[d.category_column]).strip()
        out.append(Record(prompt, response.strip(), cat))
    return out


def _read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        if fmt == "csv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f))
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot parse as {fmt}: {e}") from None


def _read_hf_rows(name: str, split: str | None) -> list[dict[str, Any]]:
    from secfed.data import load_hf_dataset

    ds = load_hf_dataset(name, split)
    return [dict(r) for r in ds]


def tweets_records(instruction: str | None) -> list[Record]:
    """The default tweets as a label-as-text task: the response is the label word."""
    texts, labels = _read_tweets()
    inst = instruction or TWEETS_INSTRUCTION
    return [Record([{"role": "user", "content": f"{inst}\n\n{t}", "_instruction": inst, "_input": t}], y, y)
            for t, y in zip(texts, labels)]


def faq_path() -> Path:
    """The English JSONL of ``zaragoza-construction-faq``, found through package metadata (never imported)."""
    p = installed_file(FAQ_DIST, FAQ_FILE, who="data.source 'construction-faq'", install=f"{FAQ_DIST}==1.2.1",
                       error=DataError)
    if hashlib.sha256(p.read_bytes()).hexdigest() != FAQ_SHA256:
        raise DataError(f"construction-faq: {p} does not match its pinned sha256")
    return p


def faq_records() -> list[Record]:
    """The 503 English Q&A pairs (question -> answer), category = the FAQ section (39 of them)."""
    out = []
    for i, r in enumerate(_read_rows(faq_path(), "jsonl")):
        q, a = _text(r.get("q")).strip(), _text(r.get("a")).strip()
        if not q or not a:
            raise DataError(f"construction-faq: record {i} has no question or answer")
        out.append(Record([{"role": "user", "content": q, "_instruction": q, "_input": ""}], a,
                          _text(r.get("category")).strip()))
    return out


def load_records(d: Any, seed: int) -> list[Record]:
    """The records of ``[data]``: an offline set or a JSONL / CSV / HF file of Alpaca or chat rows."""
    if d.source == "tweets-instruct":
        recs = tweets_records(d.instruction)
    elif d.source == "construction-faq":
        recs = faq_records()
    elif d.source in ("csv", "jsonl"):
        recs = records_from_rows(_read_rows(Path(d.path or ""), d.source), d, str(d.path))
    elif d.source == "hf":
        recs = records_from_rows(_read_hf_rows(d.path or "", d.split), d, f"HF dataset '{d.path}'")
    else:
        raise DataError(f"data.source '{d.source}' has no instruction records "
                        f"({', '.join(INSTRUCT_SOURCES)}, csv, jsonl, hf)")
    if d.max_examples and len(recs) > d.max_examples:
        keep = np.sort(np.random.default_rng(seed).permutation(len(recs))[: d.max_examples])
        recs = [recs[i] for i in keep]
    return recs


# ----------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], system: str | None = None) -> str:
    """The prompt text: the tokenizer's chat template (with the generation prompt), else :data:`PLAIN_TEMPLATE`."""
    msgs = list(messages)
    if system and not any(m["role"] == "system" for m in msgs):
        msgs = [{"role": "system", "content": system}] + msgs
    if has_chat_template(tokenizer):
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return plain_prompt(msgs)


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The plain template: system text, then each user turn as an instruction and each answer as a response."""
    parts: list[str] = []
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n\n")
        elif m["role"] == "assistant":
            parts.append(f"{m['content']}\n\n")
        else:
            inst, inp = m.get("_instruction"), m.get("_input")
            if inst is None:
                inst, inp = m["content"], ""
            block = f"### Input:\n{inp}\n\n" if inp else ""
            parts.append(PLAIN_TEMPLATE.format(instruction=inst, input_block=block))
    return "".join(parts)


def eos_id(tokenizer: Any) -> int | None:
    """End-of-sequence id (the ``[SEP]`` of BERT-style tokenizers, which the tiny test models use as eos)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def response_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a response, plus eos: what the model is trained to produce after the prompt."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    e = eos_id(tokenizer)
    return ids + ([e] if e is not None else [])


def encode_records(records: list[Record], tokenizer: Any, max_length: int, system: str | None = None,
                   categories: tuple[str, ...] | None = None) -> TensorData:
    """Tokenise records into a :class:`TensorData`.

    Tensors: ``input_ids`` / ``attention_mask`` (right-padded to ``max_length``),
    ``lm_labels`` (-100 on prompt and padding), ``prompt_len`` (tokens of the kept
    prompt), ``labels`` (category index; the categories, sorted, are ``label_names``).
    """
    cats = categories or tuple(sorted({r.category for r in records}))
    index = {c: i for i, c in enumerate(cats)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(records)
    ids = torch.full((n, max_length), pad, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    lm = torch.full((n, max_length), -100, dtype=torch.long)
    plen = torch.zeros(n, dtype=torch.long)
    prompts = [render_prompt(tokenizer, r.messages, system) for r in records]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = [response_ids(tokenizer, r.response) for r in records]
    for i, (p, a) in enumerate(zip(p_ids, r_ids)):
        room = max_length - len(a)
        if room < min(len(p), MIN_PROMPT_TOKENS):
            raise DataError(f"record {i}: the response has {len(a)} tokens (with eos), which leaves no room for the "
                            f"prompt in data.max_length = {max_length}; raise data.max_length")
        p = p[len(p) - room:] if len(p) > room else p  # cut the prompt from its start, never the response
        seq = list(p) + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        lm[i, len(p): len(seq)] = torch.tensor(a)
        plen[i] = len(p)
    labels = torch.tensor([index.get(r.category, 0) for r in records], dtype=torch.long)
    return TensorData({"input_ids": ids, "attention_mask": mask, "lm_labels": lm, "prompt_len": plen,
                       "labels": labels}, len(cats), cats)
