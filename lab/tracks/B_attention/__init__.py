"""Track B_attention."""
