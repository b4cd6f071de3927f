"""The machine record every result file carries (figures are re-measured on other machines of this kind)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(loaded: bool | None = None, note: str = "") -> dict[str, Any]:
    """CPU model, cores, the cores this process may use, load average now, and whether other work shared it."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rec: dict[str, Any] = {"cpu_model": cpu_model(), "cores": os.cpu_count(), "usable_cpus": usable,
                           "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
                           "python": platform.python_version()}
    if loaded is not None:
        rec["loaded"] = loaded
    if note:
        rec["note"] = note
    return rec


def command(script: str, argv: list[str]) -> str:
    """The command line a result file records: ``python <script> <args>`` without ``--out`` and its value (a
    local path), in either ``--out X`` or ``--out=X`` form."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            kept.append(a)
    return " ".join(["python", script, *kept])
