"""spamopt: SPAM (Spike-Aware Adam with Momentum reset) for PyTorch."""

from .optim import SPAM

__all__ = ["SPAM"]
__version__ = "0.1.0"
