"""Supervised fine-tuning of a causal LM with the response-only loss, scored by multiple-choice accuracy."""
