"""defenses secure_aggregation."""
