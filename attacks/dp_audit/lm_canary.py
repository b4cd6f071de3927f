"""``lm-dp-audit``: the one-run DP audit on the generative task, with secret-sharer canaries.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023),
with the canaries of Carlini et al., "The Secret Sharer" (USENIX Security 2019):

* ``m`` canaries are distinct random fillings of one format (``"PIN # # # #"``, every ``#``
  a random digit), answers to one fixed prompt;
* each is included independently with probability 1/2 (the auditor's seeded coin,
  :func:`lm_canaries`) in the data of the victim client(s) ``ids``, ``insertions`` copies each;
  the excluded ones are never trained on;
* after training, canary k's score is its memorisation signal, the drop of its log-perplexity
  Px (the response tokens' summed NLL, :func:`attacks.memorisation.secret_sharer.sequence_nll`)
  from the reference model (the run's initial model w_0: for LoRA the base model) to the
  trained one, ``s_k = Px_ref(k) - Px(k)`` (``calibrate = false``: ``s_k = -Px(k)``);
* :func:`attacks.dp_audit.one_run.audit_from_scores` guesses "in" for the ``k_plus`` highest
  scores and "out" for the ``k_minus`` lowest (default: all m, half each) and turns the
  correct guesses into an epsilon lower bound (95% confidence).

What the bound is checked against. The theorem needs the run to be (eps, delta)-DP with respect
to one canary's inclusion. With ``insertions = 1`` a canary is one record, so the claim it tests
is the ledger's: record-level DP-SGD (``server.privacy = "dp-sgd"``) or user-level DP-FedAvg
(a change inside one client's data is covered by the client's guarantee). With ``insertions = n``
under record-level DP a canary is a group of n records (group privacy: the claim is weaker);
``lm_audit_records_per_canary`` says which. Without DP the bound shows how much a run that
memorises leaks; its ceiling is set by ``m`` (:mod:`attacks.dp_audit.one_run`).

Config::

    [attack.adversary]
    name = "lm-dp-audit"
    model = "tiny-llama"       # the run's model.name (the tokenizer the canaries are encoded with)
    m = 64
    ids = [0]
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from attacks.dp_audit.one_run import AuditResult, audit_from_scores
from attacks.memorisation.secret_sharer import (DEFAULT_PROMPT, Canary, SecretSharer, encode_pairs, num_slots,
                                                sequence_nll)
from secfed.errors import ConfigError
from secfed.interfaces import derive_seed

DEFAULT_AUDIT_FORMAT = "PIN # # # #"


def lm_canaries(m: int, fmt: str = DEFAULT_AUDIT_FORMAT, prompt: str = DEFAULT_PROMPT, insertions: int = 1,
                seed: int = 0) -> tuple[list[Canary], np.ndarray]:
    """``m`` distinct canaries (secrets drawn without replacement from the 10^slots fillings) and the
    auditor's coin: ``included[k]`` with probability 1/2, independently (both seeded)."""
    k = num_slots(fmt)
    if k < 1:
        raise ConfigError(f"config key 'attack.adversary.format': {fmt!r} has no '#' slot")
    if m < 2 or m > 10**k:
        raise ConfigError(f"config key 'attack.adversary.m': need 2 <= m <= 10^{k} (the format's fillings), got {m}")
    rng = np.random.default_rng(derive_seed(seed, "lm-dp-audit", "secrets"))
    codes = rng.choice(10**k, size=m, replace=False)
    canaries = [Canary(prompt, fmt, tuple(int(c) for c in f"{int(x):0{k}d}"), int(insertions)) for x in codes]
    coin = np.random.default_rng(derive_seed(seed, "lm-dp-audit", "included"))
    return canaries, coin.random(m) < 0.5


def canary_nll(model: nn.Module, task: Any, canaries: Sequence[Canary], batch_size: int = 64) -> np.ndarray:
    """Px of each canary (its response's summed token NLL, nats) under ``model``, encoded as the task's records."""
    width = task.train.tensors["input_ids"].shape[1]
    enc = encode_pairs([(c.prompt, c.text) for c in canaries], task.tokenizer, width, task.cfg.data.system_prompt,
                       task.train.label_names)
    return sequence_nll(model, task, enc, batch_size)


