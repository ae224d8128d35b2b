"""LLM Learning Lab."""
