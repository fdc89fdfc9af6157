"""Optimizers. No experiment code, plotting or I/O lives here."""

from .spam import SPAM

__all__ = ["SPAM"]
