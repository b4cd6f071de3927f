"""defenses privacy."""
