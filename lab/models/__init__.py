"""Models: loading every profile's language model (:mod:`.loading`), the lab's own GPT with named hook points
(:mod:`.gpt`), tokenizers made here (:mod:`.tokenizer`) and the wind tunnel's control networks (:mod:`.windtunnel`)."""
