"""megaent.trainer."""
