"""Large simulations: the same ServerApp/ClientApp on Flower's simulation runtime with the Ray backend.

Each simulated SuperNode is a virtual node; Ray runs the ClientApps in a pool of
actors (``deploy.ray_num_cpus`` CPUs in all, ``deploy.ray_client_cpus`` each), so
a round's clients train in parallel across cores instead of one after another.
Every actor builds the task and model once and reuses them across rounds. Ray
is shut down when the run ends, also on error.

Ray moves the apps to its actors with cloudpickle: that is code secfed itself
hands to Ray in the same trust domain, never bytes from a peer. The messages
between the apps are still secfed's validated byte formats (:mod:`secfed.flower.codec`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from secfed.config import ExperimentConfig
from secfed.errors import SecfedError


def run_ray_simulation(cfg: ExperimentConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                       verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` on Flower's simulation runtime (Ray backend); returns the summary like ``Engine.run``."""
    try:
        import ray
        from flwr.simulation import run_simulation
    except ImportError:
        raise SecfedError("deploy.transport = 'flower-ray' needs Flower's simulation extra: pip install 'secfed[flower]'") from None
    from secfed.flower.client import make_client_app
    from secfed.flower.server import make_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    d = cfg.deploy
    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose, "configure_logging": False}
    if d.ray_num_cpus:
        init_args["num_cpus"] = d.ray_num_cpus
    backend_config = {"client_resources": {"num_cpus": d.ray_client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    from secfed.flower.runtime import secure_sum_for

    # keys the clients hold from outside the server (active SecAgg+: one Ed25519 identity per client on the
    # server's roster; HE: the key holder's secret-key context), generated here for the simulation
    keys = getattr(secure_sum_for(cfg), "simulation_keys", dict)() or None
    result: dict[str, Any] = {}
    server_app = make_server_app(cfg, out_dir, resume=resume, result=result, keys=keys)
    client_app = make_client_app(cfg, keys)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.data.num_clients,
                       backend_name="ray", backend_config=backend_config, verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    if not result:
        out = Path(out_dir or cfg.run.out or f"runs/{cfg.run.name}")
        summary = out / "summary.json"
        if not summary.exists():
            raise SecfedError(f"the Flower simulation ended without a result (see the log above); run dir {out}")
        result = json.loads(summary.read_text())
        result["out"] = str(out)
    return result
