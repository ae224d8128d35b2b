"""Training: one LR schedule and optimiser factory (:mod:`.schedule`), character-level pretraining
(:mod:`.pretraining`), LoRA / QLoRA through transformers' Trainer (:mod:`.lora`, :mod:`.callbacks`,
:mod:`.evaluation`) and wind-tunnel training (:mod:`.windtunnel`). Configs check themselves with
:mod:`lab.validation`; saved state is read back through :mod:`lab.state`. Nothing here knows a track."""
