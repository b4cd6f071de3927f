"""A malicious SecAgg+ server: deviates from the protocol and reports what it learnt (issue 17, part 2).

See :mod:`attacks.malicious_server.secagg` and docs/secagg.md ("Against a malicious server").
"""

from .secagg import AttackReport, forged_keys, inconsistent_views, run_all, sybil

__all__ = ["AttackReport", "forged_keys", "inconsistent_views", "run_all", "sybil"]
