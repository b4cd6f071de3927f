"""What a SuperNode computes for its client: the engine's own client code, on this node's data only.

:class:`ClientRuntime` holds the model, trainer, client pipeline, secure-sum
client side and adversary of one client; its task is a :class:`~secfed.partitions.PartitionTask`
(one client's shard read from its partition file), so a SuperNode never loads anyone else's data.
Heavy imports (torch, transformers) live here, not in :mod:`secfed.flower.client`,
so that a Flower ``query`` message does not pay for them.
"""

from __future__ import annotations

import math
from typing import Any

from secfed import registry
from secfed.config import ExperimentConfig
from secfed.errors import ConfigError, MalformedMessage
from secfed.flower import codec
from secfed.interfaces import ClientUpdate, RoundContext
from secfed.rounds import ClientRound, DPRoundParams, dpsgd_per_client, plugin_context, round_context, round_info
from secfed.models import torch_threads
from secfed.needs import DPRole, Need, dp_role, is_private, reveals_of
from secfed.partitions import PartitionTask
from secfed.spec import ParamSpec
from secfed.task import Task


class ClientRuntime:
    """Everything one SuperNode needs to play client ``client_id``: the engine's :class:`ClientRound`
    (model, trainer, pipeline), the secure sum's client side and the adversary, built from the node's config."""

    def __init__(self, cfg: ExperimentConfig, task: Task) -> None:
        from secfed.lora import build_method

        torch_threads(cfg.run.threads)
        self.cfg, self.task = cfg, task
        model = task.build_model()
        self.spec = ParamSpec.from_module(model)
        self.global_w = self.spec.flatten(model)
        ctx = plugin_context(cfg, self.spec.numel)
        trainer = registry.build("trainer", cfg.client.trainer, "client.trainer", **ctx)
        pipeline = [registry.build("client_stage", p, f"client.pipeline[{i}]", **ctx) for i, p in enumerate(cfg.client.pipeline)]
        self.secure_sum = registry.build("secure_sum", cfg.server.secure_sum, "server.secure_sum", **ctx)
        a = cfg.attack.adversary
        self.adversary = registry.build("adversary", a, "attack.adversary", **ctx) if a else None
        self.malicious = set(self.adversary.malicious(cfg.data.num_clients, cfg.run.seed)) if self.adversary else set()
        self.client = ClientRound(cfg, task, model, self.spec, trainer, pipeline, self.adversary, self.malicious,
                                  build_method(cfg, model, self.spec, self.global_w))
        self.trainer = trainer  # the ClientRound's

    def context(self, t: int, cohort: list[int], state: dict[str, Any] | None = None) -> RoundContext:
        """This round's context as the node knows it (the engine's own, on the weights the server shipped)."""
        return round_context(self.cfg, t, cohort, self.spec, self.global_w, state if state is not None else {}, self.task)

    def metrics(self, u: ClientUpdate) -> dict[str, float]:
        """What a node reports besides its update: nothing under a secure sum or DP (review finding 7:
        train loss, pre-clip norm, steps and examples seen would leave the client in the clear)."""
        if codec.metrics_stay_on_node(self.cfg, Need.ROWS in reveals_of(self.secure_sum)):
            return {}
        return {k: float(v) for k, v in u.metrics.items() if isinstance(v, (int, float))}

    def apply_dp(self, dp: DPRoundParams | dict[str, Any], ctx: RoundContext) -> None:
        """Seed this round's DP bookkeeping with the server guard's parameters (review finding 2).

        The node's noise stages read z from here as in-process (a stage's own other z fails the same way);
        DP-SGD takes the guard's z (calibrated over every shard; a node holds one), or, under per-client
        calibration, calibrates its own from the config and its shard size as the guard did.
        """
        dp = DPRoundParams.of(dp)
        trainer = self.client.trainer
        cfg = self.cfg
        needs = cfg.server.privacy is not None or is_private(trainer) or codec.pipeline_is_dp(cfg)  # declared roles
        if needs and not dp:
            raise ConfigError("server.privacy: the server sent no privacy-guard parameters for this round; "
                              "the node refuses to add noise the guard did not fix")
        if dp.noise_multiplier is not None:
            round_info(ctx).noise_multiplier = dp.noise_multiplier
            for stage in self.client.pipeline:
                if DPRole.RING_SHARE in dp_role(stage):
                    # ddgauss: the mechanism the server's guard charges, rebuilt from the same config and z (the
                    # stage checks its own parameters against it; the rotation seed is public and per round)
                    round_info(ctx).ddgauss = stage.guard_mechanism(cfg, self.spec.numel, dp.noise_multiplier)
        if dp.dpsgd_noise_multiplier is not None:
            own, z = getattr(trainer, "noise_multiplier", None), dp.dpsgd_noise_multiplier
            if own is not None and not math.isclose(own, z, rel_tol=1e-9):
                raise ConfigError(f"config key 'client.trainer.noise_multiplier': {own} differs from the privacy "
                                  f"guard's {z}; leave it out and let server.privacy set it")
            if not is_private(trainer):
                raise ConfigError("config key 'client.trainer': the server's guard runs dp-sgd, this node's trainer does not")
            if dpsgd_per_client(cfg):
                raise ConfigError(f"server.privacy.calibration: this node calibrates its own z (\"per-client\"); the "
                                  f"server sent a shared z = {z:.4g}")
            need = trainer.calibrated_noise_multiplier(self.task)  # what this node's own config needs
            if z < need * (1 - 1e-9):  # a server asking for less noise than the guarantee needs
                raise ConfigError(f"server.privacy: the server's DP-SGD z = {z:.4g} is below the {need:.4g} this node's "
                                  "config needs for its epsilon; the node refuses to train with less noise")
            trainer.use_noise_multiplier(z)  # the guard's z, calibrated over every shard
        if dp.dpsgd_per_client:
            if not is_private(trainer) or not dpsgd_per_client(cfg):
                raise ConfigError("server.privacy.calibration: the server's guard calibrates DP-SGD per client, this "
                                  "node's config or trainer does not")
            # the trainer calibrates z_i for this node's shard from the same config, as the server's guard did
        if dp.max_grad_norm is not None and not math.isclose(getattr(trainer, "max_grad_norm", -1.0), dp.max_grad_norm,
                                                             rel_tol=1e-9):
            raise ConfigError(f"config key 'client.trainer.max_grad_norm': "
                              f"{getattr(trainer, 'max_grad_norm', None)} differs from the server's {dp.max_grad_norm}")

    NODE_STATE = "secfed-trainer"  # the trainer's per-client state (e.g. momentum buffers) in the node's storage

    def load_node_state(self, state: Any) -> None:
        """A stateful trainer (worker momentum) continues from this node's own storage (Flower keeps
        ``context.state`` on the node for the run, whichever process runs the message). The state never
        leaves the node; safetensors bytes, never pickle."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        if hasattr(self.client.trainer, "load_state_dict"):
            try:
                self.client.trainer.load_state_dict(load(bytes(state[self.NODE_STATE]["tensors"]))
                                                    if self.NODE_STATE in state else {})
            except (SafetensorError, KeyError, TypeError):
                raise MalformedMessage("node state: the trainer's saved state is unreadable") from None

    def save_node_state(self, state: Any) -> None:
        import torch
        from flwr.app import ConfigRecord
        from safetensors.torch import save

        if hasattr(self.client.trainer, "state_dict"):
            tensors = self.client.trainer.state_dict().items()
            state[self.NODE_STATE] = ConfigRecord({"tensors": save({k: v.contiguous() for k, v in tensors
                                                                     if isinstance(v, torch.Tensor)})})

    def update(self, rec: Any, client_id: int) -> tuple[ClientUpdate, RoundContext]:
        """Validate a ``train`` record and run this client's round: its update after pipeline (and adversary)."""
        n = self.cfg.data.num_clients
        if codec.get(rec, "fingerprint", str, max_len=64) != self.cfg.fingerprint():
            raise MalformedMessage("train: the server runs a different config than this node (fingerprint)")
        if "client" in rec and codec.get(rec, "client", int) != client_id:  # the server may leave it out (one content)
            raise MalformedMessage(f"train: asked to play client {rec['client']}, this node is {client_id}")
        t = codec.get(rec, "round", int)
        if not 1 <= t <= 10_000_000:
            raise MalformedMessage(f"train: round {t} out of range")
        cohort = codec.decode_ids(codec.get(rec, "cohort", bytes), num_clients=n)
        if client_id not in cohort:
            raise MalformedMessage("train: this client is not in the cohort")
        self.global_w = codec.decode_weights(codec.get(rec, "weights", bytes), expected_dim=self.spec.numel, round_=t)
        state = codec.decode_state(codec.get(rec, "state", str))
        dp = codec.decode_dp(codec.get(rec, "dp", str)) if "dp" in rec else DPRoundParams()
        ctx = self.context(t, cohort, state)
        self.apply_dp(dp, ctx)  # the guard's z and clip, before any noise is drawn (review finding 2)
        u = self.client.run(client_id, ctx)
        dp.check_applied(ctx)
        if client_id in self.malicious and hasattr(self.adversary, "poison_updates"):
            u = self.adversary.poison_updates([u], [], ctx)[0]
        return u, ctx


