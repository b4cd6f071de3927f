"""Seconds per round over real Flower processes (SuperLink + one SuperNode per client, TLS, node
authentication) against the same config in-process, side by side (issue 20).

    python benchmarks/deploy.py                    # all cases: digits plain + SecAgg+ (4 rounds), tweets (3)
    python benchmarks/deploy.py --rounds 2 --cases quickstart      # shorter
    python benchmarks/deploy.py --inprocess-only --rounds 1         # smoke test: no Flower processes

Cases: ``quickstart`` = ``experiments/flower_local.toml`` (the README's "Run across machines" config: digits
CNN, 3 clients, about 0.06 s of work per round, so the ratio is Flower's per-message cost), ``secagg`` = the
same with ``server.secure_sum = "secagg+"`` (active by default: six messages per node per round, the nodes
signing with their node keys), ``tweets`` = ``experiments/quickstart.toml`` (the README's Quickstart: MiniLM +
LoRA on the tweets, 10 SuperNodes, cohort 5, 3 rounds: a round of real fine-tuning work), ``tweets_secagg`` =
the same under active SecAgg+. ``--cases`` re-measures the cases named and keeps the other cases' rows of
the existing JSON (each row records when and on what it was measured). Both transports run
the same config and seed with ``run.threads = 1``. Per-round seconds come from each run's ``rounds.jsonl``;
the first round is reported apart (it includes the ClientApp's first model build) and the headline uses rounds
2.. when there are at least two. Writes benchmarks/results/deploy.json with
``headline.flower_over_inprocess_seconds_per_round_quickstart``, ``..._secagg`` and ``..._tweets`` (goal <= 2)
and the machine (CPU model, usable CPUs, load average).

The SuperNodes are secfed's (``secfed.flower.worker``, what ``LocalFederation`` and the README start):
``flower-supernode --isolation process`` with one long-lived ClientApp worker thread per node that calls its
SuperNode's Runtime API in-process (no loopback HTTP), and short idle polling; ``flower-superexec`` polls for
ServerApp tasks at Flower's 1 s. Set ``SECFED_WORKER_RUNTIME=http`` and
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1`` in the environment for the previous setup (issue 20's "before").
(Flower's own ``flower-supernode`` starts one ``flwr-clientapp`` process per message: about 46 s per round on
2 cores, issue 20.) The headline's SuperLink keeps Flower's in-memory state (``LocalFederation``'s default); a
second Flower column for the digits cases (``*_durable``; ``--no-durable`` skips it) runs the SuperLink with
``--database`` (sqlite), as the README's operator commands do: profiled with py-spy, that SuperLink spent most
of its time in sqlite, and rounds took about 2x longer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _machine import command  # noqa: E402


class Case(NamedTuple):
    config: str  # under experiments/
    overrides: dict
    rounds: int  # when --rounds is not given
    durable: bool  # also timed with the SuperLink's sqlite state (the *_durable columns)


CASES = {"quickstart": Case("flower_local.toml", {}, 4, True),
         "secagg": Case("flower_local.toml", {"server": {"secure_sum": "secagg+"}}, 4, True),
         "tweets": Case("quickstart.toml", {}, 3, False),
         "tweets_secagg": Case("quickstart.toml", {"server": {"secure_sum": "secagg+"}}, 3, False)}


def config(case: str, rounds: int):
    from secfed.config import load_config, parse_config

    base = load_config(ROOT / "experiments" / CASES[case].config).model_dump(mode="json")
    base["run"].update({"name": f"deploy-{case}", "rounds": rounds, "eval_every": rounds, "threads": 1})
    for section, values in CASES[case].overrides.items():
        base[section].update(values)
    return parse_config(base)


def per_round(run_dir: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run_dir / "rounds.jsonl").read_text().splitlines() if line.strip()]


def steady(rounds: list[float]) -> float:
    """Mean seconds per round, without round 1 when there are later ones."""
    rest = rounds[1:] or rounds
    return sum(rest) / len(rest)


def flower_run(cfg, case: str, rounds: int, work: Path, durable: bool = False) -> dict:
    """One run over a local SuperLink + SuperNodes (TLS, node auth): per-round seconds and wall times.
    ``durable``: the SuperLink keeps its state in sqlite (``--database``) instead of memory."""
    from secfed.flower.deploy import LocalFederation

    tag = "flower-durable" if durable else "flower"
    t0 = time.perf_counter()
    with LocalFederation(cfg, work / f"{case}-{tag}-fed", durable=durable) as fed:
        started = time.perf_counter()
        fed.run(work / f"{case}-{tag}", timeout=600 + 300 * rounds)
    rb = per_round(work / f"{case}-{tag}")
    return {"rounds": rb, "seconds_per_round": steady(rb), "wall_seconds": time.perf_counter() - t0,
            "federation_startup_seconds": started - t0}


def measure(case: str, rounds: int, work: Path, inprocess_only: bool, durable: bool) -> dict:
    from secfed.engine import Engine

    cfg = config(case, rounds)
    t0 = time.perf_counter()
    Engine(cfg, work / f"{case}-inprocess", progress=False).run()
    wall_in = time.perf_counter() - t0
    ra = per_round(work / f"{case}-inprocess")
    row = {"case": case, "rounds": rounds, "rounds_inprocess": ra, "seconds_per_round_inprocess": steady(ra),
           "wall_seconds_inprocess": wall_in}
    if inprocess_only:
        return row
    fl = flower_run(cfg, case, rounds, work)
    row.update({"rounds_flower": fl["rounds"], "seconds_per_round_flower": fl["seconds_per_round"],
                "wall_seconds_flower": fl["wall_seconds"],
                "federation_startup_seconds": fl["federation_startup_seconds"],
                "flower_over_inprocess": fl["seconds_per_round"] / steady(ra)})
    if durable and CASES[case].durable:  # the README operator's SuperLink (--database superlink.db), side by side
        fd = flower_run(cfg, case, rounds, work, durable=True)
        row.update({"rounds_flower_durable": fd["rounds"], "seconds_per_round_flower_durable": fd["seconds_per_round"],
                    "flower_durable_over_inprocess": fd["seconds_per_round"] / steady(ra)})
    return row


def _flwr_version() -> str | None:
    try:
        from flwr.supercore.version import package_version
    except ImportError:
        return None
    return str(package_version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run (default: 4; tweets 3)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--inprocess-only", action="store_true", help="smoke test: skip the Flower processes")
    ap.add_argument("--no-durable", action="store_true",
                    help="skip the column with the SuperLink's sqlite state (--database), as the README operator runs it")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deploy.json"))
    ap.add_argument("--keep-work", action="store_true",
                    help="keep the work folder (Flower logs; '[secfed-worker' lines time each message on a node)")
    args = ap.parse_args()
    from robust import cpu_description  # benchmarks/robust.py: CPU model, flags, load

    cpu = cpu_description()
    cpu.pop("cpu_flags", None)
    work = Path(tempfile.mkdtemp(prefix="secfed-deploy-bench-"))
    rows = []
    try:
        for case in args.cases:
            load = [round(x, 2) for x in os.getloadavg()]
            row = measure(case, args.rounds or CASES[case].rounds, work, args.inprocess_only, not args.no_durable)
            row.update(measured_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu_model=cpu.get("cpu_model"),
                       load_average_at_start=load)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("rounds_")}), flush=True)
    finally:
        if args.keep_work:
            print(f"work folder kept: {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    old = Path(args.out)
    if old.exists() and not args.inprocess_only:  # keep the rows of the cases not re-measured now
        kept = [r for r in json.loads(old.read_text()).get("table", []) if r.get("case") not in args.cases]
        rows = sorted(kept + rows, key=lambda r: list(CASES).index(r["case"]) if r.get("case") in CASES else 99)
    headline = {f"flower_over_inprocess_seconds_per_round_{r['case']}":
                (round(r["flower_over_inprocess"], 2) if "flower_over_inprocess" in r else None) for r in rows}
    out = {
        "headline": headline,
        "goal": "<= 2 for each case",
        "table": rows,
        "environment": {"python": platform.python_version(), "machine": platform.machine(), **cpu,
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "method": ("same config and seed on both transports, run.threads = 1; seconds per round from rounds.jsonl, "
                   "mean over rounds 2.. (round 1 kept in the table); Flower = local SuperLink + one secfed SuperNode "
                   "per client (TLS, node auth, --isolation process with one long-lived ClientApp worker thread each, "
                   "calling its SuperNode's Runtime API in-process); the "
                   "headline's SuperLink keeps Flower's in-memory state (LocalFederation's default), the *_durable "
                   "columns its sqlite state (--database, as in the README's operator commands)"),
        "flwr": _flwr_version(),
        "settings": {k: os.environ.get(k) for k in ("SECFED_WORKER_RUNTIME", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL",
                                                    "SECFED_SUPERNODE_POLL_MIN", "SECFED_SUPERNODE_POLL_MAX")
                     if os.environ.get(k) is not None},
        "command": command("benchmarks/deploy.py", sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
