"""attacks inversion."""
