"""LLaMA language-model experiments."""
