"""DAGER on decoder LoRA updates: exact token and sequence recovery from what a causal-LM client sends.

Petrov, Dimitrov, Baader, Müller, Vechev, "DAGER: Exact Gradient Inversion for Large Language
Models", NeurIPS 2024 (released code: insait-institute/dager-gradient-inversion), adapted to the
update of a secfed LoRA client.

**The span property.** A LoRA layer computes ``Y = X W0^T + s X A^T B^T`` on the layer's inputs
``X`` (one row per token position). Its gradients are ``dL/dA = s B^T dY^T X`` and
``dL/dB = s dY^T X A^T``, so

* every row of ``dA`` lies in ``span{x_t}`` (the rows of X), and ``rank(dA) <= r``;
* every row of ``dB`` lies in ``span{A x_t}`` (an r-dimensional space).

q_proj, k_proj and v_proj read the same input, so their ``dA`` rows are stacked (rank ``<= 3r``;
``2r`` with the default targets q, v). Plain SGD keeps the property over several local steps
(the update is a sum of such gradients); Adam's per-coordinate normalisation destroys it.

**Rank bound (what this attack can and cannot do).** The span of ``dA`` equals the span of the
inputs only if the number of *distinct* inputs that reach the loss is at most the stacked rank
(2r for q+v). Otherwise the observed span is a strict subspace and the true inputs are, in
general, not in it: exact recovery is impossible, which is the defence rank gives. Layer 0 of a
Llama model has no position in its input (RoPE is applied after the projection), so its inputs
are ``RMSNorm(E[v])``: the bound counts distinct tokens. Layer 1's inputs depend on the whole
prefix, so there the bound counts distinct prefixes (about the batch's token count). The final
token of each sequence (EOS) has no loss term after it and never appears in the update.

**B = 0 at initialisation.** PEFT starts with ``B = 0``, so the first local step's ``dA`` is 0.
The ``dB`` path is used then (informative only while the number of distinct inputs is below r);
from the second local step or round on, ``dA`` carries the inputs.

**The attack** (Sec. 4-5 of the paper):

1. token recovery: the span check of every vocabulary token's layer-0 input against the layer-0
   span (relative distance below ``tau``) gives the batch's token set ``T*``;
2. sequence recovery, layer by layer (decoders are causal, so the layer-1 input at position i is a
   function of the prefix ``v_0 .. v_i`` only): starting from the tokens of ``T*`` whose layer-1
   input at position 0 is in the layer-1 span, every prefix is extended by every token of ``T*``
   and kept if its new layer-1 input is in the span; a prefix no extension of which passes is a
   finished sequence. The layer-1 input of a candidate is computed incrementally (the prefix's
   keys and values are cached), with the global model the server holds.

With several local steps the layer-1 inputs drift with the client's own layer-0 adapter, so
recovery at layer 1 is then approximate (the paper's FedAvg setting); layer 0 stays exact.
"""

from __future__ import annotations

import re
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attacks.inversion.text import content_tokens, rouge_n, split_update
from secfed.needs import Need

LLAMA_LORA_RE = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
                           r"\.lora_([AB])(?:\.default)?\.weight$")
ATTN_INPUT = ("q_proj", "k_proj", "v_proj")  # the modules that read a layer's input_layernorm output


# ----------------------------------------------------------------------------- the update's LoRA pieces

def lora_layers(names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                delta: torch.Tensor) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """``{layer: {"q_proj": {"A": dA, "B": dB}, ...}}`` for every LoRA factor of a decoder's update."""
    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for n, p in split_update(names, shapes, delta).items():
        m = LLAMA_LORA_RE.search(n)
        if m:
            out.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = p
    return out


def lora_factors(model: nn.Module) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """The global model's LoRA factors, ``{layer: {module: {"A": A, "B": B}}}`` (dB path, noise floors)."""
    out: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for n, p in model.named_parameters():
        m = LLAMA_LORA_RE.search(n)
        if m:
            out.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = p.detach()
    return out


