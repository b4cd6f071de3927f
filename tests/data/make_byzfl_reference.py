"""Generate tests/data/byzfl_reference.json from ByzFL, so the conformance test needs no ByzFL.

ByzFL (pip package ``byzfl``, version recorded in the JSON) requires torchvision, and
installing it next to secfed's CPU torch would pull a CUDA build. Run this in a separate
environment instead:

    python3 -m venv /tmp/byzfl-venv
    /tmp/byzfl-venv/bin/pip install torch==2.13.0 numpy scipy
    /tmp/byzfl-venv/bin/pip install --no-deps byzfl==0.0.11
    /tmp/byzfl-venv/bin/python tests/data/make_byzfl_reference.py

``import byzfl`` imports its benchmark package, which imports torchvision; the
aggregators and attacks do not need it, so the package is registered without running
its ``__init__`` and ``byzfl.aggregators`` / ``byzfl.attacks`` are imported directly.
Inputs are drawn from a seeded numpy generator and stored in the JSON next to the outputs.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch


def import_byzfl():
    spec = importlib.util.find_spec("byzfl")
    pkg = types.ModuleType("byzfl")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["byzfl"] = pkg
    from byzfl.aggregators import aggregators, preaggregators
    from byzfl.attacks import attacks

    return aggregators, preaggregators, attacks


def main() -> None:
    A, P, T = import_byzfl()
    rng = np.random.default_rng(20240601)
    cases = []

    def add(name, params, X, out, **extra):
        cases.append({"name": name, "params": params, "X": np.asarray(X, dtype=np.float32).tolist(),
                      "out": np.asarray(out, dtype=np.float64).tolist(), **extra})

    for n, d in ((7, 20), (10, 20), (11, 33)):
        X = rng.normal(size=(n, d)).astype(np.float32)
        Xt = torch.from_numpy(X)
        f = max(1, n // 5)
        add("Median", {}, X, A.Median()(Xt))
        add("TrMean", {"f": f}, X, A.TrMean(f=f)(Xt))
        add("MultiKrum", {"f": f}, X, A.MultiKrum(f=f)(Xt))
        add("Krum", {"f": f}, X, A.Krum(f=f)(Xt))
        add("GeometricMedian", {"nu": 0.1, "T": 3}, X, A.GeometricMedian(nu=0.1, T=3)(Xt))
        add("GeometricMedian", {"nu": 0.1, "T": 50}, X, A.GeometricMedian(nu=0.1, T=50)(Xt))
        cc = A.CenteredClipping(L=1, tau=1.0)
        add("CenteredClipping", {"L": 1, "tau": 1.0, "center": None}, X, cc(Xt))
        center = rng.normal(size=d).astype(np.float32)
        cc = A.CenteredClipping(L=3, tau=2.0)
        cc.m = torch.from_numpy(center)  # its constructor rejects every m (type-check bug), so set the attribute
        add("CenteredClipping", {"L": 3, "tau": 2.0, "center": center.tolist()}, X, cc(Xt))
        add("NNM", {"f": f}, X, P.NNM(f=f)(Xt))
        add("Clipping", {"c": 2.0}, X, P.Clipping(c=2.0)(Xt.clone()))
        add("ALittleIsEnough", {"tau": 1.5}, X, T.ALittleIsEnough(tau=1.5)(Xt))
        add("InnerProductManipulation", {"tau": 0.5}, X, T.InnerProductManipulation(tau=0.5)(Xt))
        add("SignFlipping", {}, X, T.SignFlipping()(Xt))
        add("Mimic", {"epsilon": 1}, X, T.Mimic(epsilon=1)(Xt))
    out = {"byzfl_version": importlib.metadata.version("byzfl"), "torch_version": torch.__version__,
           "generator": "tests/data/make_byzfl_reference.py", "cases": cases}
    path = Path(__file__).with_name("byzfl_reference.json")
    path.write_text(json.dumps(out))
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
