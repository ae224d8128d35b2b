"""Training: one LR schedule and optimiser factory (:mod:`.schedule`), character-level pretraining
(:mod:`.pretraining`), LoRA / QLoRA through transformers' Trainer (:mod:`.lora`, :mod:`.callbacks`,
:mod:`.evaluation`) and wind-tunnel training (:mod:`.windtunnel`); how their configs check themselves
(:mod:`.validation`) and how saved state is read back, damaged files named (:mod:`.state_files`). Nothing here
knows a track."""