def rounding_floor(delta: torch.Tensor, weight: torch.Tensor | None) -> float:
    """Singular-value floor of an update that is a difference of stored weights.

    ``w_after - w_before`` in a float format carries rounding errors of about ``eps * |w|`` per
    entry, whose singular values reach ``eps * max|w| * (sqrt(rows) + sqrt(cols))``: directions
    below that are noise, not inputs (a module whose whole update is below it says nothing)."""
    if weight is None or not weight.numel():
        return 0.0
    eps = torch.finfo(delta.dtype).eps if delta.is_floating_point() else 0.0
    return float(eps * weight.abs().max() * (math.sqrt(delta.shape[0]) + math.sqrt(delta.shape[1])))


def row_space_above(M: torch.Tensor, rel_tol: float, floor: float) -> torch.Tensor:
    """Orthonormal basis (cols) of the row space of M: singular values above ``max(rel_tol * s_max, floor)``."""
    if M.numel() == 0:
        return torch.zeros(M.shape[-1], 0, dtype=torch.float64)
    _, sv, vh = torch.linalg.svd(M.double(), full_matrices=False)
    cut = max(rel_tol * float(sv[0]), floor)
    k = int((sv > cut).sum()) if float(sv[0]) > 0 else 0
    return vh[:k].T


@dataclass
class SpanTest:
    """The span checks of one layer's attention input: ``(projection or None, orthonormal basis)``.

    ``mode``: ``"A"`` (stacked dA rows, basis in the input space), ``"B"`` (dB rows, basis in
    ``A``'s image; the candidate is projected by ``A`` first) or ``"none"`` (nothing usable).
    ``dim``: dimension of the observed span; ``bound``: the most it can be (stacked rank).
    """

    checks: list[tuple[torch.Tensor | None, torch.Tensor]] = field(default_factory=list)
    mode: str = "none"
    dim: int = 0
    bound: int = 0

    @property
    def informative(self) -> bool:
        return bool(self.checks)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Worst relative distance ``||z - Q Q^T z|| / ||z||`` over the checks, per row of ``x`` (float64)."""
        x = x.double()
        worst = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for proj, basis in self.checks:
            z = x if proj is None else x @ proj.T
            nz = (z * z).sum(1)
            pz = z @ basis
            rel = ((nz - (pz * pz).sum(1)).clamp_min(0) / nz.clamp_min(1e-300)).sqrt()
            rel = torch.where(nz > 1e-20, rel, torch.ones_like(rel))  # a zero input (e.g. a padding row) is no evidence
            worst = torch.maximum(worst, rel)
        return worst


def span_test(layer: dict[str, dict[str, torch.Tensor]], factors: dict[str, dict[str, torch.Tensor]], hidden: int,
              rel_tol: float = 1e-5) -> SpanTest:
    """DAGER's check for one layer: stacked ``dA`` when it is above the rounding floor and of
    ``rank < hidden``, else the dB path (rows in ``span{A x}``, informative while ``rank < r``).
    ``factors``: the global model's factors of this layer."""
    mods = [m for m in ATTN_INPUT if m in layer]
    dAs = []
    for m in mods:
        if "A" in layer[m]:
            floor = rounding_floor(layer[m]["A"], factors.get(m, {}).get("A"))
            if float(torch.linalg.matrix_norm(layer[m]["A"].double(), ord=2)) > floor:
                dAs.append((layer[m]["A"], floor))
    if dAs:
        stacked = torch.cat([d.double() for d, _ in dAs])
        basis = row_space_above(stacked, rel_tol, max(f for _, f in dAs))
        if 0 < basis.shape[1] < hidden:
            return SpanTest([(None, basis.to(stacked.device))], "A", basis.shape[1], min(hidden, stacked.shape[0]))
    checks, dim, bound = [], 0, 0
    for m in mods:
        A = factors.get(m, {}).get("A")
        if "B" not in layer[m] or A is None:
            continue
        r = layer[m]["B"].shape[1]
        basis = row_space_above(layer[m]["B"], rel_tol, rounding_floor(layer[m]["B"], factors[m].get("B")))
        if 0 < basis.shape[1] < r:
            checks.append((A.double(), basis.to(A.device)))
            dim, bound = max(dim, basis.shape[1]), r
    return SpanTest(checks, "B" if checks else "none", dim, bound)


