"""The secret sharer: canaries planted in one client's data, and their exposure.

Carlini, Liu, Erlingsson, Kos & Song, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks", USENIX Security 2019.

A canary is a format with random slots, e.g. ``"my PIN is # # # # # #"`` (every
``#`` a uniformly random digit), filled once with a secret ``r`` and inserted
1, 4 or 16 times into one client's instruction data (as the response to a fixed
prompt). After (federated) training, the canary's *log-perplexity* is compared
with that of every other filling ``r'`` of the same format (the candidate space
``R``, here ``|R| = 10^slots``):

    rank(r)     = |{r' in R : Px(s[r']) <= Px(s[r])}|          (1 = the most likely)
    exposure(r) = log2 |R| - log2 rank(r)                       (Sec. 4, Def. 4)

Px is the sum of the token negative log-likelihoods of the response (its tokens
and eos; the prompt is shared by every candidate). A model that has not seen the
canary ranks it uniformly, so exposure is about log2(e) ~ 1.44 bits on average
(between 0 and a few bits); a model that memorised it gives up to log2 |R|.

Large spaces (Sec. 4.2, "Exposure estimation by distribution modeling"): ``m``
candidates are sampled uniformly, their log-perplexities are fitted by a
skew-normal distribution (the paper's choice), and

    exposure ~ -log2 P(X <= Px(s[r]))                            (skew-normal CDF)

capped at log2 |R| (the rank is at least 1). The sampled rank
``-log2((k + 1) / (m + 1))`` (``k`` samples below the canary) is reported as
well; it cannot exceed log2(m + 1), which is why the paper fits a distribution.
Spaces up to ``exact_limit`` candidates are enumerated (the exact rank). Canaries of one (prompt,
format) share one candidate set, so two controls cost little: never-inserted canaries of the same
format (their exposure on the trained model is chance, ~1.44 bits, unless training taught the model
something about the format itself), and each canary's exposure on the base model (adapter off: the
pretrained model's own liking for that PIN), whose difference to the trained exposure is what training
added.

Planting is a plug-in on the adversary seam (``attack.adversary = "secret-sharer"``,
``ids = [victim]``): the engine calls ``poison_data`` on the victim's shard each
round, which appends the canary records. The victim is an honest client whose
data happens to hold secrets; the run's round records count it as "malicious"
only because that is the seam. ``extraction`` PII records (names with phone
numbers, :mod:`attacks.memorisation.extraction`) can be planted by the same
plug-in (``pii``), so one run serves both attacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from attacks.poisoning.base import PoisoningAdversary
from secfed.data import TensorData
from secfed.errors import ConfigError
from secfed.interfaces import derive_seed

SLOT = "#"
DEFAULT_FORMAT = "my PIN is # # # # # #"
DEFAULT_PROMPT = "What is my secret note?"
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- canaries
def num_slots(fmt: str) -> int:
    return fmt.count(SLOT)


def fill(fmt: str, digits: Sequence[int]) -> str:
    """``fmt`` with each ``#`` replaced by the next digit."""
    parts = fmt.split(SLOT)
    if len(parts) - 1 != len(digits):
        raise ValueError(f"format {fmt!r} has {len(parts) - 1} slots, got {len(digits)} digits")
    return "".join(p + (str(int(d)) if i < len(digits) else "") for i, (p, d) in
                   enumerate(zip(parts, list(digits) + [0])))


@dataclass(frozen=True)
class Canary:
    """One planted secret: its prompt, format, digits and how often it is in the victim's data."""

    prompt: str
    fmt: str
    secret: tuple[int, ...]
    insertions: int

    @property
    def text(self) -> str:
        return fill(self.fmt, self.secret)

    @property
    def space_bits(self) -> float:
        return len(self.secret) * math.log2(10)


