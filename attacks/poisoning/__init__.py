"""attacks poisoning."""
