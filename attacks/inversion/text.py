"""Token leakage from transformer and LoRA updates: FILM's bag of words and DAGER's span check.

* Bag of words (FILM, Gupta et al., NeurIPS 2022; also DAGER, Petrov et al. 2024):
  when the word-embedding matrix is trained, its gradient (and the update, under
  SGD *or* Adam, which leave untouched rows at exactly zero) is non-zero only in
  the rows of the tokens in the batch. Under additive noise, rows are kept whose
  squared norm exceeds the noise floor ``sigma^2 (h + 6 sqrt(2h))``, with ``sigma``
  estimated from the median row (most rows are noise only).
* Span check (DAGER, Petrov et al. 2024, Sec. 4): the gradient of a linear layer
  ``W x_t`` is ``sum_t delta_t x_t^T``, so its rows lie in ``span{x_t}``, the layer's
  inputs. For LoRA, ``W = W0 + s B A`` gives ``dA = s B^T sum_t delta_t x_t^T`` (rows in
  ``span{x_t}``, used when B != 0) and ``dB = s sum_t delta_t (A x_t)^T`` (rows in
  ``span{A x_t}``, informative when the rank r exceeds the number of tokens). In the
  first layer ``x_t = LayerNorm(E[v_t] + P[t] + T[0])`` is known for every vocabulary
  token ``v`` and position ``t``, so testing each candidate's distance to those spans
  recovers the token *and* its position (hence the order, for batch size 1).
  It needs ``rank(dA) < h`` and the number of tokens below the LoRA rank (or 2r,
  with query and value stacked); SGD keeps the structure, Adam's elementwise
  normalisation destroys it (the observer reports that).

Metrics: token precision/recall of the token *sets* (special tokens excluded),
ROUGE-1/2 F1 of the recovered sequence (n-gram overlap with clipped counts, Lin
2004), and exact-sequence rate. ``TextInversionObserver`` (registry ``text-inversion``)
runs both on the updates a curious server received.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.inversion.common import NO_TRUTH, attacked_rows, missing_truth, model_before
from secfed.errors import ConfigError
from secfed.interfaces import GroupId, RoundContext, ServerView
from secfed.needs import Need
from secfed.truth import GroundTruth

LORA_RE = re.compile(r"layer\.0\.attention\.self\.(query|key|value)\.lora_([AB])(?:\.default)?\.weight$")


# ----------------------------------------------------------------------------- pieces of an update

def split_update(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    sizes = [math.prod(s) for s in shapes]
    return {n: p.view(s) for n, s, p in zip(names, shapes, torch.split(flat, sizes))}


def embedding_piece(pieces: dict[str, torch.Tensor]) -> torch.Tensor | None:
    for n, p in pieces.items():
        if n.endswith("word_embeddings.weight"):
            return p
    return None


def first_layer_lora(pieces: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"query": {"A": dA, "B": dB}, ...}`` for the LoRA factors of layer 0."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n, p in pieces.items():
        m = LORA_RE.search(n)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = p
    return out


def bert_embeddings(model: nn.Module) -> nn.Module:
    for mod in model.modules():
        if hasattr(mod, "word_embeddings") and hasattr(mod, "position_embeddings") and hasattr(mod, "LayerNorm"):
            return mod
    raise ValueError("no BERT-style embeddings module (word/position embeddings + LayerNorm) in the model")


# ----------------------------------------------------------------------------- FILM bag of words

def bag_of_words(emb_update: torch.Tensor, noisy: bool = False) -> list[int]:
    """Token ids whose embedding rows changed. ``noisy``: keep rows above the estimated noise floor."""
    sq = (emb_update.double() ** 2).sum(1)
    if not noisy:
        return torch.nonzero(sq > 0).flatten().tolist()
    h = emb_update.shape[1]
    sigma2 = float(sq.median()) / h
    return torch.nonzero(sq > sigma2 * (h + 6 * math.sqrt(2 * h))).flatten().tolist()


# ----------------------------------------------------------------------------- DAGER span check

def row_space(M: torch.Tensor, rel_tol: float = 1e-3) -> torch.Tensor:
    """Orthonormal basis ``(dim, k)`` of the row space of ``M``: singular values > rel_tol * max."""
    if M.numel() == 0 or float(M.abs().max()) == 0:
        return torch.zeros(M.shape[-1], 0, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(M.double(), full_matrices=False)
    k = int((s > rel_tol * s[0]).sum())
    return vh[:k].T


def span_distance(X: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Relative distance ``||x - P x|| / ||x||`` of each row of X to the span of ``basis``."""
    X = X.double()
    proj = (X @ basis) @ basis.T
    return (X - proj).norm(dim=1) / X.norm(dim=1).clamp_min(1e-12)


