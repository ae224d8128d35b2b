"""Data: the pretraining corpora (:mod:`.corpus`), the fine-tuning event-record task (:mod:`.records`), the
invented-word constraint corpus (:mod:`.constraints`), the bijection wind tunnel (:mod:`.windtunnel`) and the
fixed prompts the interpretability analyses share (:mod:`.prompts`)."""