def make_canaries(fmt: str = DEFAULT_FORMAT, insertions: Sequence[int] = (1, 4, 16), per_count: int = 1,
                  prompt: str = DEFAULT_PROMPT, seed: int = 0) -> list[Canary]:
    """``per_count`` canaries per insertion count, each with its own seeded random digits, all distinct (two
    canaries with one secret would be one canary inserted their summed number of times)."""
    k = num_slots(fmt)
    if k < 1:
        raise ValueError(f"secret-sharer: format {fmt!r} has no '{SLOT}' slot")
    if len(insertions) * per_count > 10 ** k:
        raise ValueError(f"secret-sharer: format {fmt!r} has {10 ** k} fillings, fewer than the "
                         f"{len(insertions) * per_count} canaries asked for")
    taken: set[tuple[int, ...]] = set()
    return [Canary(prompt, fmt, _fresh_secret(np.random.default_rng(derive_seed(seed, "secret-sharer", n, j)), k, taken),
                   int(n)) for n in insertions for j in range(per_count)]


def _fresh_secret(rng: np.random.Generator, k: int, taken: set[tuple[int, ...]]) -> tuple[int, ...]:
    """The stream's next ``k`` digits not in ``taken`` (a repeat: the next draw; seeded, so still reproducible);
    added to ``taken``. The caller checks that the space has a free filling."""
    s = tuple(int(d) for d in rng.integers(0, 10, k))
    while s in taken:
        s = tuple(int(d) for d in rng.integers(0, 10, k))
    taken.add(s)
    return s


def records_for(pairs: Sequence[tuple[str, str]]) -> list[Any]:
    """(prompt, response) pairs -> :class:`secfed.instruct.Record` (plain instruction, no input)."""
    from secfed.instruct import Record

    return [Record([{"role": "user", "content": p, "_instruction": p, "_input": ""}], r) for p, r in pairs]


def encode_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any, max_length: int, system: str | None = None,
                 label_names: tuple[str, ...] | None = None) -> TensorData:
    """Encode (prompt, response) pairs exactly as the causal-LM task encodes its records."""
    from secfed.instruct import encode_records

    return encode_records(records_for(pairs), tokenizer, max_length, system, categories=label_names)


def append(data: TensorData, extra: TensorData) -> TensorData:
    """``data`` followed by ``extra`` (same tensors, same width)."""
    t = {k: torch.cat([v, extra.tensors[k].to(v.dtype)]) for k, v in data.tensors.items()}
    return TensorData(t, data.num_classes, data.label_names)


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def sequence_nll(model: nn.Module, task: Any, data: TensorData, batch_size: int = 64) -> np.ndarray:
    """Per example: the sum of the response tokens' negative log-likelihoods (nats), i.e. Px of the paper."""
    was = model.training
    model.eval()
    out = []
    for b in data.batches(batch_size, shuffle=False):
        nll, rows, _ = task.token_nll(model, b)
        n = len(b["lm_labels"])
        out.append(torch.zeros(n, dtype=torch.float64).index_add(0, rows.cpu(), nll.double().cpu()).numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0)


def candidate_nll(model: nn.Module, task: Any, canary: Canary, secrets: Sequence[Sequence[int]],
                  batch_size: int = 64) -> np.ndarray:
    """Px of each filling of the canary's format (same prompt), in order."""
    width = task.train.tensors["input_ids"].shape[1]
    pairs = [(canary.prompt, fill(canary.fmt, s)) for s in secrets]
    out = []
    for s in range(0, len(pairs), 1024):  # tokenise in chunks (a 10^6 space would not fit at once)
        enc = encode_pairs(pairs[s: s + 1024], task.tokenizer, width, task.cfg.data.system_prompt)
        out.append(sequence_nll(model, task, enc, batch_size))
    return np.concatenate(out)


def exposure_from_rank(rank: int, space: int) -> float:
    """Definition 4: log2 |R| - log2 rank."""
    return math.log2(space) - math.log2(max(int(rank), 1))


def exact_exposure(canary_nll: float, all_nll: np.ndarray) -> tuple[float, int]:
    """Exposure from the exact rank among every candidate (``all_nll`` covers the whole space, canary included):
    rank = 1 + the number of candidates strictly more likely than the canary."""
    others_below = int((all_nll < canary_nll).sum())
    rank = 1 + others_below
    return exposure_from_rank(rank, len(all_nll)), rank