class SpanCheck:
    """DAGER's first-layer test for every (token, position) from a LoRA (or full) layer-0 update."""

    def __init__(self, model: nn.Module, lora: dict[str, dict[str, torch.Tensor]], lora_A: dict[str, torch.Tensor],
                 rel_tol: float = 1e-3) -> None:
        self.emb = bert_embeddings(model)
        self.checks: list[tuple[torch.Tensor | None, torch.Tensor]] = []  # (projection A or None, basis)
        h = self.emb.word_embeddings.weight.shape[1]
        for mod, parts in lora.items():
            if "A" in parts:
                basis = row_space(parts["A"], rel_tol)
                if 0 < basis.shape[1] < h:
                    self.checks.append((None, basis))
            if "B" in parts and mod in lora_A:
                r = parts["B"].shape[1]
                basis = row_space(parts["B"], rel_tol)
                if 0 < basis.shape[1] < r:
                    self.checks.append((lora_A[mod].detach().double(), basis))

    @property
    def informative(self) -> bool:
        return bool(self.checks)

    @torch.no_grad()
    def inputs(self, position: int, tokens: torch.Tensor) -> torch.Tensor:
        """``LayerNorm(E[v] + P[position] + T[0])`` for each token v (the first layer's input)."""
        e = self.emb
        x = e.word_embeddings.weight[tokens] + e.position_embeddings.weight[position]
        if hasattr(e, "token_type_embeddings"):
            x = x + e.token_type_embeddings.weight[0]
        return e.LayerNorm(x)

    @torch.no_grad()
    def distances(self, position: int, tokens: torch.Tensor) -> torch.Tensor:
        """The worst (largest) relative distance over all checks, per candidate token.

        With an orthonormal basis Q, ``||x - Q Q^T x||^2 = ||x||^2 - ||Q^T x||^2`` (float32;
        the residual floor ~3e-4 is far below the threshold ``tau``)."""
        x = self.inputs(position, tokens)
        worst = torch.zeros(len(tokens))
        for A, basis in self.checks:
            z = x if A is None else x @ A.T.float()
            nz = (z * z).sum(1)
            pz = z @ basis.float()
            rel = ((nz - (pz * pz).sum(1)).clamp_min(0) / nz.clamp_min(1e-30)).sqrt()
            worst = torch.maximum(worst, rel)
        return worst


def dager(model: nn.Module, check: SpanCheck, max_length: int, candidates: list[int] | None = None,
          tau: float = 0.05, batch_size: int = 1, chunk: int = 8192) -> list[list[int]]:
    """Tokens passing the span check at each position 0, 1, ... (stops at the first empty position).

    ``candidates`` restricts the vocabulary (e.g. to FILM's bag of words). With batch
    size 1, the best token per position is kept; otherwise up to ``batch_size``.
    """
    vocab = check.emb.word_embeddings.weight.shape[0]
    cand = torch.tensor(candidates if candidates is not None else range(vocab), dtype=torch.long)
    out: list[list[int]] = []
    for p in range(max_length):
        d = torch.cat([check.distances(p, cand[s : s + chunk]) for s in range(0, len(cand), chunk)])
        ok = torch.nonzero(d < tau).flatten()
        if len(ok) == 0:
            break
        ok = ok[torch.argsort(d[ok])][:batch_size]
        out.append(cand[ok].tolist())
    return out


