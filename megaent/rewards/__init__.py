"""megaent.rewards."""
