"""ltzoo export package."""
