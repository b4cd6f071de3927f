"""attacks membership."""
