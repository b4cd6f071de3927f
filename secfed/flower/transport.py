"""One switch: ``deploy.transport`` (or ``secfed run --transport``) picks where the clients run.

* ``inprocess`` - the engine's own loop (default; :class:`secfed.engine.Engine`);
* ``flower-ray`` - Flower's simulation runtime with the Ray backend (:mod:`secfed.flower.simulation`);
* ``flower`` - a real local federation: a ``flower-superlink`` and one SuperNode
  per client (``secfed deploy supernode``: ``flower-supernode`` with one
  long-lived ClientApp worker) as separate OS processes with TLS and node
  authentication on loopback (:class:`secfed.flower.deploy.LocalFederation`).

All three give the same model for the same config and seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secfed.config import ExperimentConfig


def run_flower(cfg: ExperimentConfig, out_dir: str | Path | None = None, *, resume: bool = False,
               work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` on its Flower transport; returns the summary (with ``out``, the run directory)."""
    out = Path(out_dir or cfg.run.out or f"runs/{cfg.run.name}")
    if cfg.deploy.transport == "flower-ray":
        from secfed.flower.simulation import run_ray_simulation

        return run_ray_simulation(cfg, out, resume=resume)
    from secfed.flower.deploy import LocalFederation

    with LocalFederation(cfg, work_dir or out.with_name(out.name + ".deploy")) as fed:
        summary = fed.run(out, resume=resume)
    summary["out"] = str(out)
    return summary
