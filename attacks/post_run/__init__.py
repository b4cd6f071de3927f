"""Attacks on a finished run's model (what ``secfed audit`` runs after training; secfed.compare.post_run)."""
