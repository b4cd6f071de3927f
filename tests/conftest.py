"""Shared fixtures: tiny configs that run in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SECFED_THREADS", "1")  # run.threads = "auto" must not follow the load mid-suite
torch.set_num_threads(1)

from secfed.config import parse_config  # noqa: E402


def tiny_config(**sections):
    """A tiny-bert run on generated text; ``sections`` override whole tables' keys."""
    base = {
        "run": {"name": "tiny", "seed": 0, "rounds": 2},
        "data": {"source": "synthetic-text", "num_clients": 4, "test_size": 100, "max_length": 16},
        "model": {"name": "tiny-bert", "lora_r": 4},
        "client": {"batch_size": 16, "lr": 1e-2, "local_steps": 3},
        "server": {"cohort_size": 4},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return parse_config(base)


def digits_config(**sections):
    base = {
        "run": {"name": "digits", "seed": 0, "rounds": 2},
        "data": {"source": "digits", "num_clients": 5, "test_size": 300},
        "model": {"name": "cnn"},
        "client": {"batch_size": 32, "lr": 1e-2, "local_steps": 5},
        "server": {"cohort_size": 5},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return parse_config(base)


@pytest.fixture
def tiny_cfg():
    return tiny_config()
