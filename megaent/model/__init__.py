"""megaent.model."""
