"""Track C_probing."""
