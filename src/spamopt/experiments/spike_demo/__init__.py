"""Gradient-spike telemetry on a tiny LLaMA with AdamW and SPAM: ``spamopt spikes demo``."""
