"""Membership inference on a fine-tuned causal LM (instruction tuning, response-only loss).

Scores (higher = "member"), each over an example's response tokens:

* ``loss`` -- the negated mean token NLL (Yeom et al., CSF 2018).
* ``zlib`` -- the negated ratio of the log-perplexity to the zlib entropy of the
  response text, ``-(mean NLL) / len(zlib.compress(text))`` (Carlini et al., USENIX
  Security 2021, "Extracting Training Data from Large Language Models", Sec. 6.1):
  text that is simple for zlib is simple for any model, memorised or not.
* ``min_k`` -- Min-K% Prob (Shi et al., ICLR 2024, "Detecting Pretraining Data from
  Large Language Models"): the mean log-probability of the k% least likely tokens
  (k = 20% by default, the paper's best); a member has fewer very unlikely tokens.
* ``ref`` -- reference-calibrated loss (Carlini et al. 2021; Mireshghallah et al.
  2022 "likelihood ratio"): ``loss_ref - loss_target``, with the base model
  (the adapter disabled) as the reference: what fine-tuning made more likely.

Members are the clients' training examples, non-members the held-out test split
(records of the same distribution). Reported per score: ROC AUC and TPR at 1% and
0.1% FPR (``attacks.membership.mia.attack_metrics``), keys
``llm_mia_<score>_auc`` etc.; the headline ``llm_mia_auc_ref_calibrated`` and
``llm_mia_tpr_at_1pct_fpr`` (of the reference-calibrated score).
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.membership.mia import attack_metrics
from secfed.data import TensorData

SCORES = ("loss", "zlib", "min_k", "ref")


@torch.no_grad()
def token_logprobs(model: nn.Module, task: Any, data: TensorData, batch_size: int = 16) -> list[np.ndarray]:
    """Per example, the log-probabilities of its response tokens (eval mode; the mode is restored)."""
    was = model.training
    model.eval()
    out: list[np.ndarray] = []
    for b in data.batches(batch_size, shuffle=False):
        nll, rows, _ = task.token_nll(model, b)
        nll, rows = nll.double().cpu().numpy(), rows.cpu().numpy()
        out += [-nll[rows == i] for i in range(len(b["lm_labels"]))]
    model.train(was)
    return out


def min_k_prob(logprobs: np.ndarray, k: float = 0.2) -> float:
    """Mean of the ``ceil(k n)`` lowest token log-probabilities (at least one token)."""
    if len(logprobs) == 0:
        return 0.0
    m = max(1, int(np.ceil(k * len(logprobs))))
    return float(np.sort(logprobs)[:m].mean())


def response_texts(task: Any, data: TensorData) -> list[str]:
    lm = data.tensors["lm_labels"]
    return [task.tokenizer.decode([t for t in row.tolist() if t != -100], skip_special_tokens=True).strip() for row in lm]


def zlib_bits(text: str) -> int:
    return 8 * len(zlib.compress(text.encode("utf-8")))


def reference_model(model: nn.Module, reference: nn.Module | None = None) -> Any:
    """``reference`` as a context manager, else the PEFT model with its adapter disabled (its base), else None."""
    if reference is not None:
        return contextlib.nullcontext(reference)
    if hasattr(model, "disable_adapter"):
        @contextlib.contextmanager
        def base() -> Any:
            with model.disable_adapter():
                yield model
        return base()
    return None


def llm_scores(model: nn.Module, task: Any, data: TensorData, k: float = 0.2,
               reference: nn.Module | None = None, batch_size: int = 16) -> dict[str, np.ndarray]:
    """The four scores of every example of ``data`` (``ref`` only with a reference: ``reference`` or the
    model's base with its adapter disabled)."""
    lps = token_logprobs(model, task, data, batch_size)
    loss = np.array([-lp.mean() if len(lp) else 0.0 for lp in lps])
    texts = response_texts(task, data)
    out = {"loss": -loss,
           "zlib": -loss / np.array([max(zlib_bits(t), 1) for t in texts], dtype=np.float64),
           "min_k": np.array([min_k_prob(lp, k) for lp in lps])}
    ref = reference_model(model, reference)
    if ref is not None:
        with ref as r:
            ref_loss = np.array([-lp.mean() if len(lp) else 0.0 for lp in token_logprobs(r, task, data, batch_size)])
        out["ref"] = ref_loss - loss
    return out


def membership_split(task: Any, max_examples: int = 500, seed: int = 0) -> tuple[TensorData, TensorData]:
    """Up to ``max_examples`` training examples (members) and as many test examples (non-members)."""
    rng = np.random.default_rng(seed)
    n = min(len(task.train), len(task.test), max_examples)
    return (task.train.subset(np.sort(rng.permutation(len(task.train))[:n])),
            task.test.subset(np.sort(rng.permutation(len(task.test))[:n])))


def llm_membership(model: nn.Module, task: Any, members: TensorData | None = None,
                   non_members: TensorData | None = None, k: float = 0.2, reference: nn.Module | None = None,
                   max_examples: int = 500, seed: int = 0) -> dict[str, float]:
    """AUC and TPR at 1% / 0.1% FPR of every score, members vs non-members."""
    if members is None or non_members is None:
        members, non_members = membership_split(task, max_examples, seed)
    s_in = llm_scores(model, task, members, k, reference)
    s_out = llm_scores(model, task, non_members, k, reference)
    y = np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)]
    out: dict[str, float] = {"llm_mia_members": float(len(members)), "llm_mia_non_members": float(len(non_members))}
    for name in SCORES:
        if name not in s_in:
            continue
        m = attack_metrics(np.r_[s_in[name], s_out[name]], y)
        out[f"llm_mia_{name}_auc"] = m["auc"]
        out[f"llm_mia_{name}_tpr_at_1pct_fpr"] = m["tpr_at_1pct_fpr"]
        out[f"llm_mia_{name}_tpr_at_0.1pct_fpr"] = m["tpr_at_0.1pct_fpr"]
    head = "ref" if "ref" in s_in else "loss"
    out["llm_mia_auc_ref_calibrated" if head == "ref" else "llm_mia_auc_loss_only"] = out[f"llm_mia_{head}_auc"]
    out["llm_mia_tpr_at_1pct_fpr"] = out[f"llm_mia_{head}_tpr_at_1pct_fpr"]
    return out