_RUNTIMES: dict[tuple, ClientRuntime] = {}
_SUMS: dict[str, Any] = {}


def runtime_for(cfg: ExperimentConfig, client_id: int, data_file: str | None) -> ClientRuntime:
    """One runtime per (config, data) in this process (Ray actors and SuperNodes reuse it across rounds)."""
    key = (cfg.fingerprint(), data_file, client_id if data_file else None)
    if key not in _RUNTIMES:
        task = PartitionTask(cfg, data_file, client_id) if data_file else Task(cfg)
        _RUNTIMES.clear()  # one run per process at a time
        _RUNTIMES[key] = ClientRuntime(cfg, task)
    return _RUNTIMES[key]


def secure_sum_for(cfg: ExperimentConfig) -> Any:
    """The secure sum's client side for a protocol step: from the runtime if this process has one, else
    built alone (a step needs no model and no data)."""
    for (fp, _, _), rt in _RUNTIMES.items():
        if fp == cfg.fingerprint():
            return rt.secure_sum
    if cfg.fingerprint() not in _SUMS:
        _SUMS.clear()
        _SUMS[cfg.fingerprint()] = registry.build("secure_sum", cfg.server.secure_sum, "server.secure_sum",
                                                  **plugin_context(cfg, 0))
    return _SUMS[cfg.fingerprint()]
