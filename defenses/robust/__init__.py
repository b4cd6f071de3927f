"""defenses robust."""
