"""Track pretrain."""
