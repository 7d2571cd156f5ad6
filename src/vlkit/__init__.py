"""vlkit."""