# ----------------------------------------------------------------------------- metrics

def _ngrams(seq: list[int], n: int) -> Counter:
    return Counter(tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def rouge_n(ref: list[int], hyp: list[int], n: int) -> float:
    """ROUGE-N F1 (clipped n-gram counts)."""
    r, h = _ngrams(ref, n), _ngrams(hyp, n)
    overlap = sum((r & h).values())
    if not r or not h or overlap == 0:
        return 0.0
    p, rec = overlap / sum(h.values()), overlap / sum(r.values())
    return 2 * p * rec / (p + rec)


def token_metrics(true_tokens: set[int], found: set[int]) -> dict[str, float | None]:
    """Precision (0 when nothing was found) and recall of the token sets; recall is None when there was nothing
    to recover (the client trained on no record, e.g. an empty Poisson batch): not a perfect score."""
    tp = len(true_tokens & found)
    return {"token_precision": tp / len(found) if found else 0.0,
            "token_recall": tp / len(true_tokens) if true_tokens else None}


def content_tokens(ids: list[int], special: set[int]) -> list[int]:
    return [i for i in ids if i not in special]


# ----------------------------------------------------------------------------- one attack, plain function

def invert_text_update(model: nn.Module, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                       delta: torch.Tensor, max_length: int, batch_size: int = 1, noisy: bool = False,
                       tau: float = 0.05, rel_tol: float = 1e-3) -> dict[str, Any]:
    """Recover tokens from one client update. ``model`` holds the global weights.

    Returns ``{"bag": set of token ids or None, "sequence": [[ids at position 0], ...] or None,
    "method": ...}``.
    """
    pieces = split_update(names, shapes, delta)
    emb = embedding_piece(pieces)
    bag = set(bag_of_words(emb, noisy)) if emb is not None else None
    lora = first_layer_lora(pieces)
    seq = None
    if lora:
        params = dict(model.named_parameters())
        lora_A = {}
        for n in names:
            m = LORA_RE.search(n)
            if m and m.group(2) == "A":
                lora_A[m.group(1)] = params[n]
        check = SpanCheck(model, lora, lora_A, rel_tol)
        if check.informative:
            seq = dager(model, check, max_length, sorted(bag) if bag else None, tau, batch_size)
    method = "+".join(m for m, v in (("bag-of-words", bag), ("span-check", seq)) if v is not None) or "none"
    if bag is None and seq is not None:
        bag = {t for pos in seq for t in pos}
    return {"bag": bag, "sequence": seq, "method": method}


def score(result: dict[str, Any], true_ids: list[list[int]], special: set[int]) -> dict[str, float | None]:
    """Token precision/recall, ROUGE-1/2 and exact match of a recovery against the true batch."""
    truth = {t for row in true_ids for t in content_tokens(row, special)}
    found = {t for t in (result["bag"] or set()) if t not in special}
    m: dict[str, float | None] = dict(token_metrics(truth, found))
    seq = result["sequence"]
    if seq is not None and len(true_ids) == 1:
        hyp = content_tokens([pos[0] for pos in seq], special)
        ref = content_tokens(true_ids[0], special)
        m.update(rouge1=rouge_n(ref, hyp, 1), rouge2=rouge_n(ref, hyp, 2), exact=float(hyp == ref))
    else:
        m.update(rouge1=None, rouge2=None, exact=None)
    return m


# ----------------------------------------------------------------------------- observer

class TextInversionObserver:
    """``text-inversion``: a curious server recovering a client's tokens from its update.

    Per attacked client it writes ``<run_dir>/attacks/text_round<t>_client<i>.txt``
    with the recovered and the true text, and returns ``text_token_recall``,
    ``text_token_precision``, ``text_rouge1``, ``text_rouge2``, ``text_exact``. The
    true batch is what the client's trainer reported using (the engine's evaluation
    record, :mod:`secfed.truth`), for metrics only; a group row (group mode) is scored
    against all its members' examples. Config::

        [[server.observers]]
        name = "text-inversion"
        attack_rounds = [1]
        max_clients = 1
    """

    needs = Need.ROWS | Need.GROUND_TRUTH  # each update; scored against what the clients trained on (secfed.truth)

    def __init__(self, attack_rounds: list[int] | None = None, clients: list[int] | None = None, max_clients: int = 1,
                 tau: float = 0.05, noisy: bool = False, batch_size: int = 16, optimizer: str = "adam",
                 seed: int = 0) -> None:
        if tau <= 0:
            raise ConfigError("config key 'server.observers.tau': must be > 0")
        self.rounds, self.clients, self.max_clients = list(attack_rounds or []), list(clients or []), max_clients
        self.tau, self.noisy = tau, noisy
        self.batch_size, self.optimizer = batch_size, optimizer

    def __call__(self, view: ServerView, ctx: RoundContext, truth: GroundTruth | None = None) -> dict[str, Any] | None:
        if self.rounds and view.round not in self.rounds:
            return None
        task = view.task
        if not getattr(task, "text_encoder_inputs", False):
            return {"text_token_recall": None, "text_status": "not a text-classification task (token ids into an encoder)"}
        if view.updates is None:
            return {"text_token_recall": None, "text_status": "no per-client update"}
        if missing_truth(truth):
            return {"text_token_recall": None, "text_status": NO_TRUTH}
        model = model_before(view, eval_mode=False)
        ids, chosen = attacked_rows(view, truth, self.clients, self.max_clients)
        special = set(task.tokenizer.all_special_ids)
        rows: list[dict[str, Any]] = []
        for cid in chosen:
            owners = truth.of(cid)  # one client, or every member of a group (never one client for a group)
            single = len(owners) == 1 and len(owners[0].steps) == 1
            bs = int(owners[0].used().numel()) if single else self.batch_size
            res = invert_text_update(model, view.spec.names, view.spec.shapes, view.updates[ids.index(cid)],
                                     task.cfg.data.max_length, batch_size=max(bs, 1), noisy=self.noisy, tau=self.tau)
            if res["method"] == "none":  # nothing the attack could use: it did not run
                why = ("needs client.optimizer = sgd" if self.optimizer != "sgd" else "found no informative first-layer LoRA")
                res = {"bag": set(), "sequence": None,
                       "method": f"not run: no trained embeddings, and the span check {why}"}
            if res["method"] == "span-check" and self.optimizer != "sgd":
                # Adam's per-coordinate normalisation destroys the span structure: report nothing, not noise
                res = {"bag": set(), "sequence": None,
                       "method": f"not run: span check needs client.optimizer = sgd (the clients used {self.optimizer})"}
            true_ids = [row[m.bool()].tolist() for o in owners
                        for row, m in zip(o.batch()["input_ids"], o.batch()["attention_mask"])]
            m = score(res, true_ids, special)
            if res["method"].startswith("not run"):  # an attack that did not run reports nothing, never 0
                m = {k: None for k in m}
            m["method"] = res["method"]
            rows.append(m)
            if ctx.run_dir is not None:
                tok = task.tokenizer
                rec = (tok.decode([p[0] for p in res["sequence"]]) if res["sequence"] and len(true_ids) == 1
                       else " ".join(tok.convert_ids_to_tokens(sorted(res["bag"] or []))))
                name = str(cid) if isinstance(cid, GroupId) else f"client{cid}"
                path = Path(ctx.run_dir) / "attacks" / f"text_round{view.round}_{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"method: {res['method']}\nrecovered: {rec}\n" +
                                "".join(f"original: {tok.decode(t)}\n" for t in true_ids) +
                                f"metrics: {m}\n", encoding="utf-8")
        out: dict[str, Any] = {"text_clients": len(rows), "text_status": rows[0]["method"] if rows else "no client"}
        for k in ("token_recall", "token_precision", "rouge1", "rouge2", "exact"):
            vals = [r[k] for r in rows if r.get(k) is not None]
            out[f"text_{k}"] = float(np.mean(vals)) if vals else None
        return out
