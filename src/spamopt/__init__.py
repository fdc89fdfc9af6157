"""spamopt: SPAM (Spike-Aware Adam with Momentum reset) and Stable-SPAM for PyTorch."""

from .optim import SPAM, AdaClipGN, StableSPAM

__all__ = ["SPAM", "StableSPAM", "AdaClipGN"]
__version__ = "0.1.0"
