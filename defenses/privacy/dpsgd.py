"""Sample-level DP: DP-SGD (Abadi et al. 2016) through Opacus on a client's trainable adapter/head.

Each local step draws a Poisson batch (every example of the client's shard with
probability q = min(1, B / n)), computes per-example gradients of the trainable
parameters (LoRA A/B matrices, the head) with Opacus' ``GradSampleModule`` -- or
Opacus' ghost clipping (Li et al. 2022; Bu et al. 2023), which never materialises
them -- clips each to norm C, sums, adds N(0, (zC)^2 I) and divides by the expected
batch size qn (Opacus' ``loss_reduction = "mean"`` convention). Steps per round: K =
``local_steps`` if > 0, else round(local_epochs / q) (the expected number of Poisson
batches in ``local_epochs`` passes). The guarantee is per record of one client's
shard, composed over its K steps per round and over the rounds (``DPSGDGuard``).

The Opacus wrapper is built for every ``train`` call and removed afterwards (hooks
and the ``grad_sample``/``summed_grad`` attributes), since the engine reuses one
model object for every client. Known traps, checked by ``tests/test_privacy_dpsgd.py``:
opacus #732 (a trainable parameter with no per-sample gradient: we check every
trainable parameter is reached before the first step) and opacus #820 (LoRA weights
silently corrupted with some opacus/peft versions: the test compares Opacus' per-sample
gradients with per-example backward passes on the LoRA model and checks the frozen
weights are untouched).

Poisson batches are secret (review finding 4): with ``noise = "csprng"`` (the default)
each step's batch is drawn from ``os.urandom`` (amplification by subsampling needs the
sample to stay secret; the run seed is in ``config.json``). ``noise = "seeded"`` draws
batches and noise from the run seed, for non-private simulations only, and is refused
whenever ``server.privacy`` is set (finding 9). The local noise itself is still a float
Gaussian on per-example gradient sums (see SECURITY.md: not covered by the discrete
mechanism of DP-FedAvg).

Noise comes from the OS CSPRNG (:mod:`defenses.privacy.noise`) unless
``noise = "seeded"``; Opacus' own ``secure_mode`` needs ``torchcsprng``, which is not
installable with this torch, so :meth:`_NoiseMixin.add_noise` replaces its sampler.
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping
from torch import nn

from defenses.privacy.analysis import calibrate_noise_for
from defenses.privacy.noise import SOURCES, _urandom_uniform, gaussian_like
from secfed import registry
from secfed.errors import ConfigError
from secfed.needs import Need, needs_of
from secfed.rounds import GROUP_NOISE, dpsgd_per_client, group_noise_scales
from secfed.training import KeptOptimizerState, make_optimizer, physical_batches

_OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad", "_processed")


#: the client.* keys that fix a DP-SGD client's plan (q_i, K_i): the trainer samples by them, the guard charges them
PLAN_KEYS = ("batch_size", "local_epochs", "local_steps", "record_sample_rate")


def plan_mismatch(obj: Any, client: Any) -> tuple[str, Any, Any] | None:
    """The first :data:`PLAN_KEYS` key on which ``obj`` (a trainer or guard) differs from ``client`` (cfg.client):
    (key, obj's value, the config's), or None."""
    return next(((k, getattr(obj, k), getattr(client, k)) for k in PLAN_KEYS if getattr(obj, k) != getattr(client, k)),
                None)


def client_plan(n: int, batch_size: int, local_epochs: int, local_steps: int,
                record_sample_rate: float | None = None) -> tuple[float, int]:
    """(q, K): Poisson rate and number of DP-SGD steps of a client with n examples in one round
    (q = ``record_sample_rate`` for every client when set, else expected batch ``batch_size``)."""
    if n <= 0:
        return 0.0, 0
    q = float(record_sample_rate) if record_sample_rate else min(1.0, batch_size / n)
    steps = local_steps if local_steps > 0 else max(1, math.ceil(local_epochs / q - 1e-9)) if local_epochs > 0 else 0
    return q, steps


def sample_level_histories(z: float, shard_sizes: list[int], rounds: int, batch_size: int, local_epochs: int,
                           local_steps: int, record_sample_rate: float | None = None) -> list[list[tuple[float, float, int]]]:
    """Worst-case histories, one per distinct shard plan, as if every client took part in every round."""
    plans = {client_plan(n, batch_size, local_epochs, local_steps, record_sample_rate) for n in shard_sizes}
    return [[(z, q, k * rounds)] for q, k in sorted(plans) if k > 0]


#: ``server.privacy.calibration``: one z for every client (the one the worst plan needs), or each client's own
CALIBRATIONS = ("shared", "per-client")


def check_calibration(value: Any, key: str = "server.privacy.calibration") -> str:
    if value not in CALIBRATIONS:
        raise ConfigError(f"config key '{key}': {value!r} is not one of " + ", ".join(f'"{c}"' for c in CALIBRATIONS))
    return value


def resolve_noise_multiplier(cfg: Any, shard_sizes: list[int], n: int | None = None) -> float:
    """z of the run's DP-SGD: ``client.trainer.noise_multiplier`` or calibrated from ``server.privacy``.

    Calibration assumes every client trains in every round (a client sampled less
    often spends less), so the budget holds whoever is sampled. ``calibration = "shared"``
    (default): one z for every client, the one the worst plan (q_i, K_i) over ``shard_sizes``
    needs. ``"per-client"``: the z of the client holding ``n`` records, for its own plan alone.
    Record-level DP protects each organisation's records with each organisation's mechanism
    (the guarantee is per organisation), so every client still meets (epsilon, delta); with a
    fixed expected batch a large shard (small q_i) is no longer charged the noise a small one
    needs (the tweets split at epsilon 8: 0.69-1.91 per organisation against 1.91 for all).
    """
    params = cfg.client.trainer.params
    per_client = dpsgd_per_client(cfg)  # the value was checked when the guard was built
    if params.get("noise_multiplier") is not None:
        if per_client:
            raise ConfigError("config key 'server.privacy.calibration': \"per-client\" calibrates each client's z "
                              "from epsilon; drop client.trainer.noise_multiplier or the calibration")
        return float(params["noise_multiplier"])
    priv = cfg.server.privacy
    accounts = priv is not None and Need.PRIVATE_TRAINER in needs_of(registry.resolve("privacy", priv.name, "server.privacy"),
                                                                     "server.privacy")  # the guard of this trainer's noise
    if not accounts or priv.params.get("epsilon") is None:
        raise ConfigError("config key 'client.trainer.noise_multiplier': give it, or set server.privacy = "
                          "{name = \"dp-sgd\", epsilon = ..., delta = ...} to calibrate it")
    if per_client:
        if n is None:
            raise ValueError("per-client calibration needs the client's shard size n")
        shard_sizes = [n]
    c = cfg.client
    return calibrate_noise_for(
        lambda z: sample_level_histories(z, shard_sizes, cfg.run.rounds, c.batch_size, c.local_epochs, c.local_steps,
                                         c.record_sample_rate),
        float(priv.params["epsilon"]), float(priv.params.get("delta", 1e-5)), priv.params.get("accountant", "rdp"),
        key="server.privacy")


def noise_multipliers(cfg: Any, shard_sizes: list[int]) -> list[float]:
    """z of each shard's client (:func:`resolve_noise_multiplier`; one calibration per distinct shard size)."""
    if not dpsgd_per_client(cfg):
        return [resolve_noise_multiplier(cfg, shard_sizes)] * len(shard_sizes)
    by_n = {n: resolve_noise_multiplier(cfg, shard_sizes, n) for n in sorted(set(shard_sizes))}
    return [by_n[n] for n in shard_sizes]


