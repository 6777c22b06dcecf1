"""ltzoo training package."""
