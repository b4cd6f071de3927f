"""What a SuperNode computes for its client: the engine's own client code, on this node's data only.

:class:`ClientRuntime` holds the model, trainer, client pipeline, secure-sum
client side and adversary of one client; :class:`PartitionTask` is a task that
holds one client's shard read from a safetensors partition file
(:func:`write_partitions`), so a SuperNode never loads anyone else's data.
Heavy imports (torch, transformers) live here, not in :mod:`secfed.flower.client`,
so that a Flower ``query`` message does not pay for them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from secfed import registry
from secfed.config import ExperimentConfig
from secfed.data import TensorData
from secfed.engine import Engine
from secfed.errors import ConfigError, DataError, MalformedMessage
from secfed.flower import codec
from secfed.interfaces import ClientUpdate, RoundContext
from secfed.models import torch_threads
from secfed.spec import ParamSpec
from secfed.task import Task, task_class


def plugin_context(cfg: ExperimentConfig, dim: int) -> dict[str, Any]:
    """The engine context arguments plug-ins receive (mirrors ``Engine._build_plugins``)."""
    c, s, n = cfg.client, cfg.server, cfg.data.num_clients
    return dict(num_clients=n, seed=cfg.run.seed, sample_rate=s.sample_rate if s.sampling == "poisson" else None,
                rounds=cfg.run.rounds, local_epochs=c.local_epochs, local_steps=c.local_steps, batch_size=c.batch_size,
                lr=c.lr, optimizer=c.optimizer, momentum=c.momentum, weight_decay=c.weight_decay, dim=dim,
                max_update_norm=s.max_update_norm, min_clients=s.min_clients, cohort_size=s.cohort_size or n)


class PartitionTask(Task):
    """A task that holds one client's shard only, read from a safetensors partition file.

    ``PartitionTask(cfg, path, i)`` is an instance of the config's task class (see
    :func:`secfed.task.task_class`) with this class's ``_load``: the same loss and model
    as on the server, only the data differs.
    """

    _combined: dict[type, type] = {}

    def __new__(cls, cfg: ExperimentConfig, *args: Any, **kwargs: Any) -> "PartitionTask":
        if cls is PartitionTask:
            base = task_class(cfg)
            cls = PartitionTask._combined.setdefault(base, type(f"Partition{base.__name__}", (PartitionTask, base), {}))
        return object.__new__(cls)

    def __init__(self, cfg: ExperimentConfig, path: str | Path, client_id: int) -> None:
        self._path, self._client_id = Path(path), client_id
        super().__init__(cfg)

    def _load(self) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self._path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise DataError(f"node config 'data-file': cannot read {self._path}: {e}") from None
        if meta.get("fingerprint") != self.cfg.fingerprint():
            raise DataError(f"node config 'data-file': {self._path} was split from a different config")
        if meta.get("client_id") != str(self._client_id):
            raise DataError(f"node config 'data-file': {self._path} is partition {meta.get('client_id')}, "
                            f"not partition-id {self._client_id}")
        names = tuple(json.loads(meta.get("label_names", "[]")))
        self.train = TensorData(tensors, int(meta["num_classes"]), names)
        self.test = TensorData({k: v[:0] for k, v in tensors.items()}, self.train.num_classes, names)
        self.root = None
        self.shards = {self._client_id: np.arange(len(self.train))}  # type: ignore[assignment]


def write_partitions(cfg: ExperimentConfig, out_dir: str | Path) -> list[Path]:
    """Split the config's data into one safetensors file per client (``partition-<i>.safetensors``)."""
    from safetensors.torch import save_file

    task = Task(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(cfg.data.num_clients):
        shard = task.client_data(i)
        meta = {"client_id": str(i), "num_classes": str(task.num_classes), "fingerprint": cfg.fingerprint(),
                "label_names": json.dumps(list(task.train.label_names))}
        p = out / f"partition-{i}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.tensors.items()}, str(p), metadata=meta)
        paths.append(p)
    return paths


class ClientRuntime:
    """Everything one SuperNode needs to play client ``client_id``: model, trainer, pipeline, adversary."""

    def __init__(self, cfg: ExperimentConfig, task: Task) -> None:
        torch_threads(cfg.run.threads)
        self.cfg, self.task = cfg, task
        self.model = task.build_model()
        self.spec = ParamSpec.from_module(self.model)
        self.global_w = self.spec.flatten(self.model)
        ctx = plugin_context(cfg, self.spec.numel)
        self.trainer = registry.build("trainer", cfg.client.trainer, "client.trainer", **ctx)
        self.pipeline = [registry.build("client_stage", p, f"client.pipeline[{i}]", **ctx)
                         for i, p in enumerate(cfg.client.pipeline)]
        self.secure_sum = registry.build("secure_sum", cfg.server.secure_sum, "server.secure_sum", **ctx)
        a = cfg.attack.adversary
        self.adversary = registry.build("adversary", a, "attack.adversary", **ctx) if a else None
        self.malicious = set(self.adversary.malicious(cfg.data.num_clients, cfg.run.seed)) if self.adversary else set()
        self.out, self.state = None, {}

    # Engine.context / Engine.local_update only read attributes this object also has
    # (cfg, spec, global_w, out, state, task, model, trainer, adversary, malicious),
    # so the SuperNode runs the engine's own code for its client, not a copy of it.
    def context(self, t: int, cohort: list[int]) -> RoundContext:
        return Engine.context(self, t, cohort)  # type: ignore[arg-type]

    def local_update(self, client_id: int, ctx: RoundContext) -> ClientUpdate:
        return Engine.local_update(self, client_id, ctx)  # type: ignore[arg-type]

    def train(self, rec: Any, client_id: int) -> tuple[bytes, dict[str, float]]:
        """Handle one ``train`` record with a plain secure sum: (payload bytes, metrics)."""
        u, ctx = self.update(rec, client_id)
        return self.secure_sum.encode(u, ctx), self.metrics(u)

    @property
    def private(self) -> bool:
        """True when the run hides updates (secure sum) or promises DP: then nothing per-client leaves in the clear."""
        return codec.metrics_stay_on_node(self.cfg, getattr(self.secure_sum, "reveals_individual", True))

    def metrics(self, u: ClientUpdate) -> dict[str, float]:
        """What a node reports besides its update: nothing under a secure sum or DP (review finding 7:
        train loss, pre-clip norm, steps and examples seen would leave the client in the clear)."""
        if self.private:
            return {}
        return {k: float(v) for k, v in u.metrics.items() if isinstance(v, (int, float))}

    def apply_dp(self, dp: dict[str, Any], ctx: RoundContext) -> None:
        """Seed this round's DP bookkeeping with the server guard's parameters (review finding 2).

        The node's noise stages read z from here, exactly as in-process, so a stage
        whose own ``noise_multiplier`` differs from the guard's raises the same
        ConfigError on the node; DP-SGD takes the guard's z (a node cannot calibrate
        it: it holds one shard, the guard calibrates for all of them).
        """
        from defenses.privacy.clipping import round_info

        cfg = self.cfg
        needs = (cfg.server.privacy is not None or cfg.client.trainer.name == "dp-sgd"
                 or any(p.name in codec.DP_CLIENT_STAGES for p in cfg.client.pipeline))
        if needs and not dp:
            raise ConfigError("server.privacy: the server sent no privacy-guard parameters for this round; "
                              "the node refuses to add noise the guard did not fix")
        info = round_info(ctx)
        if "noise_multiplier" in dp:
            info["noise_multiplier"] = dp["noise_multiplier"]
        if "dpsgd_noise_multiplier" in dp:
            own = getattr(self.trainer, "noise_multiplier", None)
            z = dp["dpsgd_noise_multiplier"]
            if own is not None and not math.isclose(own, z, rel_tol=1e-9):
                raise ConfigError(f"config key 'client.trainer.noise_multiplier': {own} differs from the privacy "
                                  f"guard's {z}; leave it out and let server.privacy set it")
            if not hasattr(self.trainer, "_z"):
                raise ConfigError("config key 'client.trainer': the server's guard runs dp-sgd, this node's trainer does not")
            self.trainer._z = z
        if "max_grad_norm" in dp and not math.isclose(getattr(self.trainer, "max_grad_norm", -1.0), dp["max_grad_norm"],
                                                      rel_tol=1e-9):
            raise ConfigError(f"config key 'client.trainer.max_grad_norm': "
                              f"{getattr(self.trainer, 'max_grad_norm', None)} differs from the server's {dp['max_grad_norm']}")

    @staticmethod
    def check_dp(dp: dict[str, Any], ctx: RoundContext) -> None:
        """After the pipeline: the clip norm and noise placement the node applied are the server's."""
        from defenses.privacy.clipping import round_info

        info = round_info(ctx)
        for k in ("clip_norm", "share_divisor", "distributed"):
            mine, theirs = info.get(k), dp.get(k)
            same = mine == theirs if not isinstance(mine, float) or theirs is None else math.isclose(mine, theirs, rel_tol=1e-9)
            if not same:
                raise ConfigError(f"client.pipeline: this node applied {k} = {mine}, the server's guard "
                                  f"accounts for {theirs}; the node refuses the round")

    @property
    def private_dp(self) -> bool:
        """True when the run promises DP (a guard, a noise stage, adaptive clipping or DP-SGD)."""
        return codec.run_is_dp(self.cfg)

    def update(self, rec: Any, client_id: int) -> tuple[ClientUpdate, RoundContext]:
        """Validate a ``train`` record and run this client's round: its update after pipeline (and adversary)."""
        n = self.cfg.data.num_clients
        if codec.get(rec, "fingerprint", str, max_len=64) != self.cfg.fingerprint():
            raise MalformedMessage("train: the server runs a different config than this node (fingerprint)")
        if codec.get(rec, "client", int) != client_id:
            raise MalformedMessage(f"train: asked to play client {rec['client']}, this node is {client_id}")
        t = codec.get(rec, "round", int)
        if not 1 <= t <= 10_000_000:
            raise MalformedMessage(f"train: round {t} out of range")
        cohort = codec.decode_ids(codec.get(rec, "cohort", bytes), num_clients=n)
        if client_id not in cohort:
            raise MalformedMessage("train: this client is not in the cohort")
        self.global_w = codec.decode_weights(codec.get(rec, "weights", bytes), expected_dim=self.spec.numel, round_=t)
        self.state = codec.decode_state(codec.get(rec, "state", str))
        dp = codec.decode_dp(codec.get(rec, "dp", str)) if "dp" in rec else {}
        ctx = self.context(t, cohort)
        self.apply_dp(dp, ctx)  # the guard's z and clip, before any noise is drawn (review finding 2)
        u = self.local_update(client_id, ctx)
        for stage in self.pipeline:
            u = stage(u, ctx)
        self.check_dp(dp, ctx)
        if client_id in self.malicious and hasattr(self.adversary, "poison_updates"):
            u = self.adversary.poison_updates([u], [], ctx)[0]
        return u, ctx


_RUNTIMES: dict[tuple, ClientRuntime] = {}


def runtime_for(cfg: ExperimentConfig, client_id: int, data_file: str | None) -> ClientRuntime:
    """One runtime per (config, data) in this process (Ray actors and SuperNodes reuse it across rounds)."""
    key = (cfg.fingerprint(), data_file, client_id if data_file else None)
    if key not in _RUNTIMES:
        task = PartitionTask(cfg, data_file, client_id) if data_file else Task(cfg)
        _RUNTIMES.clear()  # one run per process at a time
        _RUNTIMES[key] = ClientRuntime(cfg, task)
    return _RUNTIMES[key]