class _NoiseMixin:
    """Replaces Opacus' Gaussian sampler by :func:`gaussian_like` (CSPRNG or seeded)."""

    noise_source: str = "csprng"
    noise_generator: torch.Generator | None = None

    def param_noise_scales(self) -> list[float]:
        """Each parameter's noise std over z C (1: flat clipping; clip groups: :func:`group_noise_scales`)."""
        return [1.0] * len(self.params)

    def add_noise(self) -> None:
        for p, scale in zip(self.params, self.param_noise_scales()):
            _check_processed_flag(p.summed_grad)
            std = self.noise_multiplier * self.max_grad_norm * scale
            noise = gaussian_like(p.summed_grad, std, self.noise_source, self.noise_generator)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class _DPOptimizer(_NoiseMixin, DPOptimizer):
    def scale_grad(self) -> None:
        """Divide by the expected batch size only: one logical Poisson batch per step, however many physical passes
        its per-example gradients came from (Opacus divides by expected size x passes, its virtual-step convention)."""
        if self.loss_reduction == "mean":
            for p in self.params:
                p.grad /= self.expected_batch_size


class _DPOptimizerGhost(_NoiseMixin, DPOptimizerFastGradientClipping):
    pass


def check_clip_shares(groups: dict[str, float], key: str = "client.trainer.clip_groups",
                      group_noise: str = "uniform") -> None:
    """One positive share per ``fnmatch`` pattern (string keys). Uniform noise: shares in (0, 1] whose squares sum
    to at most 1; proportional noise: any shares in (0, 1000] (each group's noise follows its own bound)."""
    if not groups:
        raise ConfigError(f"config key '{key}': give at least one pattern, e.g. {{\"head.*\" = 0.7071, \"*\" = 0.7071}}")
    top = 1 if group_noise == "uniform" else 1000
    for pat, share in groups.items():
        if not isinstance(pat, str) or not pat:
            raise ConfigError(f"config key '{key}': patterns are non-empty strings (got {pat!r})")
        number = isinstance(share, (int, float)) and not isinstance(share, bool)
        if not (number and 0 < share <= top):
            hint = "; a share above 1 needs client.trainer.group_noise = \"proportional\"" if number and share > top == 1 else ""
            raise ConfigError(f"config key '{key}.{pat}': a share of max_grad_norm in (0, {top}] (got {share!r}){hint}")
    total = sum(float(v) ** 2 for v in groups.values())
    if group_noise == "uniform" and total > 1 + 1e-6:
        raise ConfigError(f"config key '{key}': the squared shares sum to {total:.4f} > 1 (each example's clipped "
                          "gradient must keep norm <= max_grad_norm; or set client.trainer.group_noise = "
                          "\"proportional\")")


