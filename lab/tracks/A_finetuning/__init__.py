"""Track A_finetuning."""
