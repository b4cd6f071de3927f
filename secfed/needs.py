"""What a plug-in needs from the round, and what a secure sum reveals: one flag set, one check.

Every plug-in of the server side declares ``needs`` (a :class:`Need` flag set), every
secure sum declares ``reveals``:

* aggregators (``needs = Need.SUM`` for the mean, which the engine computes from the sum
  through ``from_sum(total, total_weight, expected_weight)``; ``Need.ROWS`` for a robust
  rule, ``| Need.CENTRE`` for centered clipping, ``| Need.REFERENCE`` for FLTrust);
* pre-aggregators (``Need.ROWS``), LoRA aggregation methods (``Need.SUM``, or
  ``Need.ROWS | Need.FACTORS`` for stacking and FlexLoRA), observers (what they read;
  see below), adversaries (``Need.HONEST_ROWS`` for an omniscient attacker, else
  ``Need.NONE``), privacy guards (``Need.SECRET_SAMPLE`` where the accounting assumes
  amplification by subsampling);
* secure sums: ``reveals = Need.SUM | Need.ROWS`` (the plain sum), ``Need.SUM`` (SecAgg+, CKKS).

:func:`check_needs` is the one build-time check: it refuses, with one line naming the
config key, a plug-in that declares nothing and every combination the round cannot serve
(rows behind a secure sum without group mode, a reference update without root data, an
omniscient adversary on SuperNodes, a secret sample without a privacy guard). Nothing
else in secfed interprets capabilities; the engine and the attacks read ``needs`` /
``reveals`` after this check and call aggregators through :func:`call_aggregator`.

Observers are not refused for rows a secure sum hides: they measure exactly what the
server saw (``ServerView.updates is None`` under a secure sum), which is the point of
running them. Their ``needs`` still say what they read, and what a round can never give
(``SECRET_SAMPLE``, ``REFERENCE``) is refused.

:class:`DPRole` is the other declaration: a DP stage says which part of DP-FedAvg it
plays (clip, noise share, central noise, adaptive clipping), so the privacy guard and
:func:`secfed.rounds.run_is_dp` recognise a stage by its class, never by its registry
name or class path (a subclass or an alias works).
"""

from __future__ import annotations

import enum
from typing import Any, Callable

from secfed.errors import ConfigError


class Need(enum.Flag):
    NONE = 0
    SUM = enum.auto()  # the weighted sum of the cohort's updates and its total weight
    ROWS = enum.auto()  # each client's update (or each group's mean in group mode)
    FACTORS = enum.auto()  # each client's LoRA factors (stacking; heterogeneous ranks)
    CENTRE = enum.auto()  # the previous round's aggregate (centered clipping)
    REFERENCE = enum.auto()  # the server's own update on its root dataset (FLTrust)
    SECRET_SAMPLE = enum.auto()  # a cohort no one holding the config can rebuild (amplification by subsampling)
    HONEST_ROWS = enum.auto()  # an adversary that reads the honest clients' updates of the round (omniscient)
    GROUND_TRUTH = enum.auto()  # evaluation only: the examples each client trained on (secfed.truth; observers, recover)
    PRIVATE_TRAINER = enum.auto()  # a trainer that clips per example and adds noise (DP-SGD; is_private)


class DPRole(enum.Flag):
    """The part of DP-FedAvg (McMahan et al. 2018; Andrew et al. 2021) a pipeline or server stage plays.

    Declared as ``dp_role`` on the stage class; a stage without it plays none.
    """

    NONE = 0
    CLIP = enum.auto()  # client stage: clips each update to the round's C
    ADAPTIVE = enum.auto()  # adaptive clipping (Andrew et al. 2021): a client half and a server half
    SHARE = enum.auto()  # client stage: a distributed noise share (the shares' sum is the DP noise)
    RING_SHARE = enum.auto()  # a share in Z_m handed to SecAgg+ (ddgauss, Kairouz et al. 2021): own accountant
    CENTRAL_NOISE = enum.auto()  # server stage: the Gaussian on the aggregate


def dp_role(cls_or_obj: Any) -> DPRole:
    """The declared :class:`DPRole` of a stage class or object (``DPRole.NONE`` if it declares none)."""
    role = getattr(cls_or_obj, "dp_role", DPRole.NONE)
    if not isinstance(role, DPRole):
        raise ConfigError(f"plug-in {getattr(cls_or_obj, '__name__', type(cls_or_obj).__name__)}: dp_role must be "
                          f"a secfed.needs.DPRole (got {role!r})")
    return role


def _name(obj: Any) -> str:
    return type(obj).__name__


def needs_of(obj: Any, key: str = "plug-in") -> Need:
    """The declared ``needs`` of a plug-in (``Need.NONE`` for an absent one); one ConfigError if it declares none."""
    if obj is None:
        return Need.NONE
    declared = getattr(obj, "needs", None)
    if not isinstance(declared, Need):
        raise ConfigError(f"config key '{key}': plug-in {_name(obj)} declares no `needs` (give its class e.g. "
                          "`needs = secfed.needs.Need.ROWS`; docs/design.md, 'Declared needs')")
    return declared


