"""What a plug-in needs from the round, and what a secure sum reveals: one flag set, one check.

A plug-in declares ``needs = Need.ROWS | Need.CENTRE`` (aggregators, pre-aggregators,
observers, adversaries, LoRA aggregation methods); a secure sum declares ``reveals``.
:func:`check_needs` refuses, at build time and with one line, a combination the round
cannot serve (rows behind a secure sum without group mode, a reference update without
root data). Plug-ins written before the flags existed are read through their old
attributes (``needs_individual``, ``uses_center``, ``uses_reference``, ``omniscient``,
``reveals_individual``) by :func:`needs_of` / :func:`reveals_of`, so the engine has one
place that interprets them.
"""

from __future__ import annotations

import enum
from typing import Any

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


def needs_of(obj: Any, default: Need = Need.SUM) -> Need:
    """The declared ``needs`` of a plug-in, or what its older attributes say."""
    if obj is None:
        return Need.NONE
    declared = getattr(obj, "needs", None)
    if isinstance(declared, Need):
        return declared
    out = Need.NONE
    if getattr(obj, "needs_individual", None) is not None:
        out |= Need.ROWS if obj.needs_individual else Need.SUM
    else:
        out |= default
    if getattr(obj, "uses_center", False):
        out |= Need.CENTRE
    if getattr(obj, "uses_reference", False):
        out |= Need.REFERENCE
    if getattr(obj, "omniscient", False):
        out |= Need.HONEST_ROWS
    return out


def reveals_of(secure_sum: Any) -> Need:
    """What the server learns from a secure sum: the sum always; the rows only from a plain sum."""
    declared = getattr(secure_sum, "reveals", None)
    if isinstance(declared, Need):
        return declared
    return Need.SUM | (Need.ROWS if getattr(secure_sum, "reveals_individual", True) else Need.NONE)


def check_needs(*, aggregator: Any, aggregator_name: str, pre_aggregators: list[Any], secure_sum: Any,
                secure_sum_name: str, group_size: int, has_root: bool) -> None:
    """One build-time check of what the round's server side needs against what it can get."""
    need = needs_of(aggregator, Need.ROWS) | (Need.ROWS if pre_aggregators else Need.NONE)
    if Need.ROWS in need and Need.ROWS not in reveals_of(secure_sum) and group_size == 0:
        raise ConfigError(
            f"config key 'server.aggregator': '{aggregator_name}' needs individual updates, which "
            f"server.secure_sum = '{secure_sum_name}' hides; use aggregator 'mean', or set server.group_size "
            "to aggregate robustly over secure group sums")
    if Need.REFERENCE in need and not has_root:
        raise ConfigError(f"config key 'data.root_size': aggregator '{aggregator_name}' needs a server root dataset (> 0)")