def audit_lm_canaries(model: nn.Module, task: Any, canaries: Sequence[Canary], included: np.ndarray, delta: float,
                      reference: nn.Module | np.ndarray | None = None, confidence: float = 0.95,
                      k_plus: int | None = None, k_minus: int | None = None) -> tuple[AuditResult, np.ndarray]:
    """(the one-run audit of the canaries on ``model``, the scores). ``reference``: the model (or its Px
    array) the scores are calibrated by; None scores by ``-Px`` alone."""
    px = canary_nll(model, task, canaries)
    if reference is None:
        scores = -px
    else:
        ref = reference if isinstance(reference, np.ndarray) else canary_nll(reference, task, canaries)
        scores = ref - px
    return audit_from_scores(scores, included, delta, confidence, k_plus, k_minus), scores


class LMCanaryAudit(SecretSharer):
    """Plants the included audit canaries in clients ``ids`` (the secret-sharer planting seam) and reports the
    one-run epsilon lower bound at every evaluation round (``lm_audit_eps_lower_bound``).

    Parameters: ``m`` (canaries), ``format`` / ``prompt`` (the secret-sharer canary), ``insertions`` (copies of
    each included canary), ``delta`` / ``confidence`` (the bound), ``k_plus`` / ``k_minus`` (guesses; default all,
    half each), ``calibrate`` (score against the run's initial model), ``model`` / ``system_prompt`` (the run's).
    """

    def __init__(self, ids: Sequence[int] | None = (0,), m: int = 64, format: str = DEFAULT_AUDIT_FORMAT,
                 prompt: str = DEFAULT_PROMPT, insertions: int = 1, delta: float = 1e-5, confidence: float = 0.95,
                 k_plus: int | None = None, k_minus: int | None = None, calibrate: bool = True,
                 model: str | None = None, system_prompt: str | None = None, num_clients: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(ids=ids, format=format, prompt=prompt, insertions=[1], per_count=0, model=model,
                         system_prompt=system_prompt, num_clients=num_clients, seed=seed)
        if insertions < 1 or not 0 < delta < 1 or not 0 < confidence < 1:
            raise ConfigError("config key 'attack.adversary': lm-dp-audit needs insertions >= 1, 0 < delta < 1, "
                              "0 < confidence < 1")
        self.audit_canaries, self.included = lm_canaries(int(m), format, prompt, int(insertions), seed)
        self.delta, self.confidence, self.k_plus, self.k_minus = float(delta), float(confidence), k_plus, k_minus
        self.calibrate = bool(calibrate)
        self._ref_px: np.ndarray | None = None  # the reference model's Px (fixed for the run)

    def pairs(self) -> list[tuple[str, str]]:
        """The included canaries, ``insertions`` copies each (the excluded ones are never planted)."""
        return [(c.prompt, c.text) for c, inc in zip(self.audit_canaries, self.included) if inc
                for _ in range(c.insertions)]

    def evaluate(self, model: nn.Module, task: Any) -> dict[str, Any]:
        self._check_task(task)
        if self.calibrate and self._ref_px is None:
            with torch.random.fork_rng():  # build_model seeds torch; the run's own random stream is left as it was
                self._ref_px = canary_nll(task.build_model(), task, self.audit_canaries)  # w_0: the run's initial model
        res, _ = audit_lm_canaries(model, task, self.audit_canaries, self.included, self.delta,
                                   self._ref_px if self.calibrate else None, self.confidence, self.k_plus, self.k_minus)
        return {"lm_audit_eps_lower_bound": res.eps_lower_bound, "lm_audit_correct": res.correct,
                "lm_audit_guesses": res.guesses, "lm_audit_canaries": res.m,
                "lm_audit_records_per_canary": self.audit_canaries[0].insertions}
