"""attacks audit."""