def reveals_of(secure_sum: Any, key: str = "server.secure_sum") -> Need:
    """What the server learns from a secure sum (its declared ``reveals``); one ConfigError if it declares none."""
    declared = getattr(secure_sum, "reveals", None)
    if not isinstance(declared, Need):
        raise ConfigError(f"config key '{key}': secure sum {_name(secure_sum)} declares no `reveals` (give its class "
                          "e.g. `reveals = secfed.needs.Need.SUM`; docs/design.md, 'Declared needs')")
    return declared


def check_needs(*, aggregator: Any, aggregator_name: str, pre_aggregators: list[Any], secure_sum: Any,
                secure_sum_name: str, group_size: int, has_root: bool, observers: list[Any] = (),
                adversary: Any = None, privacy: Any = None, privacy_name: str = "", trainer: Any = None,
                secret_sample: bool = False, honest_rows: bool = True, pipeline: list[tuple[str, Any]] = ()) -> None:
    """One build-time check of what the round's plug-ins need against what the round can give.

    ``secret_sample``: the engine draws the cohort from the OS CSPRNG (it does so under a
    privacy guard, :func:`secfed.engine.secret_cohort`). ``honest_rows``: the transport can hand
    an adversary the honest clients' updates (in-process only; SuperNodes never share them).
    ``pipeline``: the client stages as (config name, stage); a distributed noise share (``DPRole.SHARE``)
    carries only part of the noise, so it needs a secure sum that hides the rows (unless ``allow_plain``, tests).
    """
    reveals = reveals_of(secure_sum)
    for i, (name, stage) in enumerate(pipeline):
        if DPRole.SHARE in dp_role(stage) and Need.ROWS in reveals and not getattr(stage, "allow_plain", False):
            raise ConfigError(f"config key 'client.pipeline[{i}]': '{name}' (distributed noise) needs server.secure_sum "
                              f"= 'secagg+' or 'he' (got '{secure_sum_name}'); with the plain sum each update carries "
                              "only part of the noise (allow_plain = true for tests)")
    agg = needs_of(aggregator, "server.aggregator")
    pre = Need.NONE
    for i, p in enumerate(pre_aggregators):
        pre |= needs_of(p, f"server.pre_aggregators[{i}]")
    if Need.ROWS not in agg and not pre_aggregators and not callable(getattr(aggregator, "from_sum", None)):
        raise ConfigError(f"config key 'server.aggregator': '{aggregator_name}' declares needs without Need.ROWS, so "
                          "it must compute the aggregate from the sum: from_sum(total, total_weight, expected_weight)")
    need = agg | pre
    if Need.ROWS in need and Need.ROWS not in reveals and group_size == 0:
        raise ConfigError(
            f"config key 'server.aggregator': '{aggregator_name}' needs individual updates, which "
            f"server.secure_sum = '{secure_sum_name}' hides; use aggregator 'mean', or set server.group_size "
            "to aggregate robustly over secure group sums")
    if Need.REFERENCE in need and not has_root:
        raise ConfigError(f"config key 'data.root_size': aggregator '{aggregator_name}' needs a server root dataset (> 0)")
    keyed = [(f"server.observers[{i}]", o) for i, o in enumerate(observers)]
    keyed += [("attack.adversary", adversary), ("server.privacy", privacy)]
    for key, obj in keyed:
        if obj is None:
            continue
        n = needs_of(obj, key)
        if Need.REFERENCE in n and not has_root:
            raise ConfigError(f"config key '{key}': {_name(obj)} needs a server root dataset (data.root_size > 0)")
        if Need.SECRET_SAMPLE in n and not secret_sample:
            raise ConfigError(f"config key '{key}': {_name(obj)} needs a secret cohort (drawn from the OS CSPRNG), "
                              "which the server draws only under a privacy guard; set server.privacy")
        if Need.HONEST_ROWS in n and not honest_rows:
            raise ConfigError(f"config key '{key}': an omniscient adversary reads honest clients' updates, "
                              "which SuperNodes never share; run it with deploy.transport = 'inprocess'")
        if Need.PRIVATE_TRAINER in n and not is_private(trainer):
            raise ConfigError(f"config key 'client.trainer': server.privacy = '{privacy_name}' needs a private trainer "
                              "(client.trainer = \"dp-sgd\": per-example clipping and noise) (or write [privacy] "
                              "preset = \"record-level\" with epsilon and delta)")


def call_aggregator(aggregator: Any, pre_aggregators: list[Any], X: Any, weights: Any, *,
                    center: Callable[[], Any], reference: Callable[[], Any]) -> Any:
    """How the server aggregates rows (the engine, and an adaptive attacker simulating it, call this).

    The pre-aggregators run in order (they mix rows, so the clients' weights no longer
    apply), then the aggregator gets exactly the inputs it declares: ``center=`` (Need.CENTRE)
    and ``reference=`` (Need.REFERENCE), computed only when needed.
    """
    for pre in pre_aggregators:
        X, weights = pre(X), None
    need = needs_of(aggregator, "server.aggregator")
    kwargs: dict[str, Any] = {}
    if Need.CENTRE in need:
        kwargs["center"] = center()
    if Need.REFERENCE in need:
        kwargs["reference"] = reference()
    return aggregator(X, weights, **kwargs)


def is_private(trainer: Any) -> bool:
    """True when a trainer (class or object) declares ``private = True``: it clips per example and adds noise
    (DP-SGD). A trainer that does not say so is not private."""
    return getattr(trainer, "private", False) is True
