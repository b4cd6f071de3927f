"""Membership inference experiment: K models trained *by the engine*, each on a random half.

Carlini et al.'s evaluation protocol (S&P 2022, Sec. V): a pool of examples; K
models, each trained with the engine (a full federated run with the config's
clients, rounds, trainer and privacy guard) on an independent random half of the
pool. Each model in turn is the target; its shadows are the other K-1 models, and
for every pool example LiRA (offline) uses only the shadows that did *not* train
on it. Scores of all K targets are pooled (K x N scores, about half members),
which gives the FPR resolution needed to read TPR at 0.1% FPR.

The pool is the engine task's training split (public to the attacker in this
experiment, as the shadow data must be); the test split is not used.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from attacks.membership.mia import attack_metrics, lira_offline, logit_confidence, loss_scores, model_logits
from secfed.config import ExperimentConfig
from secfed.data import partition
from secfed.engine import Engine
from secfed.task import Task


def train_models(cfg: ExperimentConfig, num_models: int, pool_size: int, seed: int = 0,
                 out_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """Train ``num_models`` engine runs on random halves of a pool; return confidences, losses, membership.

    Returns ``conf (K, N)``, ``neg_loss (K, N)``, ``member (K, N)`` and each run's final test accuracy.
    """
    base = Task(cfg)
    n = min(pool_size, len(base.train))
    rng = np.random.default_rng(seed)
    pool = base.train.subset(np.sort(rng.permutation(len(base.train))[:n]))
    conf, neg_loss, member, accs = [], [], [], []
    tmp = tempfile.TemporaryDirectory(prefix="secfed-mia-") if out_dir is None else None
    root = Path(out_dir) if out_dir is not None else Path(tmp.name)
    for k in range(num_models):
        inside = np.zeros(n, dtype=bool)
        inside[rng.permutation(n)[: n // 2]] = True
        task = Task(cfg)
        task.train = pool.subset(np.flatnonzero(inside))
        task.shards = partition(task.train.labels, cfg.data.num_clients, cfg.data.partition, cfg.data.alpha,
                                cfg.run.seed + k, cfg.data.min_examples)
        eng = Engine(cfg, root / f"model{k}", progress=False, task=task)
        summary = eng.run()
        eng.spec.assign(eng.model, eng.global_w)
        logits = model_logits(task, eng.model, pool, batch_size=512)
        conf.append(logit_confidence(logits, pool.labels).numpy())
        neg_loss.append(loss_scores(logits, pool.labels))
        member.append(inside)
        accs.append(float(summary["final_accuracy"]))
    if tmp is not None:
        tmp.cleanup()
    return np.stack(conf), np.stack(neg_loss), np.stack(member), accs


def evaluate(conf: np.ndarray, neg_loss: np.ndarray, member: np.ndarray) -> dict[str, dict[str, float]]:
    """Pooled leave-one-out evaluation of the loss-threshold attack and offline LiRA."""
    K = conf.shape[0]
    lira, loss, labels = [], [], []
    for k in range(K):
        others = [j for j in range(K) if j != k]
        out_mask = ~member[others]
        keep = out_mask.any(0)  # examples with at least one OUT shadow
        lira.append(lira_offline(conf[k][keep], conf[others][:, keep], out_mask[:, keep]))
        loss.append(neg_loss[k][keep])
        labels.append(member[k][keep])
    y = np.concatenate(labels)
    return {"loss_threshold": attack_metrics(np.concatenate(loss), y),
            "lira_offline": attack_metrics(np.concatenate(lira), y)}


def membership_experiment(cfg: ExperimentConfig, num_models: int = 8, pool_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    conf, neg_loss, member, accs = train_models(cfg, num_models, pool_size, seed)
    out: dict[str, Any] = evaluate(conf, neg_loss, member)
    out["test_accuracy_mean"] = float(np.mean(accs))
    out["models"] = num_models
    out["pool"] = int(conf.shape[1])
    return out