# ----------------------------------------------------------------------------- the decoder's first layer

def llama_body(model: nn.Module) -> nn.Module:
    """The Llama-family body (``embed_tokens``, ``layers``, ``rotary_emb``) inside a PEFT or HF model."""
    for mod in model.modules():
        if all(hasattr(mod, a) for a in ("embed_tokens", "layers", "rotary_emb")):
            return mod
    raise ValueError("DAGER here needs a Llama-family decoder (embed_tokens, layers, rotary_emb)")


class FirstLayer:
    """Layer 0 of a Llama decoder, run by hand so that a prefix's keys and values can be reused.

    ``token_inputs(v)`` is layer 0's attention input ``RMSNorm_0(E[v])`` (no position: RoPE comes
    after the projection); ``prefix(ids)`` and ``extend(...)`` give layer 1's attention input
    ``RMSNorm_1(h_0)`` at every position of a prefix and at one appended position. It uses the
    modules of the model (so the global LoRA adapter of layer 0 is applied) and matches the
    model's own forward (tested).
    """

    def __init__(self, model: nn.Module) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        body = llama_body(model)
        if len(body.layers) < 2:
            raise ValueError("DAGER's sequence step needs at least 2 decoder layers")
        self.body, self.l0, self.norm1 = body, body.layers[0], body.layers[1].input_layernorm
        att = self.l0.self_attn
        cfg = body.config
        self.nh, self.nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(att, "head_dim", cfg.hidden_size // self.nh)
        self.scaling = getattr(att, "scaling", self.hd ** -0.5)
        self.rope = apply_rotary_pos_emb
        self.hidden = cfg.hidden_size

    @property
    def device(self) -> torch.device:
        return self.body.embed_tokens.weight.device

    @torch.no_grad()
    def token_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.l0.input_layernorm(self.body.embed_tokens(tokens.to(self.device)))

    def _qkv(self, ids: torch.Tensor, start: int) -> tuple[torch.Tensor, ...]:
        """(residual, q (N,nh,T,hd), k, v (N,nkv,T,hd)) of tokens ``ids`` (N,T) at positions start.."""
        x = self.body.embed_tokens(ids)
        hn = self.l0.input_layernorm(x)
        n, t = ids.shape
        att = self.l0.self_attn
        q = att.q_proj(hn).view(n, t, -1, self.hd).transpose(1, 2)
        k = att.k_proj(hn).view(n, t, -1, self.hd).transpose(1, 2)
        v = att.v_proj(hn).view(n, t, -1, self.hd).transpose(1, 2)
        pos = torch.arange(start, start + t, device=ids.device).unsqueeze(0).expand(n, t)
        cos, sin = self.body.rotary_emb(hn, pos)
        q, k = self.rope(q, k, cos, sin)
        return x, q, k, v

    def _out(self, x: torch.Tensor, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention output -> o_proj -> residual -> MLP -> residual -> layer 1's input norm."""
        rep = self.nh // self.nkv
        o = probs @ v.repeat_interleave(rep, dim=1)  # (N, nh, T, hd)
        n, _, t, _ = o.shape
        h = x + self.l0.self_attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
        h = h + self.l0.mlp(self.l0.post_attention_layernorm(h))
        return self.norm1(h)

    @torch.no_grad()
    def prefix(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer-1 inputs ``(N, T, h)`` of prefixes ``ids`` (N, T), and their layer-0 keys and values."""
        ids = ids.to(self.device)
        x, q, k, v = self._qkv(ids, 0)
        rep = self.nh // self.nkv
        scores = (q @ k.repeat_interleave(rep, dim=1).transpose(-1, -2)) * self.scaling
        t = ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self._out(x, probs, v), k, v

    @torch.no_grad()
    def extend(self, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Layer-1 input at the appended position of ``prefix[rows] + [token]`` for each pair, shape (C, h)."""
        rows, tokens = rows.to(self.device), tokens.to(self.device)
        start = k.shape[2]
        x, q, kn, vn = self._qkv(tokens.unsqueeze(1), start)
        keys = torch.cat([k[rows], kn], dim=2)
        vals = torch.cat([v[rows], vn], dim=2)
        rep = self.nh // self.nkv
        probs = ((q @ keys.repeat_interleave(rep, dim=1).transpose(-1, -2)) * self.scaling).softmax(-1)
        return self._out(x, probs, vals)[:, 0]


# ----------------------------------------------------------------------------- the attack

@dataclass
class DagerResult:
    tokens: list[int]                      # T*: tokens passing the layer-0 check
    sequences: list[list[int]]             # recovered sequences (each without its final token)
    layer0: SpanTest
    layer1: SpanTest
    status: str
    truncated: bool = False                # the beam hit max_beam (recovery may have lost sequences)
    scores: list[float] = field(default_factory=list)  # mean layer-1 distance of each sequence


def recover_tokens(first: FirstLayer, test: SpanTest, vocab: int, tau: float, chunk: int = 8192) -> tuple[list[int], torch.Tensor]:
    """Step 1: every vocabulary token whose layer-0 input lies in the layer-0 span (distance < tau)."""
    d = torch.cat([test.distance(first.token_inputs(torch.arange(s, min(s + chunk, vocab))))
                   for s in range(0, vocab, chunk)])
    return torch.nonzero(d < tau).flatten().tolist(), d


def recover_sequences(first: FirstLayer, test: SpanTest, tokens: list[int], max_length: int, tau: float,
                      max_beam: int = 256, chunk: int = 1024) -> tuple[list[list[int]], list[float], bool]:
    """Step 2: grow prefixes token by token, keeping those whose layer-1 input lies in the layer-1 span.

    Returns the finished sequences sorted by their mean layer-1 distance (best first; the paper
    keeps the best B), those distances, and whether the beam was cut at ``max_beam``. Prefixes that
    reach ``max_length`` are dropped (see below)."""
    cand = torch.tensor(tokens, dtype=torch.long)
    if len(cand) == 0:
        return [], [], False
    x1, _, _ = first.prefix(cand.unsqueeze(1))
    d = test.distance(x1[:, 0]).cpu()
    keep = torch.nonzero(d < tau).flatten()
    truncated = len(keep) > max_beam
    keep = keep[torch.argsort(d[keep])][:max_beam]
    beam, score = cand[keep].unsqueeze(1), d[keep]
    finished: list[tuple[list[int], float]] = []
    while len(beam) and beam.shape[1] < max_length:
        _, k, v = first.prefix(beam)
        rows = torch.arange(len(beam)).repeat_interleave(len(cand))
        nxt = cand.repeat(len(beam))
        d = torch.cat([test.distance(first.extend(k, v, rows[s : s + chunk], nxt[s : s + chunk])).cpu()
                       for s in range(0, len(rows), chunk)])
        ok = torch.nonzero(d < tau).flatten()
        extended = set(rows[ok].tolist())
        length = beam.shape[1]
        finished += [(beam[i].tolist(), float(score[i]) / length) for i in range(len(beam)) if i not in extended]
        new_score = score[rows[ok]] + d[ok]
        if len(ok) > max_beam:
            truncated = True
            best = torch.argsort(new_score)[:max_beam]
            ok, new_score = ok[best], new_score[best]
        beam, score = torch.cat([beam[rows[ok]], nxt[ok].unsqueeze(1)], dim=1), new_score
    # a prefix still growing at max_length is not a sequence of the batch: a true one holds at most
    # max_length - 1 recoverable tokens (its last, EOS, is never in the update). Such prefixes are
    # fixed points like a repeated token (identical keys and values give identical hidden states).
    finished.sort(key=lambda f: f[1])
    return [f[0] for f in finished], [f[1] for f in finished], truncated


def dager_lm(model: nn.Module, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], delta: torch.Tensor,
             max_length: int, tau: float = 0.05, tau_sequence: float = 0.01, rel_tol: float = 1e-5,
             max_beam: int = 256, keep: int | None = None, layer0_only: bool = False) -> DagerResult:
    """DAGER on one client's LoRA update. ``model`` holds the global weights the client started from.

    ``tau`` / ``tau_sequence``: relative span distance under which a token (layer 0) / a prefix
    (layer 1) is accepted; ``rel_tol``: singular values above ``rel_tol * max`` make the span
    (float32 updates have a noise floor near 1e-6); ``keep``: how many finished sequences to return
    (the batch size; None = all, best first)."""
    layers = lora_layers(names, shapes, delta.detach())
    first = FirstLayer(model)
    factors = lora_factors(model)
    tests = [span_test(layers.get(i, {}), factors.get(i, {}), first.hidden, rel_tol) for i in (0, 1)]
    if not tests[0].informative:
        return DagerResult([], [], tests[0], tests[1], "not run: layer 0 has no informative LoRA factor "
                           "(needs q/k/v_proj with dA != 0 of rank < hidden, or dB of rank < r)")
    vocab = first.body.embed_tokens.weight.shape[0]
    tokens, _ = recover_tokens(first, tests[0], vocab, tau)
    if layer0_only or not tokens:
        return DagerResult(tokens, [], tests[0], tests[1], "tokens only" if tokens else "no token passed")
    if not tests[1].informative:
        return DagerResult(tokens, [], tests[0], tests[1], "tokens only: layer 1 has no informative LoRA factor")
    seqs, scores, truncated = recover_sequences(first, tests[1], tokens, max_length, tau_sequence, max_beam)
    if keep is not None:  # the attacker knows the batch size (a shared hyper-parameter): keep the best `keep`
        seqs, scores = seqs[:keep], scores[:keep]
    return DagerResult(tokens, seqs, tests[0], tests[1], "ok", truncated, scores)


# ----------------------------------------------------------------------------- metrics

def match_sequences(truth: list[list[int]], found: list[list[int]], special: set[int]) -> dict[str, float]:
    """Per true sequence (content tokens, special tokens dropped): exact if some recovered sequence
    equals it, ROUGE-1/2 F1 of the best-matching recovered sequence (DAGER's per-sentence matching);
    token precision/recall of the token sets."""
    refs = [r for r in (content_tokens(t, special) for t in truth) if r]
    hyps = [content_tokens(f, special) for f in found]
    if not refs:  # nothing to recover (the client trained on no record): undefined, not a perfect or a zero score
        return {"exact": None, "rouge1": None, "rouge2": None, "token_recall": None,
                "token_precision": 0.0 if any(hyps) else None}
    exact, r1, r2 = [], [], []
    for ref in refs:
        exact.append(float(any(h == ref for h in hyps)))
        best = max(hyps, key=lambda h: (rouge_n(ref, h, 2), rouge_n(ref, h, 1)), default=[])
        r1.append(rouge_n(ref, best, 1))
        r2.append(rouge_n(ref, best, 2))
    true_set = {t for r in refs for t in r}
    found_set = {t for h in hyps for t in h}
    tp = len(true_set & found_set)
    n = len(refs)
    return {"exact": sum(exact) / n, "rouge1": sum(r1) / n, "rouge2": sum(r2) / n,
            "token_recall": tp / len(true_set),
            "token_precision": tp / len(found_set) if found_set else 0.0}


def distinct_inputs(truth: list[list[int]]) -> tuple[int, int]:
    """(distinct tokens, distinct prefixes) over the positions that reach the loss (all but each last token):
    the counts the rank bound compares with the stacked LoRA rank at layer 0 and at layer 1."""
    toks = {t for seq in truth for t in seq[:-1]}
    prefixes = {tuple(seq[: i + 1]) for seq in truth for i in range(len(seq) - 1)}
    return len(toks), len(prefixes)


def summarise(res: DagerResult, truth: list[list[int]], special: set[int]) -> dict[str, Any]:
    """Exact / ROUGE from the recovered sequences; token recall / precision from the layer-0 token set T*."""
    m: dict[str, Any] = match_sequences(truth, res.sequences, special)
    tokens = match_sequences(truth, [res.tokens], special)
    m.update(token_recall=tokens["token_recall"], token_precision=tokens["token_precision"] if res.tokens else 0.0)
    tok, pre = distinct_inputs(truth)
    status = res.status if m["exact"] is not None else \
        "nothing to recover: the client trained on no record this round (e.g. an empty Poisson batch)"
    m.update(status=status, span_mode=res.layer0.mode, span_dim0=res.layer0.dim, span_dim1=res.layer1.dim,
             span_bound=res.layer0.bound, distinct_tokens=tok, distinct_prefixes=pre, truncated=res.truncated,
             recovered=len(res.sequences))
    return m


def describe_bound(rank_bound: int, tokens: int, prefixes: int) -> str:
    """One line on whether exact recovery is possible at all under the rank bound."""
    if tokens > rank_bound:
        return f"impossible: {tokens} distinct tokens > stacked rank {rank_bound} (layer 0)"
    if prefixes > rank_bound:
        return f"tokens only: {prefixes} distinct prefixes > stacked rank {rank_bound} (layer 1)"
    return f"possible: {tokens} tokens, {prefixes} prefixes <= stacked rank {rank_bound}"


__all__ = ["DagerObserver", "DagerResult", "FirstLayer", "SpanTest", "dager_lm", "describe_bound", "distinct_inputs", "lora_layers",
           "match_sequences", "recover_sequences", "recover_tokens", "span_test", "summarise"]


# ----------------------------------------------------------------------------- observer

class DagerObserver:
    """``dager``: a curious server running DAGER on the LoRA updates of a causal-LM run.

    Threat model as for ``dlg``/``text-inversion``: the server knows the global weights and the
    shared training hyper-parameters and sees what the secure sum revealed. Under SecAgg+ / CKKS
    there is no per-client update and the observer reports ``dager_status = "blocked: ..."``
    (nothing to attack). Adam/AdamW clients: not run (the update is not in the inputs' span).
    The true batch (what the client's trainer reported using: the engine's evaluation record,
    :mod:`secfed.truth`; a group row is scored against all its members) is read for metrics only. Per round it
    returns ``dager_exact`` (fraction of the attacked batches' sequences recovered exactly, special
    tokens excluded), ``dager_rouge1``/``dager_rouge2`` (best match per sequence),
    ``dager_token_recall``/``dager_token_precision``, the span dimensions and the rank bound
    (``dager_span_bound``, ``dager_distinct_tokens``, ``dager_distinct_prefixes``). Config::

        [[server.observers]]
        name = "dager"
        attack_rounds = [2]     # round 1 starts from B = 0 (only the dB path)
        max_clients = 1
    """

    needs = Need.ROWS | Need.GROUND_TRUTH  # each update; scored against what the clients trained on (secfed.truth)

    def __init__(self, attack_rounds: list[int] | None = None, clients: list[int] | None = None, max_clients: int = 1,
                 tau: float = 0.05, tau_sequence: float = 0.01, rel_tol: float = 1e-5, max_beam: int = 256,
                 optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0, seed: int = 0) -> None:
        from secfed.errors import ConfigError

        if tau <= 0 or tau_sequence <= 0:
            raise ConfigError("config key 'server.observers.tau': must be > 0")
        self.rounds, self.clients, self.max_clients = list(attack_rounds or []), list(clients or []), max_clients
        self.tau, self.tau_sequence, self.rel_tol, self.max_beam = tau, tau_sequence, rel_tol, max_beam
        self.optimizer, self.momentum, self.weight_decay = optimizer, momentum, weight_decay

    def __call__(self, view: Any, ctx: Any, truth: Any = None) -> dict[str, Any] | None:
        from pathlib import Path

        from secfed.interfaces import GroupId
        from attacks.inversion.common import NO_TRUTH, attacked_rows, missing_truth, model_before

        if self.rounds and view.round not in self.rounds:
            return None
        task = view.task
        if not getattr(task, "decoder_token_inputs", False):
            return {"dager_exact": None, "dager_status": "not a causal-LM task (use text-inversion)"}
        if view.updates is None:
            return {"dager_exact": None, "dager_status": "blocked: no per-client update (secure sum)"}
        if self.optimizer != "sgd":
            return {"dager_exact": None, "dager_status": f"not run: client optimizer {self.optimizer} normalises "
                    "per coordinate (the update is not in the inputs' span); needs client.optimizer = 'sgd'"}
        if missing_truth(truth):
            return {"dager_exact": None, "dager_status": NO_TRUTH}
        model = model_before(view)
        ids, chosen = attacked_rows(view, truth, self.clients, self.max_clients)
        special = set(task.tokenizer.all_special_ids)
        rows: list[dict[str, Any]] = []
        record = truth  # the engine's evaluation record; ``truth`` below: one row's true sequences
        for cid in chosen:
            truth = [row[m.bool()].tolist() for o in record.of(cid)  # what the trainer(s) reported using
                     for row, m in zip(o.batch()["input_ids"], o.batch()["attention_mask"])]
            res = dager_lm(model, view.spec.names, view.spec.shapes, view.updates[ids.index(cid)],
                           task.cfg.data.max_length, tau=self.tau, tau_sequence=self.tau_sequence,
                           rel_tol=self.rel_tol, max_beam=self.max_beam, keep=max(len(truth), 1))
            m = summarise(res, truth, special)
            rows.append(m)
            if ctx.run_dir is not None:
                tok = task.tokenizer
                name = str(cid) if isinstance(cid, GroupId) else f"client{cid}"
                path = Path(ctx.run_dir) / "attacks" / f"dager_round{view.round}_{name}.txt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"status: {res.status}\n"
                                + "".join(f"recovered: {tok.decode(s)}\n" for s in res.sequences)
                                + (f"tokens: {' '.join(tok.convert_ids_to_tokens(res.tokens))}\n" if not res.sequences else "")
                                + "".join(f"original: {tok.decode(t)}\n" for t in truth)
                                + f"metrics: { {k: v for k, v in m.items()} }\n", encoding="utf-8")
        scored = [r for r in rows if r.get("exact") is not None]  # clients that trained on something this round
        out: dict[str, Any] = {"dager_clients": len(rows), "dager_clients_scored": len(scored),
                               "dager_status": (scored or rows)[0]["status"] if rows else "no client"}
        for k in ("exact", "rouge1", "rouge2", "token_recall", "token_precision", "span_dim0", "span_dim1",
                  "span_bound", "distinct_tokens", "distinct_prefixes"):
            vals = [float(r[k]) for r in rows if r.get(k) is not None]
            out[f"dager_{k}"] = float(sum(vals) / len(vals)) if vals else None
        if self.momentum or self.weight_decay:
            out["dager_note"] = "momentum / weight decay add non-span terms: distances grow"
        return out
