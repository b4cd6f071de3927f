"""The in-process federation: N simulated clients and one server, round by round.

One round (DESIGN.md)::

    privacy.check -> sample cohort -> per client: load w_t, local training,
    delta, client pipeline -> adversary -> ledger entry (fsync) -> secure sum
    -> pre-aggregators -> aggregator -> server stages -> server optimizer
    -> observers -> evaluation -> rounds.jsonl + checkpoint

Everything random in the simulation is derived from ``run.seed`` and the round
(:func:`secfed.interfaces.derive_seed`), so a run killed at any point and resumed
from its checkpoint reaches bit-identical weights.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from secfed import registry
from secfed.aggregation import ServerOptimizer
from secfed.checkpoint import load_checkpoint, save_checkpoint, split_state
from secfed.config import ExperimentConfig
from secfed.describe import changed_keys, check_data, data_summary, failure, guarantee
from secfed.errors import BudgetExhausted, CheckpointError, ConfigError, RoundAborted
from secfed.interfaces import ClientUpdate, RoundContext, ServerView, SumResult, derive_seed
from secfed.ledger import PrivacyLedger, ledger_key_from_env
from secfed.lora import build_method, check_combination
from secfed.models import torch_threads
from secfed.needs import Need, call_aggregator, check_needs, needs_of, reveals_of
from secfed.rounds import ClientRound, metrics_stay_on_node, plugin_context, round_context
from secfed.secure_sum import group_sums
from secfed.spec import ParamSpec
from secfed.task import Task
from secfed.truth import GroundTruth


def _stateful(obj: Any) -> bool:
    return hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Engine:
    """Build a run from a validated config and execute it. ``run()`` returns the summary."""

    #: the transport can hand an omniscient adversary the honest clients' updates (secfed.needs.check_needs)
    shares_honest_rows = True

    def __init__(self, cfg: ExperimentConfig, out_dir: str | Path | None = None, *, resume: bool = False,
                 progress: bool = True, task: Task | None = None,
                 on_round_end: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.progress = progress
        self.on_round_end = on_round_end
        self.out = Path(out_dir or cfg.run.out or f"runs/{cfg.run.name}")
        self.threads = torch_threads(cfg.run.threads)  # "auto": the idle CPUs this process may use
        # Build everything that can fail on user input before touching the disk.
        self.task = task or Task(cfg)
        # capped/clamped settings -> warnings; a label column that cannot mean anything -> DataError
        self.warnings = check_data(cfg, self.task.train, self.task.test, getattr(self.task, "root", None),
                                   getattr(self.task, "shards", None)) if hasattr(self.task, "train") else []
        self.last_saved = 0  # the round the checkpoint on disk holds (0: nothing saved yet)
        self.model = self.task.build_model()
        self.spec = ParamSpec.from_module(self.model)
        self.global_w = self.spec.flatten(self.model)
        self._build_plugins()
        self.opt = ServerOptimizer(cfg.server.optimizer, cfg.server.lr, cfg.server.momentum, cfg.server.beta1,
                                   cfg.server.beta2, cfg.server.tau)
        self.state: dict[str, Any] = {}
        self.start_round = 1
        self.malicious: set[int] = set()
        # evaluation-only ground truth (secfed.truth): kept when an observer or the malicious server scores against it
        evaluators = [*self.observers, self.server_adversary]
        self.truth = GroundTruth() if any(Need.GROUND_TRUTH in self.needs_truth(o) for o in evaluators) else None
        if self.adversary is not None:
            self.malicious = set(self.adversary.malicious(cfg.data.num_clients, cfg.run.seed))

    # ------------------------------------------------------------------ building
    def _build_plugins(self) -> None:
        c, s = self.cfg.client, self.cfg.server
        n = self.cfg.data.num_clients
        ctx = plugin_context(self.cfg, self.spec.numel)
        self.trainer = registry.build("trainer", c.trainer, "client.trainer", **ctx)
        self.pipeline = [registry.build("client_stage", p, f"client.pipeline[{i}]", **ctx) for i, p in enumerate(c.pipeline)]
        self.secure_sum = registry.build("secure_sum", s.secure_sum, "server.secure_sum", **ctx)
        self.pre_aggregators = [registry.build("pre_aggregator", p, f"server.pre_aggregators[{i}]", **ctx)
                                for i, p in enumerate(s.pre_aggregators)]
        self.aggregator = registry.build("aggregator", s.aggregator, "server.aggregator", **ctx)
        self.stages = [registry.build("server_stage", p, f"server.stages[{i}]", **ctx) for i, p in enumerate(s.stages)]
        self.observers = [registry.build("observer", p, f"server.observers[{i}]", **ctx) for i, p in enumerate(s.observers)]
        guard_cls = registry.resolve("privacy", s.privacy.name, "server.privacy") if s.privacy else None
        if hasattr(guard_cls, "config_violations"):  # the plug-in's own check (secfed imports no defence)
            bad = guard_cls.config_violations(self.cfg)  # every violation in one error, not one per run
            if bad:
                raise ConfigError(f"server.privacy = '{s.privacy.name}' needs {len(bad)} more setting(s): "
                                  + "; ".join(bad) + " (or write [privacy] preset = \"user-level\" with epsilon and delta)")
        self.privacy = registry.build("privacy", s.privacy, "server.privacy", **ctx) if s.privacy else None
        if self.privacy is not None and hasattr(self.privacy, "validate_config"):
            self.privacy.validate_config(self.cfg)  # seeded noise, accounted vs real parameters (findings 1, 9)
        a = self.cfg.attack.adversary
        self.adversary = registry.build("adversary", a, "attack.adversary", **ctx) if a else None
        srv = self.cfg.attack.server  # a malicious server that crafts the model it ships (issue 17)
        if srv is not None and self.cfg.deploy.transport != "inprocess":
            raise ConfigError("config key 'attack.server': a model-crafting server is simulated in-process only; "
                              "set deploy.transport = 'inprocess'")
        self.server_adversary = registry.build("server_adversary", srv, "attack.server", **ctx) if srv else None
        if self.server_adversary is not None and hasattr(self.server_adversary, "check"):
            self.server_adversary.check(self.spec, self.task)  # a model it cannot craft: one line, before any disk
        # what every plug-in declares it needs against what the round can give: one check (secfed.needs)
        check_needs(aggregator=self.aggregator, aggregator_name=s.aggregator.name, pre_aggregators=self.pre_aggregators,
                    secure_sum=self.secure_sum, secure_sum_name=s.secure_sum.name, group_size=s.group_size,
                    has_root=self.task.root is not None, observers=self.observers, adversary=self.adversary,
                    privacy=self.privacy, privacy_name=s.privacy.name if s.privacy else "", trainer=self.trainer,
                    secret_sample=self.privacy is not None, honest_rows=self.shares_honest_rows,
                    pipeline=[(p.name, stage) for p, stage in zip(c.pipeline, self.pipeline)])
        needs_rows = Need.ROWS in self.aggregator.needs or bool(self.pre_aggregators)  # declared (checked above)
        # LoRA-aware aggregation (issue 18, secfed.lora): the method and what it cannot run with, in one line
        self.lora = build_method(self.cfg, self.model, self.spec, self.global_w)
        check_combination(self.cfg, self.lora, reveals=self.secure_sum.reveals, robust=needs_rows or s.group_size > 0,
                          noise_on_sum=Need.SUM in needs_of(self.privacy, "server.privacy"))

    def _stateful_objects(self) -> dict[str, Any]:
        objs = {"trainer": self.trainer, "secure_sum": self.secure_sum, "aggregator": self.aggregator,
                "privacy": self.privacy, "adversary": self.adversary}
        objs.update({f"client_stage{i}": p for i, p in enumerate(self.pipeline)})
        objs.update({f"pre_aggregator{i}": p for i, p in enumerate(self.pre_aggregators)})
        objs.update({f"server_stage{i}": p for i, p in enumerate(self.stages)})
        objs.update({f"observer{i}": p for i, p in enumerate(self.observers)})
        return {k: v for k, v in objs.items() if v is not None and _stateful(v)}

    # ------------------------------------------------------------------ run dir
    def _prepare_out(self) -> None:
        self.ledger_key = ledger_key_from_env()  # None: sha256 chain; else HMAC chain + MACed checkpoint state
        if self.resume:
            if not (self.out / "checkpoint").exists() and not (self.out / "checkpoint.old").exists():
                raise CheckpointError(f"--resume: no checkpoint in {self.out} (no round finished there); nothing to "
                                      "resume: rerun without --resume")
            self._load()
            return
        if self.out.exists() and any(self.out.iterdir()):
            k = 1
            while self.out.with_name(f"{self.out.name}.prev-{k}").exists():
                k += 1
            backup = self.out.with_name(f"{self.out.name}.prev-{k}")
            self.out.rename(backup)
            self._log(f"{self.out} existed; moved it to {backup} (nothing is deleted)")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        self.ledger = PrivacyLedger(self.out / "privacy_ledger.jsonl", self.ledger_key)

    def _load(self) -> None:
        tensors, state = load_checkpoint(self.out, self.ledger_key)
        # the ledger must extend what the checkpoint anchored (finding 3) -- checked before anything is restored
        self.ledger = PrivacyLedger(self.out / "privacy_ledger.jsonl", self.ledger_key)
        self.ledger.verify_anchor(state.get("ledger"))
        if state.get("fingerprint") != self.cfg.fingerprint():
            raise CheckpointError(f"--resume: the checkpoint in {self.out} was made with a different config"
                                  f"{changed_keys(self.out, self.cfg)} "
                                  "(only run.rounds may change)")
        self.global_w = tensors["global"]
        self.opt.state = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
        for name, obj in self._stateful_objects().items():
            t = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            obj.load_state_dict({**state.get("plugins", {}).get(name, {}), **t})
        self.state = {k[6:]: v for k, v in tensors.items() if k.startswith("state.")}
        self.state.update(state.get("state", {}))
        self.lora.restore(self.model, self.state)  # stack: the merged updates on the freshly built base
        self.start_round = state["round"] + 1
        if self.privacy is not None:
            charged = {e.get("round") for e in self.ledger.entries}
            missing = [r for r in range(1, state["round"] + 1) if r not in charged]
            if missing:  # every checkpointed round was charged before its release
                raise CheckpointError(f"--resume: the privacy ledger has no entry for released round(s) "
                                      f"{missing[:5]}; refusing to restart the budget")
            self.privacy.load(self.ledger.entries)
        rounds = self.out / "rounds.jsonl"
        if rounds.exists():  # keep the records of checkpointed rounds only
            keep = [l for l in rounds.read_text().splitlines() if l.strip() and json.loads(l)["round"] <= state["round"]]
            rounds.write_text("".join(l + "\n" for l in keep))
        self.spec.assign(self.model, self.global_w)

    def _save(self, t: int) -> None:
        tensors = {"global": self.global_w}
        tensors.update({f"opt.{k}": v for k, v in self.opt.state.items()})
        plugins: dict[str, Any] = {}
        for name, obj in self._stateful_objects().items():
            plugin_tensors, plugins[name] = split_state(name, obj.state_dict())
            tensors.update(plugin_tensors)
        js_state = {}
        for k, v in self.state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{k}"] = v
            elif not k.startswith("_"):
                js_state[k] = v
        save_checkpoint(self.out, tensors, {"round": t, "fingerprint": self.cfg.fingerprint(), "plugins": plugins,
                                            "state": js_state, "ledger": self.ledger.anchor()}, self.ledger_key)

    def _log(self, msg: str) -> None:
        if self.progress:
            from tqdm import tqdm

            tqdm.write(msg)

    # ------------------------------------------------------------------ one round
    def sample_cohort(self, t: int) -> list[int]:
        s, n = self.cfg.server, self.cfg.data.num_clients
        if getattr(self, "privacy", None) is not None:
            return secret_cohort(n, s.sampling, s.sample_rate, min(s.cohort_size or n, n))
        g = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, t, "sample"))
        if s.sampling == "poisson":
            mask = torch.rand(n, generator=g) < s.sample_rate
            return torch.nonzero(mask).flatten().tolist()
        k = min(s.cohort_size or n, n)
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    def context(self, t: int, cohort: list[int]) -> RoundContext:
        return round_context(self.cfg, t, cohort, self.spec, self.global_w, self.state, self.task, self.out)

    @property
    def client_round(self) -> ClientRound:
        """One client's round (secfed.rounds.ClientRound): the same code a SuperNode runs for its client."""
        return ClientRound(self.cfg, self.task, self.model, self.spec, self.trainer, self.pipeline, self.adversary,
                           self.malicious, self.lora, truth=self.truth)

    def local_update(self, client_id: int, ctx: RoundContext) -> ClientUpdate:
        """One client's round: load the shipped w_t (``ctx.global_weights``), train on its own shard, return the delta."""
        return self.client_round.local_update(client_id, ctx)

    def server_reference(self, ctx: RoundContext) -> torch.Tensor:
        """The server's own update on its root dataset (FLTrust)."""
        self.spec.assign(self.model, self.global_w)
        torch.manual_seed(derive_seed(self.cfg.run.seed, ctx.round, "server-root"))
        self.trainer.train(self.model, self.task, self.task.root, ctx.generator("root"), client_id=-1)
        return self.spec.flatten(self.model) - self.global_w

    def aggregate(self, result: SumResult, ctx: RoundContext) -> torch.Tensor:
        agg = self.aggregator
        if self.lora.needs_rows:  # stack / FlexLoRA: from each client's factors (check_combination: rows exist)
            return self.lora.aggregate_rows(result.updates, result.weights, ctx.global_weights, self.model)
        need = agg.needs  # declared (secfed.needs; check_needs: a sum-only aggregator has from_sum)
        if Need.ROWS not in need and not self.pre_aggregators:
            mean_w = float(result.total_weight / max(len(result.client_ids), 1))
            expected_w = ctx.expected_cohort * (1.0 if self.cfg.client.weighting == "uniform" else mean_w)
            return agg.from_sum(result.total, result.total_weight, expected_w)
        out = call_aggregator(agg, self.pre_aggregators, result.updates, result.weights,
                              center=lambda: self.state.get("center", torch.zeros(self.spec.numel)),
                              reference=lambda: self.server_reference(ctx))
        if Need.CENTRE in need:
            self.state["center"] = out.detach().clone()
        return out

    def evaluate_with_truth(self, plugin: Any, call: Callable[..., Any], view: ServerView, ctx: RoundContext) -> Any:
        """Call an observer (or ``recover``); one that declares Need.GROUND_TRUTH also gets ``truth=``, the
        record of what each client trained on (secfed.truth; evaluation only, never sent or logged)."""
        if Need.GROUND_TRUTH in self.needs_truth(plugin):
            return call(view, ctx, truth=self.truth)
        return call(view, ctx)

    def needs_truth(self, plugin: Any) -> Need:
        """Need.GROUND_TRUTH if the observer / malicious server declares it (its ``needs``), else Need.NONE."""
        if plugin is None:
            return Need.NONE
        key = "attack.server" if plugin is self.server_adversary else "server.observers"
        return needs_of(plugin, key) & Need.GROUND_TRUTH

    def lora_metrics(self, result: SumResult, aggregate: torch.Tensor, before: torch.Tensor) -> dict[str, Any]:
        """``lora_agg_rel_error`` (secfed.lora) where the server sees the rows and no DP guarantee covers the
        round; otherwise why it is absent (a statistic of the rows must not leave through the record)."""
        if not self.lora.layout.modules or not result.client_ids:
            return {}
        if result.updates is None or self.cfg.server.group_size > 0 or result.update_ids != result.client_ids:
            return {"lora_agg_error_hidden": "the secure sum hides the rows"}
        if self.privacy is not None:
            return {"lora_agg_error_hidden": "a statistic of the un-noised rows; not released under DP"}
        return self.lora.round_metrics(result.updates, result.weights, aggregate, before, self.model)

    def collect(self, ctx: RoundContext, bar: Any = None) -> tuple[list[Any], dict[int, str]]:
        """Run the cohort's clients: local training, client pipeline, adversary (transports override this)."""
        t, cohort = ctx.round, ctx.cohort
        updates: list[ClientUpdate] = []
        dropped: dict[int, str] = {}
        for cid in cohort:
            if ctx.dropouts.drops(cid, "train"):
                dropped[cid] = "dropped during training"
                continue
            if self.cfg.client.verify_model and not torch.equal(ctx.global_weights, self.global_w):
                dropped[cid] = "refused the shipped model: not w_{t-1} + the published update (client.verify_model)"
                continue
            started = time.perf_counter()
            try:
                u = self.client_round.run(cid, ctx)  # load w_t, train, pipeline (secfed.rounds)
            except (RuntimeError, ValueError, MemoryError, FloatingPointError) as e:  # a client's crash is its dropout
                dropped[cid] = f"client crashed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                self._log(f"round {t}: client {cid} dropped, {dropped[cid]}")
                continue
            took = time.perf_counter() - started + self.cfg.faults.slow_clients.get(str(cid), 0.0)
            deadline = self.cfg.server.round_deadline_s
            if deadline and took > deadline:
                dropped[cid] = f"missed the round deadline ({took:.1f} s > {deadline} s)"
                continue
            updates.append(u)
            if bar is not None:
                bar.set_postfix_str(f"round {t}: client {len(updates)}/{len(cohort)}")
        if self.adversary is not None and hasattr(self.adversary, "poison_updates"):
            bad = [u for u in updates if u.client_id in self.malicious]
            good = [u for u in updates if u.client_id not in self.malicious]
            if bad:
                seen = good if Need.HONEST_ROWS in self.adversary.needs else []  # declared (check_needs)
                bad = self.adversary.poison_updates(bad, seen, ctx)
                by_id = {u.client_id: u for u in bad}
                updates = [by_id.get(u.client_id, u) for u in updates]
        return updates, dropped

    def secure_aggregate(self, updates: list[Any], ctx: RoundContext) -> SumResult:
        """What the server learns from the collected updates (transports override this)."""
        if self.cfg.server.group_size > 0:
            return group_sums(self.secure_sum, updates, ctx, self.cfg.server.group_size, self.cfg.server.min_clients)
        return self.secure_sum.aggregate(updates, ctx)

    def run_round(self, t: int, bar: Any = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.privacy is not None and getattr(self, "ledger", None) is None:  # opened by run() (_prepare_out)
            raise RuntimeError("Engine.run_round: no privacy ledger yet; call run(), which opens the run directory")
        cohort = self.sample_cohort(t)
        ctx = self.context(t, cohort)
        if self.privacy is not None:
            self.privacy.check(ctx)  # raises BudgetExhausted before any work
        if self.truth is not None:
            self.truth.start(t)
        if self.server_adversary is not None:  # the model this round ships (crafted by a malicious server)
            ctx.global_weights = self.server_adversary.craft(self.global_w, self.spec, self.task, ctx)
        updates, dropped = self.collect(ctx, bar)
        # The privacy spend is made durable before anything computed from this round leaves the server.
        epsilon = None
        if self.privacy is not None:
            self.ledger.append({"round": t, **self.privacy.record(ctx)})
            epsilon = self.privacy.epsilon()
        record: dict[str, Any] = {"round": t, "sampled": len(cohort), "malicious": len(set(cohort) & self.malicious)}
        before = ctx.global_weights
        try:
            result = self.secure_aggregate(updates, ctx)
            result.dropped.update(dropped)
            if len(result.client_ids) < self.cfg.server.min_clients:
                raise RoundAborted(f"{len(result.client_ids)} clients completed, server.min_clients is {self.cfg.server.min_clients}")
            aggregate = self.aggregate(result, ctx)
            for stage in self.stages:
                aggregate = stage(aggregate, result, ctx)
            if not bool(torch.isfinite(aggregate).all()):
                raise RoundAborted("the aggregate is not finite")
            if ctx.global_weights is self.global_w:
                self.global_w = self.opt.step(self.global_w, aggregate)
                self.lora.commit(self.model, self.state)  # stack: merge the exact product update into the base
            else:  # a crafted round: the malicious server reads the sum and keeps its own model
                record["server_crafted_model"] = True
            record["status"] = "ok"
        except RoundAborted as e:
            result = locals().get("result") or SumResult([], torch.zeros(self.spec.numel), 0.0, dropped=dropped)
            aggregate = torch.zeros(self.spec.numel)
            record["status"] = f"aborted: {e}"
            self._log(f"round {t} aborted: {e}")
        d_bytes = 4 * self.spec.numel + 32
        record.update({
            "completed": len(result.client_ids),
            "dropped": len(result.dropped),
            "rejected": sum(1 for r in result.dropped.values() if r.startswith("malformed")),
            "bytes_up": int(sum(result.bytes_up.values())),
            "bytes_down": int(sum(result.bytes_down.values()) + d_bytes * len(cohort)),
        })
        # Finding 7: the un-noised cohort mean loss is a per-cohort statistic; under DP or a secure sum it is not logged.
        if not metrics_stay_on_node(self.cfg, Need.ROWS in reveals_of(self.secure_sum)):  # every transport
            record["train_loss"] = float(np.mean([u.metrics.get("train_loss", float("nan")) for u in updates])) if updates else None
        record.update({k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))})
        record.update(ctx.metrics)
        record.update(self.lora_metrics(result, aggregate, before))
        view = ServerView(t, result.transcript, result.updates, result.update_ids, result.weights, aggregate, before,
                          self.global_w, self.spec, self.task)
        for obs in self.observers:
            m = self.evaluate_with_truth(obs, obs, view, ctx) or {}
            record.update(m)
        if self.server_adversary is not None:
            record.update(self.evaluate_with_truth(self.server_adversary, self.server_adversary.recover, view, ctx) or {})
        last = t == self.cfg.run.rounds
        if t % self.cfg.run.eval_every == 0 or last:
            self.spec.assign(self.model, self.global_w)
            record.update(self.task.evaluate(self.model))
            if self.adversary is not None and hasattr(self.adversary, "evaluate"):
                record.update(self.adversary.evaluate(self.model, self.task) or {})
        if epsilon is not None:
            record["epsilon"] = epsilon
            record.update({k: v for k, v in getattr(self.privacy, "describe", dict)().items() if k == "epsilon_vs_server"})
        record["seconds"] = time.perf_counter() - t0
        record["peak_rss_mb"] = peak_rss_mb()
        return record

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        self._prepare_out()
        self.last_saved = self.start_round - 1
        self.spec.assign(self.model, self.global_w)
        from tqdm import tqdm

        rounds = self.cfg.run.rounds
        stopped = None
        t_start = time.perf_counter()
        short = guarantee(self.cfg, self.privacy)["short"]
        bar = tqdm(total=rounds, initial=self.start_round - 1, unit="round",
                   desc=f"{self.cfg.run.name} [{short}, {self.threads} threads]",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            for t in range(self.start_round, rounds + 1):
                try:
                    record = self.run_round(t, bar)
                except BudgetExhausted as e:
                    stopped = f"privacy budget: {e}"
                    self._log(f"stopping before round {t}: {e}")
                    break
                with (self.out / "rounds.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                self._save(t)
                self.last_saved = t
                bar.update(1)
                post = {k: record[k] for k in ("accuracy", "loss", "epsilon") if k in record}
                bar.set_postfix({k: f"{v:.3f}" for k, v in post.items()})
                if self.on_round_end is not None:
                    self.on_round_end(t)
        finally:
            bar.close()
        self.spec.assign(self.model, self.global_w)
        from secfed.export import export_adapter

        lora_export = self.lora.before_export(self.model, self.state)  # stack: merged updates back into the adapter
        export_adapter(self.model, self.task, self.out / "adapter")  # text runs: PEFT format (+ head, labels)
        samples = self.task.sample_generations(self.model, 5)  # generative tasks: prompt, reference, base, federated
        if samples:
            (self.out / "samples.json").write_text(json.dumps(samples, indent=2))
        summary = self.summarize(time.perf_counter() - t_start, stopped)
        summary.update(lora_export)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        from secfed.report import write_run_report

        write_run_report(self.out, summary)
        return summary

    def summarize(self, seconds: float, stopped: str | None) -> dict[str, Any]:
        recs = read_rounds(self.out)
        evals = [r for r in recs if "accuracy" in r]
        final = evals[-1] if evals else {}
        per_round = [r["seconds"] for r in recs]
        s = {
            "name": self.cfg.run.name,
            "rounds_completed": len(recs),
            "rounds_planned": self.cfg.run.rounds,
            "final_accuracy": final.get("accuracy"),
            "final_loss": final.get("loss"),
            "best_accuracy": max((r["accuracy"] for r in evals), default=None),
            "majority_baseline": self.task.majority_baseline(),
            "num_clients": self.cfg.data.num_clients,
            "trainable_params": self.spec.numel,
            "seconds_per_round": float(np.mean(per_round)) if per_round else None,
            "seconds_this_invocation": seconds,
            "bytes_up_per_round": float(np.mean([r["bytes_up"] for r in recs])) if recs else None,
            "peak_rss_mb": peak_rss_mb(),
            "stopped": stopped,
            "fingerprint": self.cfg.fingerprint(),
        }
        s.update(self.task.baseline(self.model))  # majority class; zero_shot_* (adapter disabled) for causal LMs
        if self.privacy is not None:
            s["epsilon"] = self.privacy.epsilon()
            s["delta"] = getattr(self.privacy, "delta", None)
            s.update(getattr(self.privacy, "describe", dict)())  # which adversary each epsilon holds against (finding 4)
            s["ledger_chain"] = getattr(getattr(self, "ledger", None), "chain", None)
        # what a user must not misread: aggregated vs attempted rounds, the guarantee, the data, the warnings
        s["rounds_aggregated"] = sum(1 for r in recs if r.get("status") == "ok")
        s["guarantee"] = guarantee(self.cfg, self.privacy)
        if hasattr(self.task, "train"):
            s["data"] = data_summary(self.task.train, self.task.test, getattr(self.task, "root", None),
                                     getattr(self.task, "shards", None), getattr(self.task, "canaries", None))
        s["warnings"] = list(self.warnings)
        s["failed"] = failure(recs, s, self.global_w)
        return s


def secret_cohort(n: int, sampling: str, sample_rate: float, k: int) -> list[int]:
    """A cohort from the OS CSPRNG (review finding 4): amplification by subsampling needs a sample that
    no one holding config.json can rebuild. Poisson: each client with probability q (53-bit uniforms,
    exact up to 2^-53); fixed size: ``secrets.SystemRandom().sample``."""
    if sampling == "poisson":
        u = (np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return np.nonzero(u < sample_rate)[0].tolist()
    import secrets

    return sorted(secrets.SystemRandom().sample(range(n), k))


def read_rounds(run_dir: Path) -> list[dict[str, Any]]:
    p = Path(run_dir) / "rounds.jsonl"
    if not p.exists():
        return []
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
