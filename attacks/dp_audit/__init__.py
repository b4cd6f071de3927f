"""Auditing a DP claim: empirical epsilon lower bounds next to the ledger's epsilon.

``canary`` / ``one_run`` / ``observer``: the one-run audit with gradient canaries
(Steinke, Nasr & Jagielski 2023; Nasr et al. 2023), the ``dp-audit`` observer;
``threshold``: the bound from a membership-inference threshold test (Jagielski et al. 2020).
"""
