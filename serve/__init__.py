"""ltzoo serve package."""