def clip_group_index(names: list[str], groups: dict[str, float], key: str = "client.trainer.clip_groups") -> list[int]:
    """Group of each trainable parameter: the first pattern of ``groups`` (``fnmatch``, in order) its name matches.

    Every parameter must fall in a group and every group must hold a parameter (the shares themselves are
    :func:`check_clip_shares`' business, checked when the trainer is built)."""
    pats = list(groups)
    index = []
    for name in names:
        g = next((i for i, pat in enumerate(pats) if fnmatchcase(name, pat)), None)
        if g is None:
            raise ConfigError(f"config key '{key}': trainable parameter {name!r} is in no group (add \"*\" = share)")
        index.append(g)
    empty = [pats[i] for i in range(len(pats)) if i not in index]
    if empty:
        raise ConfigError(f"config key '{key}': pattern {empty[0]!r} matches no trainable parameter")
    return index


class _DPGroupOptimizer(_DPOptimizer):
    """Group-wise clipping (McMahan et al. 2018, per-layer; He et al., ICLR 2023, "Exploring the limits of DP deep
    learning with group-wise clipping"): each example's gradient restricted to group g is clipped to C_g = share_g C,
    so its whole gradient has norm <= C sqrt(sum share_g^2) <= C and the Gaussian noise z C keeps the guarantee of
    flat clipping; or, with proportional noise, group g gets z C share_g sqrt(G) (:func:`group_noise_scales`).
    ``group_of[i]`` is the group of ``self.params[i]``, ``group_norms[g]`` its C_g, ``noise_scales[g]`` its noise
    std over z C."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, group_of: list[int], group_norms: list[float],
                 noise_scales: list[float], **kw: Any) -> None:
        super().__init__(optimizer, **kw)
        self.group_of, self.group_norms, self.noise_scales = group_of, group_norms, noise_scales

    def param_noise_scales(self) -> list[float]:
        return [self.noise_scales[g] for g in self.group_of]

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        n = len(samples[0]) if samples else 0
        groups = len(self.group_norms)
        sq = torch.zeros((groups, n), device=samples[0].device if samples else "cpu")
        for g, gs in zip(self.group_of, samples):
            sq[g] += gs.reshape(n, -1).to(sq.dtype).pow(2).sum(1)
        limit = torch.tensor(self.group_norms, dtype=sq.dtype, device=sq.device).unsqueeze(1)
        factor = (limit / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for g, p in zip(self.group_of, self.params):
            _check_processed_flag(p.grad_sample)
            gs = self._get_flat_grad_sample(p).to(p.dtype)
            grad = torch.einsum("i,i...", factor[g].to(gs.device, p.dtype), gs)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
            _mark_as_processed(p.grad_sample)


class DPSGDTrainer:
    """DP-SGD local training with Opacus (same interface as :class:`secfed.training.SGDTrainer`).

    Args:
        max_grad_norm: per-example clipping norm C.
        noise_multiplier: z; ``None`` calibrates it from ``server.privacy`` (epsilon, delta).
        ghost_clipping: Opacus' ghost clipping (no per-example gradients in memory;
            two backward passes). Works for the Linear layers of LoRA and the head.
        noise: ``"csprng"`` (default) or ``"seeded"`` (reproducible experiments only).
        clip_groups: group-wise clipping, ``{pattern: share}`` in order (``fnmatch`` on parameter names, e.g.
            ``{"head.*" = 0.7071, "*" = 0.7071}``): each example's gradient on a group is clipped to share x C
            (:func:`clip_group_index`). Flat clipping lets the largest gradients take the whole budget (a text
            classifier's fresh head: per-example norm ~3 against ~0.4 for all LoRA B matrices at initialisation,
            so the adapters got ~14% of C and the same per-coordinate noise as the head). Not with ghost clipping.
        group_noise: ``"uniform"`` (default: noise z C everywhere, squared shares summing to <= 1) or
            ``"proportional"`` (group g's noise z C share_g sqrt(G), any shares: the same epsilon;
            :func:`group_noise_scales`). Needs ``clip_groups``.

    Declares ``private = True`` (secfed.needs.is_private): it clips per example and adds noise, so the
    ``dp-sgd`` guard accepts it, and every subclass or alias of it.
    """

    private = True

    def __init__(self, max_grad_norm: float = 1.0, noise_multiplier: float | None = None, ghost_clipping: bool = False,
                 noise: str = "csprng", local_epochs: int = 1, local_steps: int = 0, batch_size: int = 16,
                 lr: float = 5e-3, optimizer: str = "adam", momentum: float = 0.0, weight_decay: float = 0.0,
                 record_sample_rate: float | None = None, clip_groups: dict[str, float] | None = None,
                 optimizer_state: str = "round", group_noise: str = "uniform", physical_batch_size: int = 0) -> None:
        if not max_grad_norm > 0:
            raise ConfigError(f"config key 'client.trainer.max_grad_norm': must be > 0 (got {max_grad_norm})")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ConfigError(f"config key 'client.trainer.noise_multiplier': must be >= 0 (got {noise_multiplier})")
        if noise not in SOURCES:
            raise ConfigError(f"config key 'client.trainer.noise': one of {SOURCES} (got {noise!r})")
        if group_noise not in GROUP_NOISE:
            raise ConfigError(f"config key 'client.trainer.group_noise': one of {', '.join(map(repr, GROUP_NOISE))} "
                              f"(got {group_noise!r})")
        if group_noise != "uniform" and clip_groups is None:
            raise ConfigError("config key 'client.trainer.group_noise': \"proportional\" spreads the noise over "
                              "clip groups; set client.trainer.clip_groups")
        if clip_groups is not None:
            if not isinstance(clip_groups, dict):
                raise ConfigError("config key 'client.trainer.clip_groups': a table {pattern = share, ...}, e.g. "
                                  "{\"head.*\" = 0.7071, \"*\" = 0.7071}")
            if ghost_clipping:
                raise ConfigError("config key 'client.trainer.clip_groups': group-wise clipping needs per-example "
                                  "gradients; set ghost_clipping = false")
            check_clip_shares(clip_groups, group_noise=group_noise)
        if physical_batch_size and ghost_clipping:
            raise ConfigError("config key 'client.physical_batch_size': ghost clipping keeps no per-example gradients "
                              "to gather over passes; set it to 0 or client.trainer.ghost_clipping = false")
        self.physical_batch_size = physical_batch_size  # passes of at most this many examples (0: one pass)
        self.group_noise = group_noise
        self.max_grad_norm, self.noise_multiplier, self.ghost_clipping, self.noise = max_grad_norm, noise_multiplier, ghost_clipping, noise
        self.clip_groups = dict(clip_groups) if clip_groups is not None else None
        self.kept = KeptOptimizerState(optimizer_state)
        self.local_epochs, self.local_steps, self.batch_size = local_epochs, local_steps, batch_size
        self.record_sample_rate = record_sample_rate
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self._z: float | None = noise_multiplier  # given, or the guard's (use_noise_multiplier, over Flower)
        self._own: dict[int | None, float] = {}  # calibrated from the config: None -> the shared z, n -> z for n records

    def use_noise_multiplier(self, z: float) -> None:
        """Train with the privacy guard's z (a SuperNode holds one shard; the guard calibrates over all of them)."""
        self._z = float(z)

    def calibrated_noise_multiplier(self, task: Any, n: int | None = None) -> float:
        """The z this client's own config requires (:func:`resolve_noise_multiplier`): the shared one over
        ``task.shards``, or, under per-client calibration, the one for a client with ``n`` records."""
        per_client = dpsgd_per_client(task.cfg)
        if per_client and n is None:
            raise ValueError("per-client calibration: the z depends on the client's shard size n")
        key = n if per_client else None
        if key not in self._own:
            self._own[key] = resolve_noise_multiplier(task.cfg, [len(s) for s in task.shards], key)
        return self._own[key]

    def resolved_noise_multiplier(self, task: Any, n: int | None = None) -> float:
        """The z this trainer adds for a client with ``n`` records (``n`` matters under per-client calibration)."""
        return self._z if self._z is not None else self.calibrated_noise_multiplier(task, n)

    def _check_against_guard(self, task: Any) -> None:
        """Findings 1 and 9: under a privacy guard the batches are secret and the plan is the accounted one."""
        cfg = getattr(task, "cfg", None)
        if cfg is None or cfg.server.privacy is None:
            return
        if self.noise == "seeded":
            raise ConfigError("config key 'client.trainer.noise': \"seeded\" noise can be rebuilt from the config and "
                              "carries no epsilon; it is refused with server.privacy (leave it out: \"csprng\")")
        bad = plan_mismatch(self, cfg.client)
        if bad:
            k, mine, real = bad
            raise ConfigError(f"config key 'client.trainer': trains with {k} = {mine}, server.privacy accounts for "
                              f"client.{k} = {real}")

    def _poisson_batch(self, n: int, q: float, generator: torch.Generator) -> torch.Tensor:
        """Indices of one Poisson batch: secret (os.urandom) unless the noise is seeded."""
        if self.noise == "seeded":
            return torch.nonzero(torch.rand(n, generator=generator) < q).flatten()
        return torch.from_numpy(np.nonzero(_urandom_uniform(n) <= q)[0]).to(torch.long)

    def train(self, model: nn.Module, task: Any, data: Any, generator: torch.Generator, client_id: int = 0,
              used: list[torch.Tensor] | None = None) -> dict[str, float]:
        """K Poisson-batch DP-SGD steps; each step's (secret) batch indices go to ``used`` when given
        (the engine's evaluation-only ground truth, :mod:`secfed.truth`; never sent)."""
        self._check_against_guard(task)
        n = len(data)
        z = self.resolved_noise_multiplier(task, n)
        q, steps = client_plan(n, self.batch_size, self.local_epochs, self.local_steps, self.record_sample_rate)
        params = [p for p in model.parameters() if p.requires_grad]
        if steps == 0 or not params:
            return {"train_loss": float("nan"), "steps": 0, "examples_seen": 0}
        groups: dict[str, Any] = {}
        if self.clip_groups is not None:  # checked before Opacus wraps the model: a refusal leaves no hooks behind
            names = {id(p): n for n, p in model.named_parameters()}
            groups = {"group_of": clip_group_index([names[id(p)] for p in params], self.clip_groups),
                      "group_norms": [float(v) * self.max_grad_norm for v in self.clip_groups.values()],
                      "noise_scales": group_noise_scales(list(self.clip_groups.values()), self.group_noise)}
        base = make_optimizer(params, self.optimizer, self.lr, self.momentum, self.weight_decay)
        self.kept.restore(base, client_id)  # the client's own state from its last round ("keep"): post-processing
        expected = q * n
        if self.ghost_clipping:
            gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean", strict=False,
                                                       max_grad_norm=self.max_grad_norm, use_ghost_clipping=True)
            opt = _DPOptimizerGhost(base, noise_multiplier=z, max_grad_norm=self.max_grad_norm,
                                    expected_batch_size=expected, loss_reduction="mean")
        else:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
            cls = _DPGroupOptimizer if groups else _DPOptimizer
            opt = cls(base, noise_multiplier=z, max_grad_norm=self.max_grad_norm, expected_batch_size=expected,
                      loss_reduction="mean", **groups)
        opt.noise_source = self.noise
        if self.noise == "seeded":
            opt.noise_generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        model.train()
        total, seen, checked = 0.0, 0, False
        try:
            for _ in range(steps):
                idx = self._poisson_batch(n, q, generator)
                if used is not None:
                    used.append(idx)
                opt.zero_grad(set_to_none=True)
                if len(idx) == 0:  # empty Poisson batch: the step releases noise only
                    self._noise_only_step(params, base, z, expected, opt)
                    continue
                # one loss term per example (task.per_example_loss), then the mean over the pass: Opacus'
                # loss_reduction = "mean" convention (a causal LM's token losses are reduced per example first); its
                # per-example gradients gather over the passes, and the step clips each and divides by the expected
                # batch size once (_DPOptimizer.scale_grad)
                step_loss = 0.0
                for part in physical_batches(data, idx, self.physical_batch_size):
                    per_example = task.per_example_loss(gsm, data.batch(part))
                    if self.ghost_clipping:  # two backward passes inside loss.backward()
                        loss = DPTensorFastGradientClipping(gsm, opt, per_example, "mean")
                    else:
                        loss = per_example.mean()
                    loss.backward()
                    step_loss += float(loss.item()) * len(part)
                if not checked and not self.ghost_clipping:
                    missing = [i for i, p in enumerate(params) if getattr(p, "grad_sample", None) is None]
                    if missing:  # opacus #732: fail loudly rather than train some parameters without DP
                        raise ConfigError(f"config key 'client.trainer': DP-SGD: {len(missing)} trainable parameters got no "
                                          "per-sample gradient (a layer Opacus does not support, or unused parameters)")
                    checked = True
                opt.step()
                total += step_loss
                seen += len(idx)
            self.kept.save(base, client_id)
        finally:
            opt.zero_grad(set_to_none=True)
            gsm._close()
            for p in model.parameters():
                for a in _OPACUS_ATTRS:
                    if hasattr(p, a):
                        delattr(p, a)
                p.grad = None
        return {"train_loss": total / max(seen, 1), "steps": steps, "examples_seen": seen,
                "noise_multiplier": z, "sample_rate": q}

    def state_dict(self) -> dict[str, Any]:
        return self.kept.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept.load_state_dict(state)

    def _noise_only_step(self, params: list[nn.Parameter], base: torch.optim.Optimizer, z: float, expected: float,
                         opt: Any) -> None:
        for p, scale in zip(params, opt.param_noise_scales()):  # opt.params are these params, in this order
            std = z * self.max_grad_norm * scale
            p.grad = gaussian_like(torch.zeros_like(p), std, self.noise, opt.noise_generator) / expected
        base.step()
        base.zero_grad(set_to_none=True)