def sampled_exposure(canary_nll: float, sample_nll: np.ndarray, space_bits: float) -> dict[str, float]:
    """Sec. 4.2: the skew-normal fit of the sampled candidates' Px, and the sampled rank (both in bits,
    capped at log2 |R|)."""
    from scipy import stats

    x = np.asarray(sample_nll, dtype=np.float64)
    k = int((x <= canary_nll).sum())
    rank_bits = -math.log2((k + 1) / (len(x) + 1))
    a, loc, scale = stats.skewnorm.fit(x)
    logcdf = float(stats.skewnorm.logcdf(canary_nll, a, loc, scale))
    fit_bits = -logcdf / LN2 if math.isfinite(logcdf) else space_bits
    return {"exposure_skewnorm": float(min(max(fit_bits, 0.0), space_bits)),
            "exposure_sampled_rank": float(min(rank_bits, space_bits)), "samples_below": float(k)}


def _index(secret: Sequence[int]) -> int:
    return int("".join(map(str, secret))) if secret else 0


def _result(own: float, ref: np.ndarray, canary: Canary, exact: bool) -> dict[str, Any]:
    """One canary's exposure against its format's candidates ``ref`` (every filling when ``exact``)."""
    if exact:
        exp, rank = exact_exposure(own, ref)
        return {"exposure": exp, "rank": float(rank), "space_bits": math.log2(len(ref)), "log_perplexity": own,
                "method": "exact"}
    est = sampled_exposure(own, ref, canary.space_bits)
    return {"exposure": est["exposure_skewnorm"], **est, "space_bits": canary.space_bits, "log_perplexity": own,
            "method": "skew-normal"}


