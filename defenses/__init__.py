"""Defences: differential privacy, secure aggregation, robust aggregation (plug-ins of the secfed engine)."""
