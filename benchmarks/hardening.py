"""Hardening figures: fuzzing, fault injection and load, in one JSON.

- fuzz: every target of ``tests/fuzz_targets.py`` (wire decoders of plain updates,
  SecAgg+, HE and Flower payloads; config, checkpoint and ledger readers) fed
  ``--fuzz-n`` structure-aware mutations each; a crash is any exception other
  than the target's documented error.
- faults: the fault-injection test cases (client crash at every stage and at
  every SecAgg+ step, CKKS dropouts and malformed ciphertexts, SIGKILL and
  resume, crashes around the privacy ledger, Flower SuperNode kills), run with
  pytest; each case injects a fault and checks the run completes the round
  without the failed party or aborts it cleanly, the ledger never under-counts
  and ``--resume`` finishes.
- load: ``benchmarks/results/load.json`` from ``benchmarks/load.py`` (1000
  clients, 20 rounds, SecAgg+).
- review findings (issue 16): ``review_findings`` (13, the outside review's
  findings) and ``review_findings_closed``, *measured*: pytest runs
  ``tests/test_review_findings_privacy.py`` and ``tests/test_review_findings_secagg.py``
  and a finding NN counts as closed when at least one ``test_finding_NN_*`` passed
  and none failed or errored.

    python benchmarks/hardening.py [--fuzz-n 2000]
    python benchmarks/hardening.py --findings-only     # just the review-findings count (prints, writes nothing)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

FAULT_FILES = ["tests/test_faults.py", "tests/test_resume.py"]
FAULT_SELECT = {  # file -> pytest -k expression selecting its fault-injection cases
    "tests/test_secagg_protocol.py": "dropout or abort or replay or redirect or drop",
    "tests/test_secagg_engine.py": "dropout or abort or drop",
    "tests/test_ckks.py": "malformed or dropout or foreign or corruption or framing",
    "tests/test_privacy_ledger_crash.py": "",
    "tests/test_flower_deploy.py": "kill or garbage or resume or restart",
}


def run_faults() -> dict:
    cases = []
    args_sets = [[f] for f in FAULT_FILES if (ROOT / f).exists()]
    args_sets += [[f] + (["-k", k] if k else []) for f, k in FAULT_SELECT.items() if (ROOT / f).exists()]
    for args in args_sets:
        with tempfile.NamedTemporaryFile(suffix=".xml") as x:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={x.name}",
                            "-m", "not fuzz", *args], cwd=ROOT, capture_output=True, text=True)
            try:
                tree = ET.parse(x.name)
            except ET.ParseError:
                continue
            for tc in tree.iter("testcase"):
                outcome = "passed"
                for child in tc:
                    if child.tag in ("failure", "error"):
                        outcome = "failed"
                    elif child.tag == "skipped":
                        outcome = "skipped"
                cases.append({"case": f"{tc.get('classname')}::{tc.get('name')}", "outcome": outcome})
    ran = [c for c in cases if c["outcome"] != "skipped"]
    return {"cases": cases, "injected": len(ran), "survived": sum(c["outcome"] == "passed" for c in ran)}


REVIEW_FINDINGS = 13  # issue 16: the outside review's findings
REVIEW_FILES = ["tests/test_review_findings_privacy.py", "tests/test_review_findings_secagg.py"]
_FINDING = re.compile(r"test_finding_(\d+)_")


def run_review_findings() -> dict:
    """Run both findings test files; per finding NN the passing/failing ``test_finding_NN_*`` cases."""
    files = [f for f in REVIEW_FILES if (ROOT / f).exists()]
    per: dict[int, dict[str, list[str]]] = {}
    if files:
        with tempfile.NamedTemporaryFile(suffix=".xml") as x:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={x.name}",
                            "-m", "not fuzz", *files], cwd=ROOT, capture_output=True, text=True)
            try:
                tree = ET.parse(x.name)
            except ET.ParseError:
                tree = None
            for tc in (tree.iter("testcase") if tree is not None else []):
                m = _FINDING.match(tc.get("name") or "")
                if not m:
                    continue
                outcome = "passed"
                for child in tc:
                    if child.tag in ("failure", "error"):
                        outcome = "failed"
                    elif child.tag == "skipped":
                        outcome = "skipped"
                per.setdefault(int(m.group(1)), {"passed": [], "failed": [], "skipped": []})[outcome].append(tc.get("name"))
    closed = sorted(k for k, v in per.items() if v["passed"] and not v["failed"] and 1 <= k <= REVIEW_FINDINGS)
    return {"files": files, "review_findings": REVIEW_FINDINGS, "review_findings_closed": len(closed),
            "closed": closed, "open": [k for k in range(1, REVIEW_FINDINGS + 1) if k not in closed],
            "tests": {f"{k:02d}": v for k, v in sorted(per.items())}}


def run_fuzz(n: int) -> dict:
    from fuzz_targets import run, targets

    rows, crashes = [], []
    for t in targets():
        t0 = time.perf_counter()
        k, bad = run(t, n, seed=7)
        rows.append({"target": t.name, "inputs": k, "crashes": len(bad), "seconds": time.perf_counter() - t0})
        crashes.extend(bad[:5])
        print(f"fuzz {t.name:28s} {k:6d} inputs {len(bad):3d} crashes", flush=True)
    return {"targets": rows, "inputs": sum(r["inputs"] for r in rows), "crashes": sum(r["crashes"] for r in rows),
            "examples": crashes}


def _machine() -> dict:
    """Where the counts were taken (they are counts, not timings, but say so)."""
    import os
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return {"cpu_model": cpu, "cores": os.cpu_count(), "load_average_at_end": os.getloadavg(),
            "python": platform.python_version(), "note": "counts (fuzz crashes, faults survived, findings closed), not timings"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fuzz-n", type=int, default=2000)
    ap.add_argument("--findings-only", action="store_true", help="only count the review findings; write nothing")
    args = ap.parse_args()
    review = run_review_findings()
    print(f"review findings: {review['review_findings_closed']}/{review['review_findings']} closed "
          f"(open: {review['open']})", flush=True)
    if args.findings_only:
        print(json.dumps(review, indent=2))
        return
    fuzz = run_fuzz(args.fuzz_n)
    faults = run_faults()
    print(f"faults: {faults['survived']}/{faults['injected']} survived", flush=True)
    load_path = ROOT / "benchmarks" / "results" / "load.json"
    load = json.loads(load_path.read_text()) if load_path.exists() else {}
    out = {
        "headline": {
            "faults_injected": faults["injected"], "faults_survived": faults["survived"],
            "fuzz_inputs": fuzz["inputs"], "fuzz_crashes": fuzz["crashes"],
            "peak_rss_gb_1000_clients": load.get("peak_rss_gb"),
            "rss_growth_per_round_mb": load.get("rss_growth_per_round_mb"),
            "review_findings": review["review_findings"], "review_findings_closed": review["review_findings_closed"],
        },
        "review_findings": review["review_findings"], "review_findings_closed": review["review_findings_closed"],
        "machine": _machine(),
        "review": review, "fuzz": fuzz, "faults": faults,
        "load": {k: v for k, v in load.items() if k != "rss_mb_per_round"},
    }
    (ROOT / "benchmarks" / "results" / "hardening.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["headline"], indent=2))


if __name__ == "__main__":
    main()
