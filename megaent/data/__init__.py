"""megaent.data."""
