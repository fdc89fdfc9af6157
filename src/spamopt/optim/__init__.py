"""Optimizers. No experiment code, plotting or I/O lives here."""

from .spam import SPAM
from .stabilize import AdaClipGN
from .stable_spam import StableSPAM

__all__ = ["SPAM", "StableSPAM", "AdaClipGN"]
