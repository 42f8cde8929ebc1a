"""The corpus readers and the embedding store."""
