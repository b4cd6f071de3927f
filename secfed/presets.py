"""Privacy presets: one config line for a complete, consistent DP setup.

::

    [privacy]
    preset = "user-level"      # or "record-level"
    epsilon = 8.0
    delta = 1e-5

* ``"record-level"`` -- DP-SGD on every client (Abadi et al. 2016): protects one record
  of one organisation. Sets ``client.trainer = {name = "dp-sgd", max_grad_norm = clip}``
  and ``server.privacy = {name = "dp-sgd", epsilon, delta, accountant, calibration}`` (each
  organisation's noise multiplier calibrated for its own plan: ``calibration = "per-client"``, the
  default here; ``"shared"`` gives every organisation the smallest shard's; or a fixed ``noise_multiplier``).
* ``"user-level"`` -- DP-FedAvg (McMahan et al. 2018): protects one organisation's whole
  data. Sets Poisson client sampling (``server.sampling = "poisson"``, ``sample_rate``),
  ``client.weighting = "uniform"``, a ``clip`` stage (``clip_norm = clip``), the
  expected-denominator mean ``{name = "mean", denominator = "expected"}`` (qN), the
  noise (``noise = "central"``: ``central-gaussian`` server stage, added by the server;
  ``"distributed"``: a ``ddgauss`` client stage under ``secagg+``, the distributed discrete Gaussian in the
  ring SecAgg+ sums; ``gaussian-share`` under a homomorphic sum or adaptive clipping) and the
  ``dp-fedavg`` guard.

A key the user wrote that agrees with the preset is kept; keys the preset needs and the
user left out are filled in; keys that contradict it are listed, all of them, in one
:class:`ConfigError`. Expanding an already expanded config (``config.json``) changes
nothing, so ``--resume`` and ``secfed audit`` re-read it unchanged.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from secfed.errors import ConfigError
from secfed.needs import DPRole, Need, dp_role

PRESETS = ("record-level", "user-level")
KEYS = ("preset", "epsilon", "delta", "accountant", "clip", "noise_multiplier", "sample_rate", "noise", "calibration")
DEFAULT_CLIP = {"record-level": 1.0, "user-level": 0.5}


def _role(kind: str, spec: dict[str, Any]) -> DPRole:
    """The declared DP role of a stage table (secfed.needs.DPRole of its registry-resolved class; NONE if the
    name does not resolve: the config check names it later). An alias or a subclass plays its class's role."""
    from secfed import registry

    return dp_role(registry.find(kind, str(spec.get("name", ""))))


def _reveals_rows(spec: dict[str, Any]) -> bool:
    """The named secure sum declares that the server sees every row (the plain sum, or an alias/subclass of it)."""
    from secfed import registry

    return Need.ROWS in getattr(registry.find("secure_sum", str(spec.get("name", ""))), "reveals", Need.NONE)


def _is_secagg(spec: dict[str, Any]) -> bool:
    """The named secure sum declares ``sums_ring_inputs`` (SecAgg+, any alias or subclass), so ddgauss runs under it."""
    from secfed import registry

    return bool(getattr(registry.find("secure_sum", str(spec.get("name", ""))), "sums_ring_inputs", False))


def _spec(v: Any) -> dict[str, Any]:
    return {"name": v} if isinstance(v, str) else dict(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12)
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


class _Expander:
    """Fills the preset's keys into the raw config dict, collecting every contradiction."""

    def __init__(self, data: dict[str, Any], preset: str) -> None:
        self.data, self.preset, self.conflicts = data, preset, []

    def section(self, name: str) -> dict[str, Any]:
        sec = self.data.setdefault(name, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"config key '{name}': must be a table")
        return sec

    def value(self, sec: str, key: str, want: Any) -> None:
        d = self.section(sec)
        if d.get(key) is None:
            d[key] = want
        elif not _same(d[key], want):
            self.conflicts.append(f"{sec}.{key} = {d[key]!r} (the preset needs {want!r})")

    def plugin(self, sec: str, key: str, want: dict[str, Any]) -> None:
        d = self.section(sec)
        if d.get(key) is None:
            d[key] = dict(want)
            return
        have = _spec(d[key])
        if not _same(have.get("name", ""), want["name"]):
            self.conflicts.append(f"{sec}.{key} = {have.get('name')!r} (the preset needs {want['name']!r})")
            return
        for k, v in want.items():
            if have.get(k) is None:
                have[k] = v
            elif not _same(have[k], v):
                self.conflicts.append(f"{sec}.{key}.{k} = {have[k]!r} (the preset needs {v!r})")
        d[key] = have

    def empty(self, sec: str, key: str, why: str) -> None:
        v = self.section(sec).get(key)
        if v:
            self.conflicts.append(f"{sec}.{key} = {v!r} ({why})")


