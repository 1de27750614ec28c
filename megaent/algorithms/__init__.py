"""megaent.algorithms."""
