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


def lm_config(path, name: str = "tiny-llama", **sections):
    """An instruction-tuning run of a tiny causal LM on a JSONL file; ``sections`` override whole tables' keys."""
    base = {
        "run": {"name": "lm", "seed": 0, "rounds": 2},
        "data": {"source": "jsonl", "path": str(path), "task": "instruct", "category_column": "output",
                 "num_clients": 3, "test_size": 30, "max_length": 32, "generate_examples": 4, "max_new_tokens": 4},
        "model": {"name": name, "lora_r": 4},
        "client": {"batch_size": 8, "lr": 2e-2, "local_steps": 3},
        "server": {"cohort_size": 3},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return parse_config(base)


def overfit_tiny_llama(task, data, steps: int, lr: float = 1.5e-2):
    """(the tiny Llama with every weight trained on ``data`` as one batch, ``steps`` Adam steps, in eval mode; its
    untrained twin, the reference). With LoRA only, the tiny random Llama memorises nothing in a test's budget."""
    from secfed.lm_models import build_causal_lm

    plain = dict(lora_r=0, lora_alpha=1, lora_dropout=0.0, target_modules=[], seed=0)
    model, reference = build_causal_lm("tiny-llama", **plain), build_causal_lm("tiny-llama", **plain)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batch = data.batch(torch.arange(len(data)))
    for _ in range(steps):
        loss = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, reference


def dp_sgd_round(cfg, adversary: dict, out):
    """(summary, round record) of one round of ``cfg`` under record-level DP-SGD (epsilon 8, delta 1e-5) with
    ``attack.adversary = adversary``."""
    import json

    from secfed.engine import Engine

    raw = cfg.model_dump(mode="json")
    raw["run"]["rounds"] = 1
    raw["client"]["trainer"] = {"name": "dp-sgd", "max_grad_norm": 1.0}
    raw["server"]["privacy"] = {"name": "dp-sgd", "epsilon": 8.0, "delta": 1e-5}
    raw["attack"]["adversary"] = adversary
    summary = Engine(parse_config(raw), out, progress=False).run()
    return summary, [json.loads(x) for x in (out / "rounds.jsonl").read_text().splitlines()][-1]


@pytest.fixture
def full_secret_cohort(monkeypatch):
    """Every client in the secret cohort (a privacy guard draws it from the OS CSPRNG, secfed.engine.secret_cohort).

    For tests whose claim does not depend on the draw: a Poisson cohort of q over a few clients is
    empty or below server.min_clients by chance (q = 0.6 over 5: 1% empty, 9% below 2), and no seed
    fixes an OS draw. The accounting still uses the configured q; only which clients train is fixed.
    """
    import secfed.engine

    monkeypatch.setattr(secfed.engine, "secret_cohort", lambda n, sampling, sample_rate, k: list(range(n if sampling == "poisson" else k)))


@pytest.fixture
def tiny_cfg():
    return tiny_config()