def expand_privacy(data: Any) -> Any:
    """The raw config dict with the ``[privacy]`` preset expanded (a copy); raises one ConfigError listing
    every contradiction. Anything that is not a plain dict with a ``privacy`` table is returned unchanged."""
    if not isinstance(data, dict) or data.get("privacy") is None:
        return data
    if not all(isinstance(data.get(k, {}), dict) for k in ("client", "server", "data")):
        return data  # already validated sections (assignment): nothing to expand
    p = data["privacy"]
    if hasattr(p, "model_dump"):
        p = p.model_dump()
    if not isinstance(p, dict):
        raise ConfigError("config key 'privacy': a table, e.g. [privacy] preset = \"user-level\", epsilon = 8, delta = 1e-5")
    unknown = [k for k in p if k not in KEYS]
    if unknown:
        raise ConfigError(f"unknown config key 'privacy.{unknown[0]}' (allowed: {', '.join(KEYS)})")
    preset = p.get("preset")
    if preset not in PRESETS:
        raise ConfigError(f"config key 'privacy.preset': one of {PRESETS} (got {preset!r})")
    if p.get("epsilon") is None and p.get("noise_multiplier") is None:
        raise ConfigError("config key 'privacy.epsilon': give epsilon (and delta), or noise_multiplier")
    data = copy.deepcopy(data)
    data["privacy"] = p
    ex = _Expander(data, preset)
    eps, delta, acc = p.get("epsilon"), p.get("delta", 1e-5) or 1e-5, p.get("accountant") or "rdp"
    clip = p.get("clip") if p.get("clip") is not None else DEFAULT_CLIP[preset]
    z = p.get("noise_multiplier")
    guard = {"name": "dp-sgd" if preset == "record-level" else "dp-fedavg", "delta": delta, "accountant": acc}
    if eps is not None:
        guard["epsilon"] = eps
    if preset == "record-level":
        for k in ("sample_rate", "noise"):
            if p.get(k) is not None:
                ex.conflicts.append(f"privacy.{k} = {p[k]!r} (applies to preset \"user-level\" only)")
        trainer = {"name": "dp-sgd", "max_grad_norm": clip}
        if z is not None:
            trainer["noise_multiplier"] = z
            if p.get("calibration") is not None:
                ex.conflicts.append(f"privacy.calibration = {p['calibration']!r} (a fixed noise_multiplier is not "
                                    "calibrated)")
        else:  # each organisation's z for its own plan (defenses.privacy.dpsgd.resolve_noise_multiplier)
            guard["calibration"] = p.get("calibration") or "per-client"
        ex.plugin("client", "trainer", trainer)
    else:
        if p.get("calibration") is not None:
            ex.conflicts.append(f"privacy.calibration = {p['calibration']!r} (applies to preset \"record-level\" only)")
        _user_level(ex, p, clip)
        if z is not None:
            guard["noise_multiplier"] = z
    ex.plugin("server", "privacy", guard)
    if ex.conflicts:
        raise ConfigError(f"config key 'privacy': preset \"{preset}\" contradicts {len(ex.conflicts)} explicit "
                          f"setting(s): " + "; ".join(ex.conflicts) + " (remove them, or drop the preset)")
    return data


def _user_level(ex: _Expander, p: dict[str, Any], clip: float) -> None:
    server, data = ex.section("server"), ex.section("data")
    ex.value("server", "sampling", "poisson")
    q = p.get("sample_rate")
    if q is None and server.get("sample_rate") is None and server.get("cohort_size"):
        q = min(1.0, server["cohort_size"] / max(int(data.get("num_clients", 10)), 1))
    if q is not None:
        ex.value("server", "sample_rate", q)
    ex.value("client", "weighting", "uniform")
    ex.plugin("server", "aggregator", {"name": "mean", "denominator": "expected"})
    ex.empty("server", "pre_aggregators", "dp-fedavg's sensitivity covers the plain mean only")
    ex.empty("server", "group_size", "dp-fedavg's sensitivity covers the plain mean only")
    client = ex.section("client")
    pipe = [_spec(x) for x in client.get("pipeline", [])]
    clips = [s for s in pipe if DPRole.CLIP in _role("client_stage", s)]
    if not clips:
        pipe.insert(0, {"name": "clip", "clip_norm": clip})
    elif p.get("clip") is not None:
        for s in clips:
            fixed = _role("client_stage", s) == DPRole.CLIP  # a fixed clip (adaptive clipping has no clip_norm)
            if fixed and s.get("clip_norm") is not None and not _same(s["clip_norm"], clip):
                ex.conflicts.append(f"client.pipeline.clip.clip_norm = {s['clip_norm']!r} (privacy.clip is {clip!r})")
    stages = [_spec(x) for x in server.get("stages", [])]
    central_noise = any(DPRole.CENTRAL_NOISE in _role("server_stage", s) for s in stages)
    shares = sum(DPRole.SHARE in _role("client_stage", s) for s in pipe)
    noise = p.get("noise") or ("distributed" if shares else "central")
    if noise == "central":
        if shares:
            ex.conflicts.append("client.pipeline has 'gaussian-share' (privacy.noise = \"central\" adds the noise on the server)")
        if not central_noise:
            stages.append({"name": "central-gaussian"})
    elif noise == "distributed":
        if central_noise:
            ex.conflicts.append("server.stages has 'central-gaussian' (privacy.noise = \"distributed\": the clients add it)")
        ss = server.get("secure_sum")
        ss_name = _spec(ss).get("name", "").lower() if ss is not None else None
        if ss_name is None:
            server["secure_sum"] = ss = "secagg+"
        elif _reveals_rows(_spec(ss)):
            ex.conflicts.append("server.secure_sum = 'plain' (distributed noise needs 'secagg+' or 'he')")
        if not shares:
            # Under SecAgg+ (which sums integers mod 2^b) with a fixed clip: the distributed discrete Gaussian
            # (Kairouz, Liu & Steinke 2021), accounted for the modular sum; otherwise (a homomorphic sum, adaptive
            # clipping) continuous Gaussian shares on a grid.
            fixed = all(_role("client_stage", c) == DPRole.CLIP for c in clips)
            pipe.append({"name": "ddgauss" if fixed and _is_secagg(_spec(ss)) else "gaussian-share"})
    else:
        ex.conflicts.append(f"privacy.noise = {noise!r} (one of 'central', 'distributed')")
    client["pipeline"] = pipe
    server["stages"] = stages