def exposure_of(model: nn.Module, task: Any, canaries: Sequence[Canary], samples: int = 2000,
                exact_limit: int = 10_000, seed: int = 0, batch_size: int = 64) -> list[dict[str, Any]]:
    """The exposure of each of ``canaries`` on ``model``, in order.

    Canaries of one (prompt, format) are ranked against one candidate set: every filling when
    ``10^slots <= exact_limit`` (the exact rank), else ``samples`` uniform fillings (seeded by ``seed``,
    the format and the prompt; the group's own secrets left out) and the skew-normal fit. So a group
    costs one pass over its candidates plus one sequence per canary, and never-inserted control
    canaries of the same format (:func:`make_controls`) cost one sequence each."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, c in enumerate(canaries):
        groups.setdefault((c.prompt, c.fmt), []).append(i)
    out: list[dict[str, Any]] = [{} for _ in canaries]
    for (prompt, fmt), idx in groups.items():
        first = canaries[idx[0]]
        k = len(first.secret)
        space = 10 ** k
        if space <= exact_limit:
            every = [tuple(int(c) for c in f"{i:0{k}d}") for i in range(space)]
            ref = candidate_nll(model, task, first, every, batch_size)
            for i in idx:
                out[i] = _result(float(ref[_index(canaries[i].secret)]), ref, canaries[i], exact=True)
            continue
        own = candidate_nll(model, task, first, [canaries[i].secret for i in idx], batch_size)
        rng = np.random.default_rng(derive_seed(seed, "exposure-samples", fmt, prompt))
        taken = {canaries[i].secret for i in idx}
        draws = [t for t in (tuple(int(d) for d in r) for r in rng.integers(0, 10, (samples, k))) if t not in taken]
        ref = candidate_nll(model, task, first, draws, batch_size)
        for j, i in enumerate(idx):
            out[i] = _result(float(own[j]), ref, canaries[i], exact=False)
    return out


def canary_exposure(model: nn.Module, task: Any, canary: Canary, samples: int = 2000, exact_limit: int = 10_000,
                    seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """The canary's exposure on ``model`` (exact when ``10^slots <= exact_limit``, else sampled + fitted).

    ``exposure`` is the headline figure: the exact one, or the skew-normal estimate."""
    return exposure_of(model, task, [canary], samples, exact_limit, seed, batch_size)[0]


def make_controls(canaries: Sequence[Canary], count: int, seed: int = 0) -> list[Canary]:
    """``count`` never-inserted canaries per (prompt, format) of ``canaries``: same format, fresh seeded
    digits, none equal to a planted secret (``insertions = 0``). Their exposure on the trained model is
    what a canary the model never saw scores (about log2(e) ~ 1.44 bits on average, Sec. 4)."""
    taken: dict[tuple[str, str], set[tuple[int, ...]]] = {}
    for c in canaries:
        taken.setdefault((c.prompt, c.fmt), set()).add(c.secret)
    out: list[Canary] = []
    for (prompt, fmt), secrets in taken.items():
        k = num_slots(fmt)
        if 10 ** k - len(secrets) < count:
            raise ValueError(f"secret-sharer: format {fmt!r} has too few fillings for {count} controls")
        rng = np.random.default_rng(derive_seed(seed, "secret-sharer-control", fmt, prompt))
        out += [Canary(prompt, fmt, _fresh_secret(rng, k, secrets), 0) for _ in range(count)]
    return out


# ----------------------------------------------------------------------------- the plug-in
class SecretSharer(PoisoningAdversary):
    """Plants secret-sharer canaries (and optionally PII records) in the data of clients ``ids`` (default [0]).

    Parameters: ``format`` (``#`` = a random digit), ``prompt`` (the instruction the canary answers),
    ``insertions`` (how many copies of each canary; one canary per entry, ``per_count`` canaries each),
    ``pii`` / ``pii_insertions`` / ``pii_digits`` (PII records for :mod:`attacks.memorisation.extraction`), ``model``:
    the run's ``model.name`` (the tokenizer the records are encoded with; must match the run's),
    ``system_prompt`` (the run's ``data.system_prompt``), ``samples`` / ``exact_limit`` (exposure
    estimation), ``controls`` (never-inserted canaries of the same format, scored alongside: the
    exposure of a secret the model never saw), ``prior`` (also score the canaries on the base model,
    adapter off: what a canary scores before any training, so a high exposure that training did not
    cause is told apart), ``track`` (report exposure at every evaluation round; otherwise only ``secfed audit
    --attacks exposure`` computes it, since scoring thousands of candidates is not free).
    """

    honest = True  # the victim trains honestly on data that happens to hold secrets

    def __init__(self, ids: Sequence[int] | None = (0,), fraction: float = 0.0, format: str = DEFAULT_FORMAT,
                 prompt: str = DEFAULT_PROMPT, insertions: Sequence[int] = (1, 4, 16), per_count: int = 1,
                 pii: int = 0, pii_insertions: int = 1, pii_digits: int = 10, model: str | None = None, system_prompt: str | None = None,
                 samples: int = 2000, exact_limit: int = 10_000, controls: int = 8, prior: bool = True,
                 track: bool = False, num_clients: int | None = None, seed: int = 0) -> None:
        super().__init__(fraction, ids, num_clients, seed)
        if any(int(n) < 1 for n in insertions) or per_count < 0 or pii < 0 or pii_insertions < 1 or controls < 0:
            raise ValueError("secret-sharer: insertions and pii_insertions must be >= 1, per_count, pii and "
                             "controls >= 0")
        self.canaries = make_canaries(format, [int(n) for n in insertions], int(per_count), prompt, seed) if per_count else []
        from attacks.memorisation.extraction import make_pii

        self.pii = make_pii(int(pii), seed, digits=int(pii_digits))
        self.pii_insertions = int(pii_insertions)
        self.model_name, self.system_prompt = model, system_prompt
        self.samples, self.exact_limit, self.track = int(samples), int(exact_limit), bool(track)
        self.controls = make_controls(self.canaries, int(controls), seed) if controls and self.canaries else []
        self.prior = bool(prior)
        self._tok: Any = None

    def pairs(self) -> list[tuple[str, str]]:
        """Every planted (prompt, response), with its repetitions."""
        out = [(c.prompt, c.text) for c in self.canaries for _ in range(c.insertions)]
        out += [(p.prompt, p.text) for p in self.pii for _ in range(self.pii_insertions)]
        return out

    def tokenizer(self) -> Any:
        if self._tok is None:
            if not self.model_name:
                raise ConfigError("config key 'attack.adversary.model': secret-sharer encodes its canaries with the "
                                  "run's tokenizer; set it to the run's model.name")
            from secfed.lm_models import load_causal_tokenizer

            self._tok = load_causal_tokenizer(self.model_name)
        return self._tok

    def poison_data(self, client_id: int, data: TensorData) -> TensorData:
        pairs = self.pairs()
        if not pairs:
            return data
        extra = encode_pairs(pairs, self.tokenizer(), data.tensors["input_ids"].shape[1], self.system_prompt,
                             data.label_names)
        return append(data, extra)

    def _check_task(self, task: Any) -> None:
        name = getattr(getattr(task.cfg, "model", None), "name", None)
        if self.model_name and name and name != self.model_name:
            raise ConfigError(f"config key 'attack.adversary.model': '{self.model_name}' is not the run's model "
                              f"'{name}' (the canaries were encoded with another tokenizer)")

    def exposures(self, model: nn.Module, task: Any, reference: nn.Module | None = None) -> dict[str, float]:
        """Exposure (bits) of every canary and its mean per insertion count (``canary_exposure_bits_x<n>``);
        of the never-inserted controls (``control_exposure_bits_mean`` / ``_max``); with ``prior``, the
        canaries' exposure on the base model (``canary_base_exposure_bits_x<n>``) and what training added
        (``canary_gain_bits_x<n>`` = trained - base). The base is ``reference`` if given, else ``model`` with its
        PEFT adapter disabled (no prior for a model without one)."""
        self._check_task(task)
        if not self.canaries:
            return {}
        everyone = self.canaries + self.controls  # one candidate set per format for all of them, on both models
        scored = exposure_of(model, task, everyone, self.samples, self.exact_limit, self.seed)
        out: dict[str, float] = {"canary_space_bits": self.canaries[0].space_bits}
        trained = [e["exposure"] for e in scored[: len(self.canaries)]]
        out.update(self._per_count(trained, "exposure_bits"))
        ctrl = [e["exposure"] for e in scored[len(self.canaries):]]
        if ctrl:
            out["control_exposure_bits_mean"] = float(np.mean(ctrl))
            out["control_exposure_bits_max"] = float(np.max(ctrl))
            out["controls"] = float(len(ctrl))
        from attacks.membership.llm import reference_model

        base = reference_model(model, reference) if self.prior else None
        if base is not None:
            with base as b:  # the same secrets, so the same sampled candidates: trained and base ranks compare
                prior = [e["exposure"] for e in exposure_of(b, task, everyone, self.samples, self.exact_limit,
                                                            self.seed)[: len(self.canaries)]]
            out.update(self._per_count(prior, "base_exposure_bits"))
            out.update(self._per_count([t - p for t, p in zip(trained, prior)], "gain_bits", each=False))
        return out

    def _per_count(self, values: Sequence[float], what: str, each: bool = True) -> dict[str, float]:
        """``canary<i>_x<n>_<what>`` per canary (``each``) and ``canary_<what>_x<n>``, the mean per count."""
        out: dict[str, float] = {}
        by_count: dict[int, list[float]] = {}
        for i, (c, v) in enumerate(zip(self.canaries, values)):
            by_count.setdefault(c.insertions, []).append(v)
            if each:
                out[f"canary{i}_x{c.insertions}_{what}"] = float(v)
        for n, v in sorted(by_count.items()):
            out[f"canary_{what}_x{n}"] = float(np.mean(v))
        return out

    def extraction(self, model: nn.Module, task: Any) -> dict[str, float]:
        from attacks.memorisation.extraction import extraction_rate

        self._check_task(task)
        return extraction_rate(model, task, self.pii) if self.pii else {}

    def evaluate(self, model: nn.Module, task: Any) -> dict[str, float]:
        """During the run (engine, each evaluation round) only with ``track = true``."""
        if not self.track:
            return {}
        return {**self.exposures(model, task), **self.extraction(model, task)}
