"""Membership inference: the loss-threshold attack and offline LiRA, with their ROC metrics.

* Loss threshold (Yeom et al., CSF 2018): score = -loss(x, y); members have lower loss.
* LiRA, offline variant (Carlini et al., S&P 2022, "Membership Inference Attacks
  From First Principles", Sec. VI-C): for each target example, the logit-scaled
  confidence ``phi = log(p_y / (1 - p_y))`` (computed stably as
  ``z_y - logsumexp_{j != y} z_j``) of shadow models trained *without* it is
  modelled as N(mu_out, sigma_out^2); the score is the one-sided test statistic
  ``(phi_target - mu_out) / sigma_out``. With few shadow models the paper's
  global ("fixed") variance is used: sigma_out is pooled over all examples.
* Metrics: ROC AUC and TPR at a fixed low FPR (the largest TPR on the ROC curve
  whose FPR does not exceed the target), as the paper asks (0.1% and 1%).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch.nn import functional as F


@torch.no_grad()
def model_logits(task, model: torch.nn.Module, data, batch_size: int = 256) -> torch.Tensor:
    """The model's logits on every example of ``data`` in order (eval mode; the mode is restored)."""
    was = model.training
    model.eval()
    out = torch.cat([task.forward(model, b) for b in data.batches(batch_size, shuffle=False)])
    model.train(was)
    return out


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log(p_y / (1 - p_y))`` = ``z_y - logsumexp_{j != y} z_j`` (no underflow at p_y -> 1)."""
    logits = logits.double()
    zy = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return zy - torch.logsumexp(others, dim=1)


def loss_scores(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Loss-threshold attack score: the negated per-example cross-entropy."""
    return (-F.cross_entropy(logits.double(), labels, reduction="none")).numpy()


def lira_offline(target_conf: np.ndarray, shadow_out_conf: np.ndarray, out_mask: np.ndarray | None = None,
                 fixed_variance: bool = True) -> np.ndarray:
    """Offline LiRA scores.

    ``target_conf``: (N,) confidences of the target model; ``shadow_out_conf``: (K, N)
    confidences of K shadow models; ``out_mask`` (K, N): True where the example was
    *not* in that shadow's training set (default all True, i.e. public-split shadows).
    """
    S = np.asarray(shadow_out_conf, dtype=np.float64)
    M = np.ones_like(S, dtype=bool) if out_mask is None else np.asarray(out_mask, dtype=bool)
    cnt = M.sum(0)
    if (cnt < 1).any():
        raise ValueError("every example needs at least one OUT shadow model")
    mu = np.where(M, S, 0).sum(0) / cnt
    resid = np.where(M, S - mu, 0.0)
    if fixed_variance:
        sigma = np.sqrt((resid**2).sum() / max(M.sum() - 1, 1))
        sigma = np.full_like(mu, sigma)
    else:
        sigma = np.sqrt((resid**2).sum(0) / np.maximum(cnt - 1, 1))
    return (np.asarray(target_conf, dtype=np.float64) - mu) / (sigma + 1e-30)


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> float:
    """Largest TPR with FPR <= ``fpr`` (members = positive class, higher score = member)."""
    f, t, _ = roc_curve(np.asarray(members, dtype=int), scores)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def attack_metrics(scores: np.ndarray, members: np.ndarray) -> dict[str, float]:
    members = np.asarray(members, dtype=bool)
    return {"auc": float(roc_auc_score(members.astype(int), scores)),
            "tpr_at_1pct_fpr": tpr_at_fpr(scores, members, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(scores, members, 0.001),
            "members": int(members.sum()), "non_members": int((~members).sum())}
