"""megaent.rollout."""
