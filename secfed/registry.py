"""Short names for plug-ins, resolved lazily so the engine never imports defences.

A config may name any plug-in as ``"package.module:Attribute"``; the short names
below are aliases. Resolution happens when a run is built, and a bad name or a
bad argument is a :class:`ConfigError` naming the config key.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from secfed.errors import ConfigError

REGISTRY: dict[str, dict[str, str]] = {
    "trainer": {
        "sgd": "secfed.training:SGDTrainer",
        "dp-sgd": "defenses.privacy.dpsgd:DPSGDTrainer",
        "momentum-sgd": "defenses.robust.momentum:MomentumTrainer",
    },
    "client_stage": {
        "clip": "defenses.privacy.clipping:ClipUpdate",
        "gaussian-share": "defenses.privacy.dpfedavg:DistributedGaussianNoise",
        "ddgauss": "defenses.privacy.ddgauss:DDGaussNoise",
        "adaptive-clip": "defenses.privacy.dpfedavg:AdaptiveClipClient",
    },
    "secure_sum": {
        "plain": "secfed.secure_sum:PlainSum",
        "secagg+": "defenses.secure_aggregation.secagg:SecAggPlus",
        "secagg": "defenses.secure_aggregation.secagg:SecAggPlus",
        "he": "defenses.secure_aggregation.ckks:HomomorphicSum",  # TenSEAL BFV by default, scheme = "ckks" for CKKS
        "ckks": "defenses.secure_aggregation.ckks:HomomorphicSum",  # old name of "he" (it runs BFV unless scheme = "ckks")
    },
    "pre_aggregator": {
        "nnm": "defenses.robust.preagg:NNM",
        "bucketing": "defenses.robust.preagg:Bucketing",
        "static-clip": "defenses.robust.preagg:StaticClip",
    },
    "aggregator": {
        "mean": "secfed.aggregation:Mean",
        "median": "defenses.robust.aggregators:CoordinateMedian",
        "trimmed-mean": "defenses.robust.aggregators:TrimmedMean",
        "krum": "defenses.robust.aggregators:Krum",
        "multi-krum": "defenses.robust.aggregators:MultiKrum",
        "bulyan": "defenses.robust.aggregators:Bulyan",
        "geometric-median": "defenses.robust.aggregators:GeometricMedian",
        "centered-clipping": "defenses.robust.aggregators:CenteredClipping",
        "fltrust": "defenses.robust.aggregators:FLTrust",
        "flame": "defenses.robust.aggregators:FLAME",
        "norm-bound": "defenses.robust.aggregators:NormBound",
    },
    "server_stage": {
        "central-gaussian": "defenses.privacy.dpfedavg:CentralGaussianNoise",
        "adaptive-clip": "defenses.privacy.dpfedavg:AdaptiveClipServer",
    },
    "privacy": {
        "dp-fedavg": "defenses.privacy.guard:DPFedAvgGuard",
        "dp-sgd": "defenses.privacy.guard:DPSGDGuard",
    },
    "observer": {
        "dlg": "attacks.inversion.observer:GradientInversionObserver",
        "text-inversion": "attacks.inversion.text:TextInversionObserver",
        "dager": "attacks.inversion.dager_lm:DagerObserver",
        "dp-audit": "attacks.dp_audit.observer:CanaryAuditObserver",
    },
    "adversary": {
        "label-flip": "attacks.poisoning.data:LabelFlip",
        "backdoor": "attacks.poisoning.data:Backdoor",
        "sign-flip": "attacks.poisoning.model:SignFlip",
        "gaussian": "attacks.poisoning.model:GaussianNoise",
        "scaling": "attacks.poisoning.model:ModelReplacement",
        "alie": "attacks.poisoning.model:ALIE",
        "ipm": "attacks.poisoning.model:IPM",
        "min-max": "attacks.poisoning.model:MinMax",
        "min-sum": "attacks.poisoning.model:MinSum",
        "mimic": "attacks.poisoning.model:Mimic",
        "adaptive": "attacks.poisoning.model:Adaptive",
        # causal-LM (instruction tuning) audits, issue 19
        "instruct-backdoor": "attacks.poisoning.instruct_backdoor:InstructBackdoor",
        "secret-sharer": "attacks.memorisation.secret_sharer:SecretSharer",
        "lm-dp-audit": "attacks.dp_audit.lm_canary:LMCanaryAudit",  # one-run DP audit with secret-sharer canaries
    },
    # a malicious server that manipulates the model it ships: craft(global_w, spec, task, ctx) -> weights sent
    # this round; recover(view, ctx) -> dict (from what the server saw: the aggregate under a secure sum)
    "server_adversary": {
        "imprint": "attacks.inversion.imprint:ImprintAttack",
        "lora-trap": "attacks.inversion.imprint:LoraTrapAttack",
    },
    # the post-run audit's attack functions (secfed.compare.post_run reaches them here, never by import)
    "audit_tool": {
        "llm-attacks": "attacks.post_run.llm:LLM_ATTACKS",
        "is-causal": "attacks.post_run.llm:is_causal",
        "run-llm-attack": "attacks.post_run.llm:run_llm_attack",
        "attack-metrics": "attacks.membership.mia:attack_metrics",
        "loss-scores": "attacks.membership.mia:loss_scores",
        "model-logits": "attacks.membership.mia:model_logits",
        "threshold-epsilon": "attacks.dp_audit.threshold:threshold_epsilon_lower_bound",
    },
}


# Values the engine owns and passes to every plug-in (``Engine._build_plugins``): a
# plug-in's table may never set them, or a plug-in (a privacy guard above all) would
# account for a value the run does not use (review finding 1: a guard given
# ``sample_rate = 0.01`` while the server samples at 0.8). Key -> the config key that owns it.
ENGINE_OWNED: dict[str, str] = {
    "num_clients": "data.num_clients",
    "seed": "run.seed",
    "sample_rate": "server.sample_rate",
    "sampling": "server.sampling",
    "rounds": "run.rounds",
    "local_epochs": "client.local_epochs",
    "local_steps": "client.local_steps",
    "batch_size": "client.batch_size",
    "record_sample_rate": "client.record_sample_rate",
    "lr": "client.lr",
    "optimizer": "client.optimizer",
    "momentum": "client.momentum",
    "weight_decay": "client.weight_decay",
    "optimizer_state": "client.optimizer_state",
    "physical_batch_size": "client.physical_batch_size",
    "dim": "the model's trainable parameter count",
    "max_update_norm": "server.max_update_norm",
    "min_clients": "server.min_clients",
    "cohort_size": "server.cohort_size",
    "group_size": "server.group_size",
}


def refuse_engine_owned(spec: Any, key: str, context: dict[str, Any] | None = None) -> None:
    """One ConfigError if a plug-in table sets a value the engine owns (any key of ``context``, or of ENGINE_OWNED)."""
    owned = set(ENGINE_OWNED) | set(context or {})
    for k in spec.params:
        if k in owned:
            owner = ENGINE_OWNED.get(k, f"the engine's {k}")
            where = owner if " " in owner else f"{owner}; set it there"
            raise ConfigError(f"config key '{key}.{k}' is owned by the engine ({where}); remove it from the plug-in's table")


def resolve(kind: str, name: str, key: str) -> Any:
    """The attribute a short name or ``module:attr`` string points to."""
    target = REGISTRY.get(kind, {}).get(name.lower(), name)
    if ":" not in target:
        known = ", ".join(sorted(REGISTRY.get(kind, {})))
        raise ConfigError(f"config key '{key}': unknown {kind} '{name}' (known: {known}; or give 'module:Class')")
    mod_name, attr = target.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"config key '{key}': cannot import '{mod_name}' for '{name}': {e}") from None
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise ConfigError(f"config key '{key}': '{mod_name}' has no '{attr}'") from None


def find(kind: str, name: str) -> Any:
    """:func:`resolve`, or None where ``name`` does not resolve (a report of another install's run, a config
    the check names later): for reading a plug-in's declarations (``reveals``, ``dp_role``, ...)."""
    try:
        return resolve(kind, name, kind)
    except ConfigError:
        return None


def build(kind: str, spec: Any, key: str, **context: Any) -> Any:
    """Instantiate a plug-in from a :class:`PluginSpec`.

    ``context`` holds engine-provided arguments (e.g. ``num_clients``) passed only
    if the constructor accepts them; user parameters come from the config.
    """
    factory = resolve(kind, spec.name, key)
    refuse_engine_owned(spec, key, context)
    params = dict(spec.params)
    try:
        sig = inspect.signature(factory)
        accepts_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        for k, v in context.items():
            if k not in params and (accepts_kw or k in sig.parameters):
                params[k] = v
        unknown = [k for k in spec.params if k not in sig.parameters and not accepts_kw]
        if unknown:
            allowed = ", ".join(p for p in sig.parameters if p not in context) or "none"
            raise ConfigError(f"config key '{key}.{unknown[0]}': not an argument of {spec.name} (allowed: {allowed})")
    except (TypeError, ValueError) as e:  # builtins without signatures
        if isinstance(e, ConfigError):
            raise
    try:
        return factory(**params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{key}': {spec.name}: {e}") from None
