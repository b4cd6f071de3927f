"""Attacks that audit secfed runs: inversion, poisoning, membership inference, DP auditing."""
